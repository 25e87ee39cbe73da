"""Attention variants: each equals dense attention with its mask (values and gradients), leaks nothing, decodes with a cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.layers.attention import MultiHeadAttention, dot_product_attention, get_attention
from transformers_howfar.layers.blockwise import AttentionPattern
from transformers_howfar.layers.variants import (KVCompression, LocalPattern, SparsePattern, SSMaxScale, compress_kv, local_attention,
                                                    memory_compressed_attention, sparse_attention, ssmax_attention, visible_keys)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def qkv(T, B=2, N=4, K=2, H=8, seed=0):
    return rand(B, T, N, H, seed=seed), rand(B, T, K, H, seed=seed + 1), rand(B, T, K, H, seed=seed + 2)


def same_as_dense(fn, mask, q, k, v, pad, atol=3e-5):
    dense = lambda q, k, v: dot_product_attention(q, k, v, padding_mask=pad, mask=mask[None, None])
    np.testing.assert_allclose(fn(q, k, v), dense(q, k, v), atol=atol)
    loss = lambda f: (lambda *a: jnp.sum(jnp.cos(f(*a))))
    for a, b in zip(jax.grad(loss(fn), (0, 1, 2))(q, k, v), jax.grad(loss(dense), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=atol)


def no_leak(fn, q, k, v, t):
    q2, k2, v2 = (x.at[:, t + 1:].set(7.0) for x in (q, k, v))
    np.testing.assert_allclose(fn(q, k, v)[:, :t + 1], fn(q2, k2, v2)[:, :t + 1], atol=1e-5)
    for g in jax.grad(lambda q, k, v: fn(q, k, v)[:, :t + 1].sum(), (0, 1, 2))(q, k, v):
        assert float(jnp.abs(g[:, t + 1:]).max()) == 0.0


@pytest.mark.parametrize('T,C,back,ahead,causal', [(37, 8, 1, 0, True), (40, 8, 2, 1, False), (24, 4, 1, 2, True)])
def test_local_equals_dense_with_mask(T, C, back, ahead, causal):
    q, k, v = qkv(T, seed=T)
    pad = jnp.asarray(np.random.default_rng(T).random((2, T)) > 0.2)
    pos = jnp.arange(T)
    fn = lambda q, k, v: local_attention(q, k, v, block_size=C, look_back=back, look_ahead=ahead, causal=causal, padding_mask=pad)
    same_as_dense(fn, LocalPattern(causal, C, back, ahead).dense_mask(pos, pos), q, k, v, pad)


def test_local_mask_is_the_paper_pattern():
    m = np.asarray(LocalPattern(True, 4).dense_mask(jnp.arange(12), jnp.arange(12)))
    assert m[9].tolist() == [False] * 4 + [True] * 6 + [False] * 2  # query 9 (block 2) sees blocks 1 and 2 up to itself
    assert m[4].tolist() == [True] * 5 + [False] * 7


@pytest.mark.parametrize('stride,causal', [(3, True), (3, False), (2, True)])
def test_memory_compressed_equals_dense_on_summaries(stride, causal):
    T = 23
    q, k, v = qkv(T, seed=stride)
    pad = jnp.asarray(np.random.default_rng(stride).random((2, T)) > 0.2)
    kk, kv_ = rand(stride, 2, 8, 8, seed=11) / 4, rand(stride, 2, 8, 8, seed=12) / 4
    def by_hand(q, k, v):
        kc, valid, pos = compress_kv(k, kk, stride=stride, padding_mask=pad)
        vc = compress_kv(v, kv_, stride=stride, padding_mask=pad)[0]
        mask = (pos[None, :] <= jnp.arange(T)[:, None]) if causal else jnp.ones((T, kc.shape[1]), bool)
        return dot_product_attention(q, kc, vc, padding_mask=valid, mask=mask[None, None])
    fn = lambda q, k, v: memory_compressed_attention(q, k, v, kernel_k=kk, kernel_v=kv_, stride=stride, causal=causal, padding_mask=pad, block_q=8, block_kv=4)
    np.testing.assert_allclose(fn(q, k, v), by_hand(q, k, v), atol=2e-5)
    for a, b in zip(jax.grad(lambda *a: fn(*a).sum(), (0, 1, 2))(q, k, v), jax.grad(lambda *a: by_hand(*a).sum(), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=3e-5)


def test_compress_kv_is_a_strided_convolution():
    x = rand(1, 9, 1, 2)
    w = rand(3, 1, 2, 2, seed=4)
    y, valid, pos = compress_kv(x, w)
    ref = jax.lax.conv_general_dilated(x[:, :, 0], w[:, 0], window_strides=(3,), padding='VALID', dimension_numbers=('NWC', 'WIO', 'NWC'))
    np.testing.assert_allclose(y[:, :, 0], ref, atol=1e-5)
    assert pos.tolist() == [2, 5, 8] and bool(valid.all())


@pytest.mark.parametrize('kind,causal,stride,summary', [('fixed', True, 8, 2), ('fixed', False, 4, 1), ('strided', True, 8, 2),
                                                        ('strided', False, 16, 4)])
def test_sparse_equals_dense_with_mask(kind, causal, stride, summary):
    T = 45
    q, k, v = qkv(T, seed=stride)
    pad = jnp.asarray(np.random.default_rng(stride + 1).random((2, T)) > 0.2)
    pos = jnp.arange(T)
    fn = lambda q, k, v: sparse_attention(q, k, v, pattern=kind, stride=stride, summary=summary, causal=causal, padding_mask=pad)
    same_as_dense(fn, SparsePattern(causal, kind, stride, summary).dense_mask(pos, pos), q, k, v, pad)


def test_sparse_masks_are_the_paper_patterns():
    pos = jnp.arange(16)
    fixed = np.asarray(SparsePattern(True, 'fixed', 4, 1).dense_mask(pos, pos))
    assert np.flatnonzero(fixed[10]).tolist() == [3, 7, 8, 9, 10]  # summaries 3, 7 and its own block
    strided = np.asarray(SparsePattern(True, 'strided', 4).dense_mask(pos, pos))
    assert np.flatnonzero(strided[10]).tolist() == [2, 6, 7, 8, 9, 10]  # every 4th back, and the last 4


@pytest.mark.parametrize('fn', [
    lambda q, k, v: local_attention(q, k, v, block_size=8, causal=True),
    lambda q, k, v: memory_compressed_attention(q, k, v, causal=True),
    lambda q, k, v: sparse_attention(q, k, v, stride=8, summary=2, causal=True),
    lambda q, k, v: sparse_attention(q, k, v, pattern='strided', stride=8, causal=True),
], ids=['local', 'memory_compressed', 'sparse_fixed', 'sparse_strided'])
@pytest.mark.parametrize('t', [13])
def test_causal_variants_do_not_leak(fn, t):
    no_leak(fn, *qkv(37, seed=t), t)


@pytest.mark.parametrize('name,options', [('local', {'block_size': 4}), ('memory_compressed', {}), ('sparse', {'stride': 4, 'summary': 1}),
                                          ('sparse', {'pattern': 'strided', 'stride': 4}), ('ssmax', {'s_init': 0.45})])
def test_cached_decoding_equals_full_forward(name, options):
    layer = MultiHeadAttention(16, 4, n_kv_heads=2, attention=name, attention_options=options, causal=True, rngs=nnx.Rngs(0))
    x = rand(2, 11, 16, seed=3)
    full = layer(x)
    y0, cache = layer.decode(x[:, :5], layer.init_cache(2, 14))  # a prompt, then one token at a time
    ys = [y0]
    for t in range(5, 11):
        y, cache = layer.decode(x[:, t:t + 1], cache); ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), full, atol=1e-5)


def test_memory_compressed_module_has_learned_taps_with_gradients():
    layer = MultiHeadAttention(16, 2, attention='memory_compressed', causal=True, rngs=nnx.Rngs(0))
    assert isinstance(layer.extra, KVCompression) and layer.extra.kernel_k.shape == (3, 2, 8, 8)
    x = rand(1, 12, 16)
    grads = nnx.grad(lambda m: m(x).sum())(layer)
    assert float(jnp.abs(grads.extra.kernel_k[...]).sum()) > 0


def test_registry_names():
    for name in ('local', 'memory_compressed', 'sparse', 'ssmax'):
        assert get_attention(name).doc


@pytest.mark.parametrize('call,msg', [
    (lambda q, k, v: local_attention(q, k, v, block_size=0), 'block_size: expected a whole number > 0'),
    (lambda q, k, v: local_attention(q, k, v, look_ahead=-1), 'look_ahead: expected a whole number >= 0'),
    (lambda q, k, v: sparse_attention(q, k, v, pattern='dilated'), "pattern: expected one of ['fixed', 'strided']"),
    (lambda q, k, v: sparse_attention(q, k, v, stride=4, summary=0), 'summary: expected a number in [1, stride = 4]'),
    (lambda q, k, v: memory_compressed_attention(q, k, v, stride=0), 'stride: expected a whole number > 0'),
    (lambda q, k, v: ssmax_attention(q, k, v, s=jnp.ones(4)), 's: expected'),
    (lambda q, k, v: memory_compressed_attention(q, k, v, kernel_k=jnp.zeros((2, 2, 8, 8))), 'kernel: expected shape (3, K, H, H)'),
])
def test_errors_name_the_argument(call, msg):
    import re
    with pytest.raises(ValueError, match=re.escape(msg)):
        call(*qkv(12))


def test_dropout_in_a_variant_is_reproducible():
    q, k, v = qkv(24)
    f = lambda key: local_attention(q, k, v, block_size=8, causal=True, dropout_rate=0.2, dropout_key=key)
    np.testing.assert_array_equal(f(jax.random.key(0)), f(jax.random.key(0)))
    assert float(jnp.abs(f(jax.random.key(0)) - f(jax.random.key(1))).max()) > 1e-3


@pytest.mark.parametrize('causal', [False, True])
def test_ssmax_is_dense_attention_on_queries_scaled_by_s_log_n(causal):
    q, k, v = qkv(10, seed=5)
    pad = jnp.asarray(np.random.default_rng(5).random((2, 10)) > 0.4).at[:, 0].set(True)
    s = jnp.asarray([0.2, 0.7])
    n = np.array([[max(1, sum((not causal or j <= i) and bool(pad[b, j]) for j in range(10))) for i in range(10)] for b in range(2)])
    np.testing.assert_array_equal(visible_keys(2, 10, 10, padding_mask=pad, causal=causal), n)
    scaled = q * (np.log(n)[:, :, None, None] * np.repeat(np.asarray(s), 2)[None, None, :, None])
    same = lambda q, k, v: ssmax_attention(q, k, v, s=s, causal=causal, padding_mask=pad)
    np.testing.assert_allclose(same(q, k, v), dot_product_attention(scaled, k, v, causal=causal, padding_mask=pad), atol=3e-5)
    g = jax.grad(lambda s_: ssmax_attention(q, k, v, s=s_, causal=causal, padding_mask=pad).sum())(s)
    assert g.shape == (2,) and bool(jnp.all(jnp.isfinite(g)))


def test_ssmax_keeps_a_matching_key_sharp_as_distractors_grow():
    "Key 3 matches the query with logit 3, the others are random with logits in [-0.75, 0.75]: the plain softmax weight on key 3 falls with length, SSMax's (s = 0.6) rises."
    def weight_on_match(T, s):
        k = np.random.default_rng(T).normal(size=(1, T, 1, 16))
        k = 0.5 * k / np.linalg.norm(k, axis=-1, keepdims=True)  # distractors: |q.k| / 4 <= 0.75
        k[0, 3, 0] = 0.0; k[0, 3, 0, 0] = 2.0
        q = jnp.zeros((1, 1, 1, 16)).at[..., 0].set(6.0)  # logit of key 3: 6 * 2 / sqrt(16) = 3
        v = jnp.zeros((1, T, 1, 16)).at[0, 3, 0, 0].set(1.0)  # the output's first entry is the weight on key 3
        k = jnp.asarray(k, jnp.float32)
        out = dot_product_attention(q, k, v) if s is None else ssmax_attention(q, k, v, s=jnp.asarray([s]))
        return float(out[0, 0, 0, 0])
    plain = [weight_on_match(T, None) for T in (64, 4096)]
    ssmax = [weight_on_match(T, 0.6) for T in (64, 4096)]
    assert plain[1] < plain[0] / 10
    assert ssmax[1] > ssmax[0] > plain[0]


def test_ssmax_scale_is_learned_per_kv_head():
    layer = MultiHeadAttention(16, 4, n_kv_heads=2, attention='ssmax', causal=True, rngs=nnx.Rngs(0))
    assert isinstance(layer.extra, SSMaxScale) and layer.extra.s.shape == (2,)
    grads = nnx.grad(lambda m: (m(rand(1, 12, 16)) ** 2).sum())(layer)
    assert float(jnp.abs(grads.extra.s[...]).sum()) > 0
