"Masking selects: what a masked key or value holds (NaN, infinity) cannot change an output or make a gradient NaN."
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.layers.attention import get_attention

B, T, N, H, P = 2, 48, 2, 8, 30  # P: the position that holds the non-finite value
OPTIONS = {'local': dict(block_size=8), 'sparse': dict(stride=8, summary=2), 'chunked': dict(block_q=16, block_kv=16),
           'memory_compressed': dict(block_q=16, block_kv=16), 'lsh': dict(chunk_length=8, n_rounds=2)}
KINDS = ['full', 'chunked', 'local', 'memory_compressed', 'sparse', 'ssmax', 'lsh']


def _inputs():
    r = np.random.default_rng(0)
    return [jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32) for _ in range(3)]


def _attend(name, q, k, v, **kw):
    kind = get_attention(name)
    extra = kind.make_params(N, H, rngs=nnx.Rngs(0, lsh=1)).as_kwargs() if kind.make_params else {}
    if name == 'lsh': q = k  # shared queries and keys
    return kind.fn(q, k, v, **OPTIONS.get(name, {}), **extra, **kw)


@pytest.mark.parametrize('name', KINDS)
def test_a_masked_nonfinite_value_or_key_changes_no_output(name):
    q, k, v = _inputs()
    padding = jnp.ones((B, T), bool).at[:, P:].set(False)
    for kw, visible in ((dict(causal=True), slice(0, P)), (dict(padding_mask=padding), slice(0, P))):
        clean = _attend(name, q, k, v, **kw)
        for which in ('k', 'v'):  # a NaN key, an infinite value
            kk, vv = (k.at[:, P].set(jnp.nan), v) if which == 'k' else (k, v.at[:, P].set(-jnp.inf))
            out = _attend(name, q, kk, vv, **kw)
            assert bool(jnp.isfinite(out[:, visible]).all()), (name, kw.keys(), which)
            if not (name == 'lsh' and 'causal' in kw):  # LSH: a later token's hash moves the chunk boundaries
                np.testing.assert_allclose(out[:, visible], clean[:, visible], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', KINDS)
def test_a_visible_nan_value_makes_the_rows_that_see_it_nan(name):
    q, k, v = _inputs()
    out = _attend(name, q, k, v.at[:, P].set(jnp.nan), causal=True)
    seen = jnp.isnan(out).any(axis=(0, 2, 3))
    assert bool(seen.any()) and not bool(seen[:P].any())


@pytest.mark.parametrize('name', KINDS)
def test_gradients_stay_finite_past_a_masked_nan(name):
    q, k, v = _inputs()
    padding = jnp.ones((B, T), bool).at[:, P:].set(False)  # no query sees P or P + 1
    def loss(q, k, v): return _attend(name, q, k, v, causal=True, padding_mask=padding)[:, :P].sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k.at[:, P].set(jnp.nan), v.at[:, P + 1].set(jnp.nan))
    for g in grads: assert bool(jnp.isfinite(g).all()), name
