"Model families: cached decoding equals the full pass, options, save/load round trips, gradients."
import json
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.models.bert import Bert, BertConfig
from transformers_howfar.layers.blocks import apply_rotary, attention_maps, count_parameters, depth_plan, sinusoidal_positions, with_config
from transformers_howfar.models.lm import LM, LMConfig
from transformers_howfar.models.rnn import RNNConfig, RNNEncoderDecoder
from transformers_howfar.models.saving import load, load_tokenizer, read_model_config, save_model
from transformers_howfar.data.tokenizer import CharTokenizer
from transformers_howfar.models.transformer import EncoderDecoder, TransformerConfig

TOKENS = jax.random.randint(jax.random.key(1), (2, 9), 7, 32)
SRC = jnp.array([[5, 6, 7, 8, 9, 0, 0], [10, 11, 12, 13, 14, 15, 16]])


def stepwise(model, tokens, cache):
    "Logits from feeding `tokens` one at a time through `model.step`."
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = model.step(tokens[:, t:t + 1], cache)
        out.append(logits)
    return jnp.concatenate(out, 1)


@pytest.mark.parametrize('change', [{}, {'position': 'rotary'}, {'position': 'sinusoidal'}, {'norm': 'post'},
                                    {'n_kv_heads': 2}, {'n_kv_heads': 1, 'position': 'rotary'},
                                    {'shared_layers': True, 'n_layers': 3}, {'attention': ('full', 'chunked')}])
def test_lm_cached_equals_full(change):
    model = LM(LMConfig.tiny().replace(**change), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(stepwise(model, TOKENS, model.init_cache(2, 12)), model(TOKENS), atol=1e-4)


@pytest.mark.parametrize('change', [{}, {'norm': 'pre', 'position': 'rotary'}, {'share_embeddings': False, 'target_vocab_size': 40},
                                    {'shared_layers': True}, {'n_decoder_layers': 3, 'n_kv_heads': 2}])
def test_encoder_decoder_cached_equals_full(change):
    model = EncoderDecoder(TransformerConfig.tiny().replace(**change), rngs=nnx.Rngs(0))
    cache, first = model.start(SRC, None, 9)
    np.testing.assert_allclose(stepwise(model, TOKENS, cache), model(SRC, TOKENS), atol=1e-4)


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_rnn_cached_equals_full(cell):
    model = RNNEncoderDecoder(RNNConfig.tiny().replace(cell=cell), rngs=nnx.Rngs(0))
    cache, _ = model.start(SRC, None, 9)
    np.testing.assert_allclose(stepwise(model, TOKENS, cache), model(SRC, TOKENS), atol=1e-5)


def test_left_padding_gives_each_row_its_own_logits():
    model = LM(LMConfig.tiny().replace(position='rotary'), rngs=nnx.Rngs(3))
    tokens = TOKENS.at[0, :4].set(0)
    mask = jnp.arange(9)[None] >= jnp.array([[4], [0]])
    logits, _ = model.step(tokens, model.init_cache(2, 12), token_mask=mask)
    np.testing.assert_allclose(logits[0, 4:], model(TOKENS[:1, 4:])[0], atol=1e-4)
    np.testing.assert_allclose(logits[1], model(TOKENS[1:])[0], atol=1e-4)


def test_lm_gradients_reach_every_parameter():
    model = LM(LMConfig.tiny().replace(dropout_rate=0.1), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    def loss(p):
        m = nnx.merge(graphdef, p)
        logits = m(TOKENS[:, :-1], rngs=nnx.Rngs(dropout=1))
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], -1).mean()
    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'


def test_gradient_matches_finite_differences():
    model = LM(LMConfig.tiny().replace(n_layers=1), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    def loss(scale):
        p = jax.tree.map(lambda x: x * scale, params)
        return nnx.merge(graphdef, p)(TOKENS).std()
    eps = 1e-3
    numeric = (loss(1 + eps) - loss(1 - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(loss)(1.0), numeric, rtol=2e-2)


def test_dropout_is_random_in_training_and_off_in_evaluation():
    model = LM(LMConfig.tiny().replace(dropout_rate=0.5), rngs=nnx.Rngs(0))
    a, b = model(TOKENS, rngs=nnx.Rngs(dropout=1)), model(TOKENS, rngs=nnx.Rngs(dropout=2))
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(model(TOKENS), model(TOKENS))


def test_sharing_across_depth_counts_one_block():
    for cls, cfg, stack in [(LM, LMConfig, 'stack'), (Bert, BertConfig, 'encoder')]:
        deep = cls(cfg.tiny().replace(n_layers=4), rngs=nnx.Rngs(0))
        shared = cls(cfg.tiny().replace(n_layers=4, shared_layers=True), rngs=nnx.Rngs(0))
        assert count_parameters(deep) - count_parameters(shared) == 3 * count_parameters(getattr(deep, stack).blocks[0])


def test_sinusoidal_positions_fixed_values():
    pe = sinusoidal_positions(jnp.array([1, 2]), 4)
    expected = [[np.sin(1), np.cos(1), np.sin(1e-2), np.cos(1e-2)], [np.sin(2), np.cos(2), np.sin(2e-2), np.cos(2e-2)]]
    np.testing.assert_allclose(pe, expected, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 50), st.integers(0, 50), st.integers(1, 3))
def test_rotary_scores_depend_only_on_distance(p, shift, seed):
    q, k = jax.random.normal(jax.random.key(seed), (2, 1, 1, 1, 8))
    def score(a, b): return float((apply_rotary(q, jnp.array([[a]])) * apply_rotary(k, jnp.array([[b]]))).sum())
    assert abs(score(p, p + 3) - score(p + shift, p + shift + 3)) < 1e-3


def test_depth_plan_cycles_types():
    assert depth_plan(5, ('local', 'local', 'full')) == ((0, 'local'), (1, 'local'), (2, 'full'), (3, 'local'), (4, 'local'))


@pytest.mark.parametrize('make', [
    lambda: LM(LMConfig.tiny().replace(position='rotary'), rngs=nnx.Rngs(4)),
    lambda: EncoderDecoder(TransformerConfig.tiny(), rngs=nnx.Rngs(4)),
    lambda: Bert(BertConfig.tiny(), rngs=nnx.Rngs(4)),
    lambda: RNNEncoderDecoder(RNNConfig.tiny().replace(cell='gru'), rngs=nnx.Rngs(4)),
])
def test_save_load_round_trip(make, tmp_path):
    model = make()
    save_model(model, tmp_path / 'm', tokenizer=CharTokenizer('abcdefghijklmnopqrstuvwxy'))
    back = load(tmp_path / 'm')
    assert type(back) is type(model) and back.config == model.config
    assert read_model_config(tmp_path / 'm') == (type(model), model.config)
    meta = json.loads((tmp_path / 'm' / 'model.json').read_text())
    assert meta['class'] == f'{type(model).__module__}:{type(model).__qualname__}'
    args = (TOKENS,) if isinstance(model, (LM, Bert)) else (SRC, TOKENS)
    np.testing.assert_array_equal(back(*args), model(*args))
    assert load_tokenizer(tmp_path / 'm').decode([7, 8, 9]) == 'abc'


def test_load_rejects_mismatched_shapes(tmp_path):
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / 'm')
    text = (tmp_path / 'm' / 'model.json').read_text().replace('"d_ff": 64', '"d_ff": 48')
    (tmp_path / 'm' / 'model.json').write_text(text)
    with pytest.raises(Exception):
        load(tmp_path / 'm')


@pytest.mark.parametrize('cfg, field, value, message', [
    (LMConfig, 'n_heads', 3, 'd_model: expected a multiple of n_heads'),
    (LMConfig, 'attention', ('full', 'nonsense'), 'attention: expected one of'),
    (TransformerConfig, 'target_vocab_size', 7, 'share_embeddings: expected equal vocabularies'),
    (BertConfig, 'norm', 'sandwich', 'norm: expected one of'),
    (RNNConfig, 'cell', 'rnn', 'cell: expected one of'),
])
def test_config_errors(cfg, field, value, message):
    with pytest.raises(ValueError, match=message):
        cfg.tiny().replace(**{field: value})


def test_attention_options_survive_save_load_and_overrides(tmp_path):
    config = LMConfig.tiny().override(['attention=local,full', 'attention_options=local.block_size=4,local.look_back=2'])
    model = LM(config, rngs=nnx.Rngs(2))
    assert model.stack.blocks[0].attention.mha.options == (('block_size', 4), ('look_back', 2))
    assert model.stack.blocks[1].attention.mha.options == ()
    save_model(model, tmp_path / 'm')
    back = load(tmp_path / 'm')
    assert back.config == config and hash(back.config) == hash(config)
    np.testing.assert_array_equal(back(TOKENS), model(TOKENS))
    old = {k: v for k, v in LMConfig.tiny().to_dict().items() if k != 'attention_options'}  # written before the field existed
    assert LMConfig.from_dict(old) == LMConfig.tiny()
    with pytest.raises(ValueError, match="attention_options: 'lsh.n_rounds=2' is for kind 'lsh'"):
        LMConfig.tiny().replace(attention_options=('lsh.n_rounds=2',))


def test_with_config_keeps_parameters_and_changes_attention():
    lsh = LMConfig.tiny().replace(attention=('lsh',), attention_options=('lsh.chunk_length=4', 'lsh.dense_threshold=1000'))
    model = LM(lsh, rngs=nnx.Rngs(3))
    dense = model(TOKENS)  # every length up to the threshold: exact shared-QK attention
    hashed = with_config(model, attention_options=('lsh.chunk_length=4', 'lsh.dense_threshold=0', 'lsh.n_rounds=2'))
    assert hashed.config.attention_options[-1] == 'lsh.n_rounds=2' and model.config == lsh
    out = hashed(TOKENS)
    assert out.shape == dense.shape and float(jnp.abs(out - dense).max()) > 1e-4  # short chunks: not every key is a candidate
    np.testing.assert_array_equal(with_config(hashed, attention_options=lsh.attention_options)(TOKENS), dense)
    with pytest.raises(ValueError, match="changes: {'d_ff': 32} would change the parameters of LM"):
        with_config(model, d_ff=32)


@pytest.mark.parametrize('make, call', [
    (lambda: LM(LMConfig.tiny().replace(position='rotary', n_kv_heads=2), rngs=nnx.Rngs(5)), lambda m, x, p: attention_maps(m, x, padding_mask=p)),
    (lambda: Bert(BertConfig.tiny().replace(shared_layers=True), rngs=nnx.Rngs(5)), lambda m, x, p: attention_maps(m, x, None, p)),
])
def test_models_return_one_attention_map_per_layer(make, call):
    model, pad = make(), jnp.arange(9)[None] < jnp.array([[9], [5]])
    out, maps = call(model, TOKENS, pad)
    assert len(maps) == model.config.n_layers and all(m.shape == (2, 4, 9, 9) for m in maps)
    np.testing.assert_array_equal(out, call(model, TOKENS, pad)[0])
    np.testing.assert_allclose(jnp.stack(maps).sum(-1), 1.0, atol=1e-5)
    assert float(jnp.stack(maps)[:, 1, :, :, 5:].max()) == 0.0  # padding keys get nothing
    causal = isinstance(model, LM)
    assert (float(jnp.triu(jnp.stack(maps), 1).max()) == 0.0) == causal
