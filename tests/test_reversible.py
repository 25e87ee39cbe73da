"""Reversible sequences: inverse, gradients equal to plain backprop with randomness on, chunking equals no chunking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.core import make_key
from transformers_howfar.layers.blocks import FeedForward
from transformers_howfar.layers.reversible import (MODES, ReversibleSequence, chunked_apply, chunked_cross_entropy,
                                            reverse_sequence, reversible_sequence)
from transformers_howfar.layers.losses import cross_entropy


def dropout_tanh(p, x, key, context, aux):
    h = jnp.tanh(x @ p['w'] + context @ p['c'])
    return h if key is None else jnp.where(jax.random.bernoulli(key, 0.7, h.shape), h / 0.7, 0.0)


def setup(P, R, D=6, seed=0):
    ks = jax.random.split(make_key(seed), 2 * P + 3)
    params = [{'w': jax.random.normal(ks[j], (R, D, D)) * 0.6, 'c': jax.random.normal(ks[P + j], (R, 4, D)) * 0.4} for j in range(P)]
    x1, x2 = jax.random.normal(ks[-3], (2, 2, 5, D))
    return [dropout_tanh] * P, params, x1, x2, jax.random.normal(ks[-2], (2, 5, 4))


@pytest.mark.parametrize('P,R,with_key', [(1, 1, False), (3, 2, True)])
def test_inverse_recovers_input(P, R, with_key):
    fns, params, x1, x2, ctx = setup(P, R)
    key = make_key(3) if with_key else None
    y = reversible_sequence(fns, params, x1, x2, key, ctx)
    assert not np.allclose(y[0], x1)
    back = reverse_sequence(fns, params, *y, key, ctx)
    np.testing.assert_allclose(back[0], x1, atol=1e-5); np.testing.assert_allclose(back[1], x2, atol=1e-5)


@pytest.mark.parametrize('mode,P,R', [('reversible', 3, 2), ('remat', 2, 1)])
def test_gradients_equal_plain_backprop_with_dropout(mode, P, R):
    fns, params, x1, x2, ctx = setup(P, R, seed=P * 10 + R)
    key = make_key(7)
    def loss(m):
        return lambda p, a, b, c: sum((jnp.sin(o) * o).sum() for o in reversible_sequence(fns, p, a, b, key, c, mode=m))
    got = jax.jit(jax.grad(loss(mode), argnums=(0, 1, 2, 3)))(params, x1, x2, ctx)
    want = jax.grad(loss('ordinary'), argnums=(0, 1, 2, 3))(params, x1, x2, ctx)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-4)


def test_another_key_gives_another_result():
    fns, params, x1, x2, ctx = setup(2, 2)
    a = reversible_sequence(fns, params, x1, x2, make_key(1), ctx)[1]
    b = reversible_sequence(fns, params, x1, x2, make_key(2), ctx)[1]
    assert not np.allclose(a, b)


def test_fixed_seed_regression():
    fns, params, x1, x2, ctx = setup(2, 2, seed=0)
    y1, y2 = reversible_sequence(fns, params, x1, x2, make_key(0), ctx)
    assert y2.shape == (2, 5, 6)
    np.testing.assert_allclose([float(jnp.abs(y2).sum()), float(y1[0, 0, 0]), float(y2[1, 4, 5])],
                               [75.73933410644531, -0.992146372795105, -1.209181308746338], rtol=1e-5)


class FF(nnx.Module):
    def __init__(self, d, *, rngs): self.ff = FeedForward(d, 3 * d, dropout_rate=0.3, rngs=rngs)
    def __call__(self, x, *, key, context, aux): return self.ff(x, rngs=None if key is None else nnx.Rngs(dropout=key))


def test_module_gradients_match_across_modes():
    seq = ReversibleSequence([FF(8, rngs=nnx.Rngs(i)) for i in range(4)], period=2)
    x = jax.random.normal(make_key(1), (2, 7, 8))
    loss = lambda m, mode: sum((o ** 2).sum() for o in m(x, x * 0.5, key=make_key(2), mode=mode))
    ref = nnx.state(nnx.grad(loss)(seq, 'ordinary'))
    for mode in ('reversible', 'remat'):
        got = nnx.state(nnx.grad(loss)(seq, mode))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ref)): np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_errors():
    fns, params, x1, x2, ctx = setup(2, 2)
    with pytest.raises(ValueError, match='mode'): reversible_sequence(fns, params, x1, x2, mode='x')
    with pytest.raises(ValueError, match='one stacked pytree per step'): reversible_sequence(fns, params[:1], x1, x2)
    with pytest.raises(ValueError, match='x2: expected the shape'): reversible_sequence(fns, params, x1, x2[:, :2])
    with pytest.raises(ValueError, match='period'): ReversibleSequence([FF(4, rngs=nnx.Rngs(0))] * 3, period=2)
    with pytest.raises(ValueError, match='chunk_size'): chunked_apply(lambda h, k: h, x1, 0)


@settings(max_examples=4, deadline=None)
@given(T=st.integers(1, 40), chunk=st.integers(1, 50))
def test_chunked_apply_equals_unchunked(T, chunk):
    ff = FeedForward(4, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(make_key(T), (2, T, 4))
    np.testing.assert_allclose(chunked_apply(lambda h, k: ff(h), x, chunk), ff(x), atol=1e-5)


@pytest.mark.parametrize('T,chunk,smoothing', [(33, 8, 0.1), (10, 64, 0.0)])
def test_chunked_loss_equals_cross_entropy(T, chunk, smoothing):
    V, D = 40, 8
    emb = jax.random.normal(make_key(0), (V, D))
    h = jax.random.normal(make_key(1), (3, T, D))
    t = jax.random.randint(make_key(2), (3, T), 0, V)
    m = jax.random.uniform(make_key(3), (3, T)) < 0.7
    f = lambda h: chunked_cross_entropy(h, lambda x: x @ emb.T, t, m, chunk_size=chunk, label_smoothing=smoothing)
    g = lambda h: cross_entropy(h @ emb.T, t, m, smoothing)
    (got, gm), (want, wm) = f(h), g(h)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for k in wm: np.testing.assert_allclose(gm[k], wm[k], rtol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda h: f(h)[0])(h), jax.grad(lambda h: g(h)[0])(h), atol=1e-6)
