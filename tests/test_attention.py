"""Attention: dense reference, exact memory-efficient kernel (values and gradients), KV cache, registry, module."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.layers.attention import (ATTENTION, KVCache, MultiHeadAttention, attention_weights, capture_weights,
                                                  dot_product_attention, format_attention_options, get_attention,
                                                  parse_attention_options, register_attention)
from transformers_howfar.layers.blockwise import FullPattern, blockwise_attention, memory_efficient_attention


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def qkv(B=2, T=19, S=None, N=4, K=2, H=8, seed=0):
    S = S or T
    return rand(B, T, N, H, seed=seed), rand(B, S, K, H, seed=seed + 1), rand(B, S, K, H, seed=seed + 2)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('K', [1, 2, 4])
def test_dense_matches_jax_nn(causal, K):
    q, k, v = qkv(K=K)
    pad = jnp.asarray(np.random.default_rng(3).random((2, 19)) > 0.3).at[:, 0].set(True)
    ours = dot_product_attention(q, k, v, causal=causal, padding_mask=pad)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal, mask=pad[:, None, None, :])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_weights_rows_sum_to_one_or_zero():
    q, k, _ = qkv()
    pad = jnp.zeros((2, 19), bool).at[0, :5].set(True)
    w = attention_weights(q, k, padding_mask=pad)
    assert w.shape == (2, 4, 19, 19)
    np.testing.assert_allclose(w.sum(-1)[0], 1, atol=1e-5)
    assert float(jnp.abs(w[1]).max()) == 0.0  # an all-padding row attends to nothing


@pytest.mark.parametrize('fn', [dot_product_attention, memory_efficient_attention])
def test_fully_masked_rows_are_zero_with_finite_gradients(fn):
    q, k, v = qkv()
    pad = jnp.zeros((2, 19), bool).at[0].set(True)
    out = fn(q, k, v, padding_mask=pad)
    assert float(jnp.abs(out[1]).max()) == 0.0
    grads = jax.grad(lambda q, k, v: fn(q, k, v, padding_mask=pad).sum(), (0, 1, 2))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


CASES = [  # T, S, block_q, block_kv, causal, bias batch/head shape
    (19, 19, 8, 8, True, None), (19, 19, 8, 8, False, (1, 1)), (33, 50, 16, 8, True, (2, 4)),
    (33, 50, 8, 16, False, (1, 4)), (64, 64, 16, 16, True, (2, 1)), (7, 40, 256, 256, True, None),
]


@pytest.mark.parametrize('T,S,bq,bk,causal,bias_shape', CASES)
def test_memory_efficient_equals_dense_values_and_gradients(T, S, bq, bk, causal, bias_shape):
    q, k, v = qkv(T=T, S=S)
    pad = jnp.asarray(np.random.default_rng(T).random((2, S)) > 0.25)
    bias = None if bias_shape is None else rand(*bias_shape, T, S, seed=9)
    args = (q, k, v) + (() if bias is None else (bias,))
    def dense(q, k, v, b=None): return dot_product_attention(q, k, v, causal=causal, padding_mask=pad, bias=b)
    def blocks(q, k, v, b=None): return memory_efficient_attention(q, k, v, causal=causal, padding_mask=pad, bias=b, block_q=bq, block_kv=bk)
    np.testing.assert_allclose(blocks(*args), dense(*args), atol=2e-5)
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
    argnums = tuple(range(len(args)))
    for g1, g2 in zip(jax.grad(loss(blocks), argnums)(*args), jax.grad(loss(dense), argnums)(*args)):
        np.testing.assert_allclose(g1, g2, atol=5e-5)


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 24), S=st.integers(1, 24), causal=st.booleans(), bq=st.sampled_from([8, 16]), bk=st.sampled_from([8, 16]))
def test_memory_efficient_property(T, S, causal, bq, bk):
    q, k, v = qkv(B=1, T=T, S=S, N=2, K=1, H=4, seed=T * 31 + S)
    np.testing.assert_allclose(memory_efficient_attention(q, k, v, causal=causal, block_q=bq, block_kv=bk),
                               dot_product_attention(q, k, v, causal=causal), atol=2e-5)


def test_memory_efficient_dropout_is_consistent_and_changes_output():
    q, k, v = qkv(B=1, T=16, N=2, K=2)
    f = lambda key: memory_efficient_attention(q, k, v, causal=True, dropout_rate=0.3, dropout_key=key, block_q=8, block_kv=8)
    np.testing.assert_array_equal(f(jax.random.key(1)), f(jax.random.key(1)))
    assert float(jnp.abs(f(jax.random.key(1)) - f(jax.random.key(2))).max()) > 1e-3
    from jax.test_util import check_grads
    check_grads(lambda q, k, v: memory_efficient_attention(q, k, v, dropout_rate=0.3, dropout_key=jax.random.key(1), block_q=8, block_kv=8),
                (q, k, v), order=1, modes=['rev'], atol=2e-2, rtol=2e-2)


def test_memory_efficient_temporaries_grow_linearly():
    def temp(T):
        x = jnp.zeros((1, T, 2, 16))
        g = jax.jit(jax.grad(lambda q, k, v: memory_efficient_attention(q, k, v, causal=True, block_q=64, block_kv=64).sum(), (0, 1, 2)))
        return g.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
    a, b = temp(1024), temp(4096)
    assert b < 6 * a  # quadratic would be 16x


@pytest.mark.parametrize('bad,msg', [
    (dict(block_q=0), 'block_q: expected a whole number > 0'),
    (dict(dropout_rate=1.0), 'dropout_rate: expected a number in [0, 1)'),
    (dict(dropout_rate=0.1), 'dropout_key: expected a PRNG key'),
    (dict(padding_mask=jnp.ones((2, 5), bool)), 'padding_mask: expected shape (B, S)'),
    (dict(bias=jnp.zeros((3, 1, 19, 19))), 'bias: expected a shape broadcastable to (B, N, T, S)'),
    (dict(bias=jnp.zeros((1, 1, 19, 7))), 'bias: expected a shape broadcastable to (B, N, T, S)'),
])
def test_memory_efficient_errors(bad, msg):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[').replace('|', r'\|')):
        memory_efficient_attention(q, k, v, **bad)


def test_segments_must_sum_to_length():
    q, k, v = qkv()
    with pytest.raises(ValueError, match='segments: expected 1 lengths summing to S = 19'):
        blockwise_attention(q, k, v, segments=(10, 9))


def test_kv_cache_update_and_pytree():
    c = KVCache.zeros(1, 5, 2, 3)
    c = c.update(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3)))
    assert int(c.index) == 2 and float(c.k[0, 2:].sum()) == 0.0
    leaves, tree = jax.tree_util.tree_flatten(c)
    assert jax.tree_util.tree_unflatten(tree, leaves).max_len == 5
    with pytest.raises(ValueError, match='max_len: expected a whole number > 0'):
        KVCache.zeros(1, 0, 2, 3)


@pytest.mark.parametrize('kind', ['full', 'chunked'])
@pytest.mark.parametrize('K', [1, 4])
def test_cached_decoding_in_while_loop_equals_full_forward(kind, K):
    layer = MultiHeadAttention(16, 4, n_kv_heads=K, causal=True, attention=kind, rngs=nnx.Rngs(0))
    x = rand(2, 9, 16, seed=5)
    @nnx.jit
    def decode(layer, x):
        def step(s):
            t, cache, ys = s
            y, cache = layer.decode(jax.lax.dynamic_slice_in_dim(x, t, 1, 1), cache)
            return t + 1, cache, jax.lax.dynamic_update_slice_in_dim(ys, y, t, 1)
        return jax.lax.while_loop(lambda s: s[0] < x.shape[1], step, (0, layer.init_cache(2, 12), jnp.zeros_like(x)))[2]
    np.testing.assert_allclose(decode(layer, x), layer(x), atol=1e-5)


def test_cross_attention_with_padding_and_precomputed_kv():
    layer = MultiHeadAttention(16, 2, rngs=nnx.Rngs(1))
    x, ctx = rand(2, 4, 16, seed=1), rand(2, 6, 16, seed=2)
    pad = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
    out = layer(x, ctx, padding_mask=pad)
    assert out.shape == (2, 4, 16)
    np.testing.assert_allclose(out, layer(x, kv=layer.project_kv(ctx), padding_mask=pad), atol=1e-6)
    # padded context positions do not matter
    ctx2 = ctx.at[1, 3:].set(100.0)
    np.testing.assert_allclose(layer(x, ctx2, padding_mask=pad)[1], out[1], atol=1e-5)


def test_module_regression_value():
    layer = MultiHeadAttention(8, 2, causal=True, rngs=nnx.Rngs(42))
    x = jnp.arange(2 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 8) / 10
    out = layer(x)
    np.testing.assert_allclose(float(out.sum()), REGRESSION_SUM, rtol=1e-4)


REGRESSION_SUM = -45.51581573486328  # flax 0.12.8 initialisers, jax 0.10.2


def test_registry_and_module_errors():
    assert {'full', 'chunked'} <= set(ATTENTION)
    assert get_attention('sparse').name == 'sparse'  # imported on demand
    with pytest.raises(ValueError, match="attention: expected one of"):
        MultiHeadAttention(8, 2, attention='nope', rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='n_heads: expected a multiple of n_kv_heads = 3'):
        MultiHeadAttention(12, 4, n_kv_heads=3, rngs=nnx.Rngs(0))
    register_attention('test_double', lambda q, k, v, **kw: 2 * dot_product_attention(q, k, v, **kw), 'twice full attention')
    try:
        a = MultiHeadAttention(8, 2, attention='test_double', rngs=nnx.Rngs(0))
        b = MultiHeadAttention(8, 2, attention='full', rngs=nnx.Rngs(0))
        x = rand(1, 3, 8)
        np.testing.assert_allclose(a(x), 2 * b(x), atol=1e-5)  # same parameters, the registered function is used
    finally:
        ATTENTION.pop('test_double')


@pytest.mark.slow
def test_bench_attention_quick_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != 'HOWFAR_TORCH_PYTHON'}
    howfar = Path(sys.executable).parent / 'howfar'
    r = subprocess.run([str(howfar), 'bench', 'attention', '--quick', '--out', str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    records = json.loads((tmp_path / 'attention.json').read_text())
    kinds = {x['config']['kind'] for x in records}
    assert kinds == {'jax_dense', 'chunked', 'local'}
    assert all(x['value'] is not None and x['value'] > 0 for x in records)


@pytest.mark.parametrize('kind', ['full', 'chunked'])
@pytest.mark.parametrize('K', [1, 2])
def test_captured_weights_reproduce_the_output(kind, K):
    layer = MultiHeadAttention(16, 4, n_kv_heads=K, attention=kind, causal=True, rngs=nnx.Rngs(3))
    x, pad = rand(2, 9, 16, seed=5), jnp.arange(9)[None] < jnp.array([[9], [6]])
    y, sown = capture_weights(layer, x, padding_mask=pad)
    (w,) = sown[()]
    assert w.shape == (2, 4, 9, 9)
    np.testing.assert_array_equal(y, layer(x, padding_mask=pad))  # asking for the weights changes nothing else
    assert float(jnp.triu(w, 1).max()) == 0.0 and float(w[1, :, :, 6:].max()) == 0.0
    v = jnp.repeat(layer.v(x), 4 // K, axis=2)
    np.testing.assert_allclose(layer.out(jnp.einsum('bnts,bsnh->btnh', w, v)), y, atol=1e-5)


@pytest.mark.parametrize('kind', ['lsh', 'local', 'memory_compressed', 'sparse'])
def test_weights_refused_by_kinds_without_weights(kind):
    layer = MultiHeadAttention(16, 4, attention=kind, causal=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"model: attention kind '{kind}' never builds"):
        capture_weights(layer, rand(1, 8, 16))


def test_attention_options_parse_and_format():
    entries = format_attention_options('lsh', n_rounds=2, n_buckets=(4, 8), chunk_length=16) + ('local.block_size=64',)
    assert entries == ('lsh.chunk_length=16', 'lsh.n_buckets=[4, 8]', 'lsh.n_rounds=2', 'local.block_size=64')
    assert parse_attention_options(entries, ('lsh', 'local')) == {'lsh': {'chunk_length': 16, 'n_buckets': (4, 8), 'n_rounds': 2},
                                                                   'local': {'block_size': 64}}
    assert parse_attention_options(('lsh.n_buckets=null', 'lsh.correct_duplicates=true')) == {'lsh': {'n_buckets': None, 'correct_duplicates': True}}


@pytest.mark.parametrize('entries, message', [
    ('local.block_size=64', "expected a tuple of 'kind.option=value'"),
    (('local:block_size=64',), "expected 'kind.option=value'"),
    ((64,), "expected 'kind.option=value'"),
    (('fast.x=1',), "names an unknown kind"),
    (('local.window=3',), "'local' takes no option 'window'"),
    (('full.padding_mask=null',), "'full' takes no option 'padding_mask'"),
    (('local.block_size=4', 'local.block_size=8'), 'local.block_size is given twice'),
])
def test_attention_options_errors(entries, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_attention_options(entries)
    assert str(err.value).startswith('attention_options: ')


def test_attention_options_reach_the_kind():
    layer = MultiHeadAttention(16, 4, attention='local', attention_options=parse_attention_options(('local.block_size=4',))['local'],
                               causal=True, rngs=nnx.Rngs(0))
    x = rand(1, 12, 16, seed=2)
    t = jnp.arange(12)
    mask = (t[None, :] <= t[:, None]) & (t[None, :] // 4 >= t[:, None] // 4 - 1)  # own block and the one before
    q, k, v = layer.q(x), layer.k(x), layer.v(x)
    np.testing.assert_allclose(layer(x), layer.out(dot_product_attention(q, k, v, mask=mask[None, None])), atol=1e-5)


def test_builtin_kinds_load_their_module_in_a_fresh_process():
    "A process that imports only layers.attention gets every built-in kind by name: the table imports its module."
    code = ('import sys\nfrom transformers_howfar.layers.attention import get_attention\n'
            "assert 'transformers_howfar.layers.blockwise' not in sys.modules\n"
            "print(get_attention('chunked').fn.__module__)\n"
            "for name in ('local', 'memory_compressed', 'sparse', 'ssmax', 'lsh'): get_attention(name)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['transformers_howfar.layers.blockwise']


@pytest.mark.parametrize('bad', [dict(mask=jnp.ones((1, 1, 5, 5), bool)), dict(mask=jnp.ones((19, 19), bool)),
                                 dict(bias=jnp.zeros((1, 3, 1, 19))), dict(bias=jnp.zeros((19, 19)))])
def test_a_mask_or_bias_of_the_wrong_shape_is_named(bad):
    q, k, v = qkv()
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f'^{name}: expected a shape broadcastable to'):
        dot_product_attention(q, k, v, **bad)
