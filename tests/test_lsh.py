"Tests of transformers_howfar.layers.lsh: hashing, LSH attention against its O(T²) reference, gradients, causality, module."
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from transformers_howfar.core import make_key
from transformers_howfar.layers.lsh import LSHSelfAttention, lsh_attention, lsh_block_plan, lsh_multiplicity, lsh_sort_orders
from transformers_howfar.layers.hashing import auto_buckets, collision_probability, hash_vectors, shared_qk_attention


def _data(B=2, T=100, N=2, H=8, dtype=jnp.float32, seed=1):
    return (jax.random.normal(make_key(seed), (B, T, N, H), dtype), jax.random.normal(make_key(seed + 1), (B, T, N, H), dtype))


def _reference_check(T, C, R, causal, correct, pad, nb, block, B=2, N=2, H=8, grads=True):
    qk, v = _data(B, T, N, H)
    pm = (jnp.arange(T)[None] < jnp.array([T] + [max(1, T - 29)] * (B - 1))[:, None]) if pad else None
    kw = dict(key=make_key(3), n_rounds=R, chunk_length=C, n_buckets=nb, causal=causal, correct_duplicates=correct,
              padding_mask=pm, dense_threshold=0, block_length=block)
    _, _, padded_length = lsh_block_plan(T, C, block)
    _, undos = lsh_sort_orders(qk, key=make_key(3), n_rounds=R, n_buckets=nb, padded_length=padded_length, padding_mask=pm)
    M = lsh_multiplicity(undos, C, T, B, N, correct)
    real = 1.0 if pm is None else pm[:, :, None, None]
    f = lambda a, b: lsh_attention(a, b, **kw) * real
    g = lambda a, b: shared_qk_attention(a, b, causal=causal, padding_mask=pm, multiplicity=M) * real
    np.testing.assert_allclose(f(qk, v), g(qk, v), atol=2e-5)
    if grads:
        w = jax.random.normal(make_key(9), qk.shape)
        ga = jax.grad(lambda a, b: (f(a, b) * w).sum(), (0, 1))(qk, v)
        gb = jax.grad(lambda a, b: (g(a, b) * w).sum(), (0, 1))(qk, v)
        for a, b in zip(ga, gb): np.testing.assert_allclose(a, b, atol=1e-4)
    return M


@pytest.mark.parametrize('causal,R,correct,pad', [(False, 1, False, False), (True, 2, True, True), (True, 4, False, False),
                                                  (False, 3, True, True)])
def test_equals_reference_sweep(causal, R, correct, pad):
    _reference_check(T=123, C=8, R=R, causal=causal, correct=correct, pad=pad, nb=(4, 4), block=32)


@pytest.mark.parametrize('T,C,block,nb', [(64, 16, 16, 8), (77, 16, 48, 6), (200, 32, 2048, (2, 4, 2))])
def test_lengths_chunks_blocks(T, C, block, nb):
    "Lengths that are not multiples of the chunk or block, one block or many, factorised buckets."
    _reference_check(T=T, C=C, R=3, causal=True, correct=False, pad=True, nb=nb, block=block, grads=T == 77)


def test_duplicates_counted_once_with_correction():
    M = _reference_check(T=96, C=8, R=4, causal=False, correct=False, pad=False, nb=4, block=32, grads=False)
    assert int(M.max()) == 4  # with few buckets, keys recur across rounds ...
    Mc = _reference_check(T=96, C=8, R=4, causal=False, correct=True, pad=False, nb=4, block=32, grads=False)
    assert int(Mc.max()) == 1  # ... and the correction counts each once


@pytest.mark.parametrize('causal', [False, True])
def test_one_bucket_whole_chunk_equals_dense(causal):
    qk, v = _data(T=40)
    kw = dict(key=make_key(0), n_buckets=1, chunk_length=40, dense_threshold=0, causal=causal)
    np.testing.assert_allclose(lsh_attention(qk, v, **kw), shared_qk_attention(qk, v, causal=causal), atol=1e-5)
    w = jax.random.normal(make_key(5), qk.shape)
    ga = jax.grad(lambda a, b: (lsh_attention(a, b, **kw) * w).sum(), (0, 1))(qk, v)
    gb = jax.grad(lambda a, b: (shared_qk_attention(a, b, causal=causal) * w).sum(), (0, 1))(qk, v)
    for a, b in zip(ga, gb): np.testing.assert_allclose(a, b, atol=1e-5)


def test_dense_reference_matches_project_dot_product_attention():
    "Non-causal shared-QK attention = dot_product_attention(q, k/|k|, v) with the diagonal at -1e5."
    from transformers_howfar.layers.attention import dot_product_attention
    qk, v = _data(T=30)
    k = qk * jax.lax.rsqrt((qk * qk).sum(-1, keepdims=True) + 1e-6)
    bias = jnp.where(jnp.eye(30, dtype=bool), -1e5, 0.0)[None, None]
    np.testing.assert_allclose(shared_qk_attention(qk, v), dot_product_attention(qk, k, v, bias=bias), atol=1e-5)


def test_check_grads():
    qk, v = _data(B=1, T=40, N=2, H=4)
    f = lambda a, b: lsh_attention(a, b, key=make_key(5), n_rounds=2, chunk_length=8, n_buckets=4, causal=True,
                                   correct_duplicates=True, dense_threshold=0)
    check_grads(f, (qk, v), order=1, modes=['rev'], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('t', [0, 31, 62])
def test_causal_no_gradient_from_future(t):
    qk, v = _data(B=1, T=64)
    f = lambda a, b: lsh_attention(a, b, key=make_key(6), n_rounds=4, chunk_length=8, causal=True, dense_threshold=0)[0, t].sum()
    gq, gv = jax.grad(f, (0, 1))(qk, v)
    assert float(jnp.abs(gq[0, t + 1:]).max(initial=0)) == 0.0 and float(jnp.abs(gv[0, t + 1:]).max(initial=0)) == 0.0
    assert float(jnp.abs(gv[0, :t + 1]).max()) > 0


def test_non_causal_does_see_the_future():
    "The leak test can fail: without the causal mask, future tokens get gradient."
    qk, v = _data(B=1, T=64)
    f = lambda b: lsh_attention(qk, b, key=make_key(6), chunk_length=8, n_buckets=2, dense_threshold=0)[0, 5].sum()
    assert float(jnp.abs(jax.grad(f)(v)[0, 6:]).max()) > 0


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fully_masked_rows_finite(dtype):
    qk, v = _data(T=40, dtype=dtype)
    pm = jnp.stack([jnp.zeros(40, bool), jnp.arange(40) < 3])
    f = lambda a, b: lsh_attention(a, b, key=make_key(3), chunk_length=8, causal=True, padding_mask=pm, dense_threshold=0)
    out = f(qk, v)
    assert out.dtype == dtype and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    for g in jax.grad(lambda a, b: f(a, b).astype(jnp.float32).sum(), (0, 1))(qk, v):
        assert bool(jnp.isfinite(g.astype(jnp.float32)).all())
    dense = shared_qk_attention(qk, v, causal=True, padding_mask=pm)  # the dense fallback too
    assert bool(jnp.isfinite(dense.astype(jnp.float32)).all())


def test_position_zero_attends_to_itself():
    qk, v = _data(T=64)
    out = lsh_attention(qk, v, key=make_key(2), n_rounds=4, chunk_length=8, causal=True, dense_threshold=0)
    np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-5)


def test_replay_and_fresh_keys_and_rounds():
    qk, v = _data(T=300)
    f = lambda key, R: lsh_attention(qk, v, key=key, n_rounds=R, chunk_length=16, causal=True)
    np.testing.assert_array_equal(f(make_key(1), 2), f(make_key(1), 2))
    assert float(jnp.abs(f(make_key(1), 2) - f(make_key(2), 2)).max()) > 1e-3
    assert f(make_key(1), 8).shape == qk.shape
    jitted = jax.jit(f, static_argnums=1)
    np.testing.assert_allclose(jitted(make_key(1), 2), f(make_key(1), 2), atol=1e-6)


def test_hash_regression_values():
    "Fixed seed, fixed buckets: the hash stays what the docs show (threefry keys are stable across JAX versions)."
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    b = hash_vectors(x, 8, make_key(0), n_rounds=2)
    assert b.shape == (2, 6)
    b2 = hash_vectors(x, 8, make_key(0), n_rounds=2)
    np.testing.assert_array_equal(b, b2)
    assert REGRESSION_BUCKETS == np.asarray(b).tolist()


REGRESSION_BUCKETS = [[1, 1, 5, 2, 1, 7], [0, 0, 4, 4, 2, 3]]


def test_sort_path_for_large_bucket_counts_is_stable():
    "Above 2^31 the argsort path is used; both paths give the same (bucket, position) order."
    x = jax.random.normal(make_key(0), (96, 8))
    valid = jnp.arange(96) < 90
    # one slice (B = N = 1, slice 0) through the combined-key sort path
    orders, _ = lsh_sort_orders(x[None, :, None], key=make_key(1), n_rounds=2, n_buckets=(4, 4), padded_length=96,
                                padding_mask=valid[None])
    b = hash_vectors(x, (4, 4), jax.random.fold_in(make_key(1), 0), 2)
    b = jnp.where(valid[None], b, 16)
    np.testing.assert_array_equal(orders[0], jnp.argsort(b, axis=-1, stable=True))


def test_collision_probability_two_buckets_theory():
    theta = np.linspace(0, np.pi, 7)
    np.testing.assert_allclose(collision_probability(theta, 2, make_key(4), n_trials=4000), 1 - theta / np.pi, atol=0.04)


def test_auto_buckets():
    assert auto_buckets(65536, 64) == (64, 32) and auto_buckets(2**20, 64) == (32, 32, 32)
    assert math.prod(auto_buckets(12345, 64, max_factor=8)) == 256 and max(auto_buckets(12345, 64, max_factor=8)) <= 8


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(T=st.integers(9, 90), C=st.sampled_from([4, 8, 16]), R=st.integers(1, 3), causal=st.booleans())
def test_property_matches_reference(T, C, R, causal):
    _reference_check(T=T, C=C, R=R, causal=causal, correct=False, pad=False, nb=(2, 4), block=32, B=1, N=1, grads=False)


@pytest.mark.parametrize('bad,msg', [
    (dict(n_rounds=0), 'n_rounds: expected a whole number > 0'),
    (dict(chunk_length=0), 'chunk_length: expected a whole number > 0'),
    (dict(n_buckets=3), 'n_buckets: expected even'),
    (dict(padding_mask=jnp.ones((2, 5), bool)), 'padding_mask'),
])
def test_errors(bad, msg):
    qk, v = _data(T=50)
    with pytest.raises(ValueError, match=msg):
        lsh_attention(qk, v, **{'key': make_key(0), 'dense_threshold': 0, **bad})


def test_module_and_registry_in_a_model():
    from transformers_howfar.models.lm import LM, LMConfig
    layer = LSHSelfAttention(32, 4, causal=True, chunk_length=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(make_key(0), (2, 50, 32))
    np.testing.assert_array_equal(layer(x, key=make_key(1)), layer(x, key=make_key(1)))
    with pytest.raises(ValueError, match='context'): layer(x, context=x)
    cfg = LMConfig.tiny().replace(attention=('lsh', 'local'), max_len=256)
    model = LM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(make_key(2), (2, 200), 0, cfg.vocab_size)
    logits = model(tokens)
    assert logits.shape == (2, 200, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
    grads = nnx.grad(lambda m: m(tokens).mean())(model)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


class _TinyLSHModel(nnx.Module):
    "Embedding, one residual LSH self-attention layer, output projection: a model that uses the layer."
    def __init__(self, vocab, d, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = LSHSelfAttention(d, 4, causal=True, chunk_length=8, n_rounds=2, n_buckets=(4, 2), rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens, key=None, n_rounds=None):
        x = self.embed(tokens)
        return self.head(x + self.attn(x, key=key, n_rounds=n_rounds))


def test_module_under_jit():
    model = _TinyLSHModel(11, 32, nnx.Rngs(0))
    assert model.attn.n_buckets == (4, 2) and not any(isinstance(v, dict) for v in vars(model.attn).values())
    tokens = jax.random.randint(make_key(2), (2, 40), 0, 11)
    eager = model(tokens, key=make_key(1))
    graphdef, state = nnx.split(model)
    hash(graphdef)  # a dict attribute would make this raise: jax.jit needs a hashable static graph
    jitted = jax.jit(lambda s, t, k: nnx.merge(graphdef, s)(t, key=k))
    np.testing.assert_allclose(jitted(state, tokens, make_key(1)), eager, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, t, k: m(t, key=k))(model, tokens, make_key(1)), eager, atol=1e-5)
    # rounds changed at evaluation time, inside jit (static argument)
    r8 = nnx.jit(lambda m, t, k: m(t, key=k, n_rounds=8))(model, tokens, make_key(1))
    assert r8.shape == eager.shape and float(jnp.abs(r8 - eager).max()) > 0
    # a training step under nnx.jit, the hash key drawn from the layer's own stream (state updated in place)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    @nnx.jit
    def train_step(model, opt, tokens):
        loss, grads = nnx.value_and_grad(lambda m: -jax.nn.log_softmax(m(tokens))[..., 0].mean())(model)
        opt.update(model, grads)
        return loss
    count = int(model.attn.hash_rngs.lsh.count[...])
    losses = [float(train_step(model, opt, tokens)) for _ in range(3)]
    assert int(model.attn.hash_rngs.lsh.count[...]) == count + 3  # a fresh hash key on every jitted call
    assert losses[-1] < losses[0]



SHARDED = '''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from transformers_howfar.layers.lsh import lsh_attention, heads_mesh
from transformers_howfar.bench.lsh import lsh_layer_step
assert len(jax.devices()) == 2, jax.devices()
qk, v = jax.random.normal(jax.random.key(1), (2, 300, 3, 8)), jax.random.normal(jax.random.key(2), (2, 300, 3, 8))
pad = jnp.arange(300)[None] < jnp.array([[300], [250]])
f = lambda qk, v: lsh_attention(qk, v, key=jax.random.key(3), chunk_length=16, causal=True, padding_mask=pad, n_rounds=2)
loss = lambda qk, v: jnp.sin(f(qk, v)).sum()
ref, gref = jax.jit(f)(qk, v), jax.jit(jax.grad(loss, (0, 1)))(qk, v)
out = {'no_mesh': heads_mesh() is None}
with jax.set_mesh(Mesh(np.array(jax.devices()), ('heads',))):
    got, g = jax.jit(f)(qk, v), jax.jit(jax.grad(loss, (0, 1)))(qk, v)
    out['devices'] = len(got.sharding.device_set)
    try: lsh_attention(qk[:1, :, :1], v[:1, :, :1], key=jax.random.key(3), chunk_length=16); out['odd'] = 'no error'
    except ValueError as e: out['odd'] = str(e)
with jax.set_mesh(Mesh(np.array(jax.devices()), ('data',))):  # a mesh without a heads axis leaves the kernel alone
    out['other_axis_unsharded'] = heads_mesh() is None
out['diff'] = float(jnp.abs(got - ref).max())
out['grad_diff'] = max(float(jnp.abs(a - b).max()) for a, b in zip(g, gref))
one, two = lsh_layer_step(256, repeats=1), lsh_layer_step(256, devices=2, repeats=1)
out['step_values'] = [one['value'], two['value']]
print(json.dumps(out))
'''


@pytest.mark.slow
def test_heads_sharded_over_two_devices_equal_one_device():
    "With a `heads` mesh axis the slices run on separate devices; values and gradients equal the unsharded call."
    env = {**__import__('os').environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
    r = subprocess.run([sys.executable, '-c', SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['no_mesh'] and out['other_axis_unsharded'] and out['devices'] == 2
    one, two = out['step_values']  # the benchmark's layer: the same loss on 1 and 2 devices, to float rounding (sums split differently)
    assert abs(one - two) <= 1e-6 * abs(one), out['step_values']
    assert out['diff'] < 1e-6 and out['grad_diff'] < 1e-5
    assert out['odd'].startswith('batch × heads') and "'heads' axis" in out['odd']
