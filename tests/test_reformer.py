"""ReformerLM and the encoder-decoder: configs, axial positions, modes agree, chunked loss, trainer and decoding interfaces."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.core import make_key
from transformers_howfar.decoding import generate
from transformers_howfar.layers.losses import cross_entropy
from transformers_howfar.layers.lsh import LSHSelfAttention
from transformers_howfar.models.reformer import (AxialPositions, ReformerConfig, ReformerEncoderDecoder, ReformerLM,
                                                 axial_factors, reformer_loss)


def test_config_errors():
    for kwargs, message in [(dict(n_layers=3, attention=('lsh', 'full')), 'n_layers'), (dict(max_len=70000), 'axial_shape'),
                            (dict(axial_dims=(100, 100)), 'axial_dims'), (dict(attention=('nope',)), 'attention'),
                            (dict(residual='magic'), 'residual'), (dict(ff_chunk=0), 'ff_chunk')]:
        with pytest.raises(ValueError, match=message): ReformerConfig(**kwargs)


def test_axial_positions_any_length():
    ax = AxialPositions((5, 7), (2, 4), 35, rngs=nnx.Rngs(0))
    for T in (1, 13, 35):
        assert ax(jnp.arange(T)[None]).shape == (1, T, 6)
    p = ax(jnp.arange(35)[None])[0]
    np.testing.assert_array_equal(p[15, :2], ax.first[...][2]); np.testing.assert_array_equal(p[15, 2:], ax.second[...][1])


def batch_for(c, B=2, T=24, seed=1):
    tokens = jax.random.randint(make_key(seed), (B, T + 1), 0, c.vocab_size)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': (jax.random.uniform(make_key(seed + 1), (B, T)) < 0.9).astype(jnp.float32)}


def test_attention_types_cycle_over_layers():
    c = ReformerConfig.tiny().replace(attention=('lsh', 'local', 'memory_compressed', 'full'), n_layers=8)
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    kinds = [layer.kind for layer in m.stack.sublayers[::2]]
    assert kinds == list(c.attention) * 2 and m.stack.period == 8
    assert all(isinstance(layer.attention, LSHSelfAttention) == (layer.kind == 'lsh') for layer in m.stack.sublayers[::2])


@pytest.mark.slow
@pytest.mark.parametrize('attention', [('lsh',)])
def test_reversible_gradients_equal_ordinary_with_dropout_and_lsh(attention):
    c = ReformerConfig.tiny().replace(attention=attention, n_layers=len(attention), dropout_rate=0.2)
    b, loss_fn = batch_for(c), reformer_loss(0.1)
    def grads(mode):
        m = ReformerLM(c.replace(residual=mode), rngs=nnx.Rngs(0))
        loss, g = nnx.value_and_grad(lambda m: loss_fn(m, b, nnx.Rngs(dropout=make_key(4)))[0])(m)
        return loss, nnx.state(g, nnx.Param)
    (l_rev, g_rev), (l_ord, g_ord) = grads('reversible'), grads('ordinary')
    np.testing.assert_allclose(l_rev, l_ord, rtol=1e-6)
    for a, o in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_ord)): np.testing.assert_allclose(a, o, atol=5e-5, rtol=1e-3)
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g_rev))


def test_lsh_sublayer_is_the_lsh_module_and_hash_key_replays():
    c = ReformerConfig.tiny().replace(attention=('lsh',))
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    assert isinstance(m.stack.sublayers[0].attention, LSHSelfAttention)
    x = jax.random.normal(make_key(0), (1, 24, c.d_model))
    layer = m.stack.sublayers[0]
    np.testing.assert_array_equal(layer(x, key=make_key(1)), layer(x, key=make_key(1)))  # same key, same buckets
    assert not np.allclose(layer(x, key=make_key(1)), layer(x, key=make_key(2)))


def test_chunked_loss_equals_full_logits_loss_and_lengths_not_multiple_of_chunks():
    c = ReformerConfig.tiny().replace(ff_chunk=7, loss_chunk=9)
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    b = batch_for(c, T=37)
    loss, metrics = reformer_loss()(m, b, None)
    want, wm = cross_entropy(m(b['inputs']), b['targets'], b['loss_mask'])
    np.testing.assert_allclose(loss, want, rtol=1e-5); np.testing.assert_allclose(metrics['accuracy'], wm['accuracy'], rtol=1e-6)


def test_lm_deterministic_without_key_and_random_with():
    c = ReformerConfig.tiny().replace(dropout_rate=0.1)
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    t = batch_for(c)['inputs']
    np.testing.assert_array_equal(m(t), m(t))
    assert not np.allclose(m(t, rngs=nnx.Rngs(dropout=1)), m(t, rngs=nnx.Rngs(dropout=2)))
    with pytest.raises(ValueError, match='exceeds max_len'): m(jnp.zeros((1, c.max_len + 1), jnp.int32))


@pytest.mark.slow
def test_encoder_decoder_modes_agree():
    c = ReformerConfig.tiny().replace(attention=('full',), attention_options=(), n_layers=1, dropout_rate=0.1)
    src, tgt = jax.random.randint(make_key(5), (2, 12), 0, 32), jax.random.randint(make_key(6), (2, 8), 0, 32)
    def run(mode):
        m = ReformerEncoderDecoder(c.replace(residual=mode), rngs=nnx.Rngs(0))
        f = lambda m: (m(src, tgt, rngs=nnx.Rngs(dropout=make_key(7))) ** 2).mean()
        return m(src, tgt).shape, nnx.state(nnx.jit(nnx.grad(f))(m), nnx.Param)  # compiled: eager autodiff of the scans is slow
    (s1, g1), (s2, g2) = run('reversible'), run('ordinary')
    assert s1 == (2, 8, 32)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)): np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-3)
    assert float(jnp.abs(g1['encoder']['sublayers'][0]['attention']['q']['kernel'][...]).sum()) > 0  # through the decoder's VJP


def test_attention_options_reach_the_layers():
    c = ReformerConfig.tiny().replace(attention=('lsh', 'local'), attention_options=(
        'local.block_size=8', 'lsh.n_buckets=4', 'lsh.dense_threshold=0', 'lsh.n_rounds=2', 'lsh.chunk_length=8'))
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    lsh, local = m.stack.sublayers[0].attention, m.stack.sublayers[2].attention
    assert (lsh.n_buckets, lsh.dense_threshold, lsh.n_rounds, lsh.chunk_length) == ((4,), 0, 2, 8)
    assert local.options == (('block_size', 8),)
    x = jax.random.randint(make_key(1), (1, 40), 0, 32)
    assert m(x).shape == (1, 40, 32)
    assert ReformerConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="attention_options: 'lsh.chunk_length=16.0': chunk_length expects int"):
        c.replace(attention_options=('lsh.chunk_length=16.0',))


def test_axial_factors_cover_length():
    for length in (1, 7, 100, 65536, 2 ** 20):
        first, second = axial_factors(length)
        assert first * second >= length and second & (second - 1) == 0 and (first - 1) * second < length
    with pytest.raises(ValueError, match='length'): axial_factors(0)


@pytest.mark.slow
def test_uncached_greedy_generation_equals_argmax_of_full_passes():
    """`generate(..., use_cache=False)` runs a left-padded window of prompt plus room for the new tokens; with a fixed
    number of LSH buckets the window's logits are the unpadded prefix's, so greedy decoding equals a loop of full passes."""
    c = ReformerConfig.tiny().replace(attention=('lsh', 'full'), attention_options=('lsh.n_buckets=4', 'lsh.chunk_length=8'))
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    m.final_norm.scale[...] = jax.random.normal(make_key(3), (c.d_model,))  # so the tied output does not just repeat its input
    prompts, n = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3], [7, 3, 9]], 12  # windows of 23 tokens: LSH, not its dense path
    out = generate(m, prompts, n, use_cache=False, stop_tokens=())
    want = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(n): seq.append(int(jnp.argmax(m(jnp.array([seq]))[0, -1])))
        want.append(seq[len(prompt):])
    np.testing.assert_array_equal(out, np.array(want))
    assert len({t for row in want for t in row}) > 2  # the tokens vary: the equality says something
