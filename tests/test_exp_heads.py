"""The attention-head experiment's parts: the maps the models return equal the models' own computation for every norm, position and head
grouping; the scores on maps with a known answer; word spans on a real SentencePiece tokenizer; the templated name set; and the quick run end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.models.bert import Bert, BertConfig
from transformers_howfar.experiments.heads import (best_head, bert_attention, encode_pronoun_set, head_scores,
                                                   held_out_accuracy, lm_attention, name_pronoun_set, pronoun_margins,
                                                   word_spans)
from transformers_howfar.models.lm import LM, LMConfig
from transformers_howfar.data.tokenizer import SentencePieceTokenizer

BIN = Path(sys.executable).parent
PRONOUN_SET = name_pronoun_set({'female': ['Lucy', 'Henrietta', 'Mary'], 'male': ['John', 'Charles', 'Tom']}, pairs=2)
X = jnp.asarray(np.random.default_rng(0).integers(7, 32, (2, 10)))


@pytest.mark.parametrize('position', ['learned', 'rotary'])
@pytest.mark.parametrize('n_kv_heads', [0, 2])
@pytest.mark.parametrize('norm', ['pre', 'post'])
def test_lm_maps_are_the_models_own(position, n_kv_heads, norm):
    model = LM(LMConfig.tiny().replace(position=position, n_kv_heads=n_kv_heads, norm=norm), rngs=nnx.Rngs(1))
    logits, maps = lm_attention(model, X)
    np.testing.assert_allclose(logits, model(X), atol=1e-5)
    assert maps.shape == (2, 2, 4, 10, 10)
    np.testing.assert_allclose(maps.sum(-1), 1, atol=1e-5)
    assert np.triu(maps, 1).max() == 0
    # the maps reproduce each layer's output: A V through the output projection equals the attention sublayer
    block, mha = model.stack.blocks[0], model.stack.blocks[0].attention.mha
    h = model.embed(X, jnp.arange(10)[None])
    h = block.attention_residual.norm(h) if norm == 'pre' else h
    _, v = mha.project_kv(h)
    G = mha.n_heads // mha.n_kv_heads
    out = np.einsum('bnts,bsnh->btnh', maps[0], np.repeat(np.asarray(v), G, axis=2))
    np.testing.assert_allclose(mha.out(jnp.asarray(out)), block.attention(h), atol=1e-4)


@pytest.mark.parametrize('norm', ['pre', 'post'])
def test_bert_maps_with_padding(norm):
    model = Bert(BertConfig.tiny().replace(norm=norm), rngs=nnx.Rngs(2))
    mask = jnp.asarray([[1] * 10, [1] * 7 + [0] * 3], jnp.float32)
    hidden, maps = bert_attention(model, X, mask)
    np.testing.assert_allclose(hidden, model(X, None, mask), atol=1e-5)
    assert np.abs(maps[:, 1, :, :, 7:]).max() == 0 and np.triu(maps, 1).max() > 0  # padding gets nothing; not causal


def test_non_dense_attention_is_refused():
    model = LM(LMConfig.tiny().replace(attention=('local',)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model: attention kind 'local' never builds"):
        lm_attention(model, X)


def test_shared_layers_give_one_map_per_depth_step():
    model = Bert(BertConfig.tiny().replace(shared_layers=True, n_layers=3), rngs=nnx.Rngs(3))
    hidden, maps = bert_attention(model, X)
    assert maps.shape == (3, 2, 4, 10, 10) and np.abs(maps[0] - maps[1]).max() > 1e-4  # one block, three inputs
    np.testing.assert_allclose(hidden, model(X), atol=1e-5)


def test_scores_find_planted_heads():
    rng = np.random.default_rng(0)
    T = 8
    maps = rng.dirichlet(np.ones(T), (2, 3, 4, T))  # (L, B, N, T, S) random rows
    maps[1, :, 2] = np.eye(T, k=-1); maps[1, :, 2, 0, 0] = 1  # layer 1 head 2: previous token
    maps[0, :, 3] = 0; maps[0, :, 3, :, 0] = 1  # layer 0 head 3: all on the first token
    valid, sep = np.ones((3, T), bool), np.zeros((3, T), bool); sep[:, 0] = True
    s = head_scores(maps, valid, sep, causal=False)
    assert np.unravel_index(s['previous'].argmax(), (2, 4)) == (1, 2) and s['previous'][1, 2] == 1
    assert np.unravel_index(s['separator'].argmax(), (2, 4)) == (0, 3) and s['separator'][0, 3] == 1
    assert np.isclose(s['separator_uniform'][0, 0], 1 / T)


@settings(max_examples=25, deadline=None)
@given(st.integers(5, 30), st.integers(0, 3))
def test_a_head_always_right_is_chosen_and_scores_one_on_held_out_sentences(n, head):
    rng = np.random.default_rng(n)
    choose, score = rng.uniform(-1, 1, (n, 1, 4)), rng.uniform(-1, 1, (n + 3, 1, 4))
    for m in (choose, score): m[:, 0, head] = np.abs(m[:, 0, head]) + 0.01
    assert best_head(choose) == (0, head) and held_out_accuracy(choose, score) == ((0, head), 1.0)


@pytest.fixture(scope='module')
def sentencepiece():
    lines = [s for s, *_ in PRONOUN_SET] * 5 + ['the history of the city was written by the people of the land'] * 20
    return SentencePieceTokenizer.train(lines, 320)


def test_word_spans_on_sentencepiece(sentencepiece):
    items = encode_pronoun_set(sentencepiece, PRONOUN_SET, prefix=[6], suffix=[5])
    assert len(items) == len(PRONOUN_SET) == 64
    for it, (sentence, pronoun, antecedent, _) in zip(items, PRONOUN_SET):
        assert sentencepiece.decode(it['ids'][it['antecedent']]).strip() == antecedent
        assert sentencepiece.decode(it['ids'][[it['pronoun']]]).strip() == pronoun[:len(sentencepiece.decode(it['ids'][[it['pronoun']]]).strip())]
        assert it['ids'][0] == 6 and it['ids'][-1] == 5
    maps = [np.full((1, 1, len(it['ids']), len(it['ids'])), 1 / len(it['ids'])) for it in items]
    m = pronoun_margins(maps, items)
    assert m.shape == (64, 1, 1)  # uniform attention: a name's pieces weigh by their count, but over the four rows of a
    assert (np.sign(m).reshape(-1, 4).sum(1) == 0).all()  # pair (both orders, both pronouns) each name wins as often


def test_word_spans_refuses_a_tokenizer_without_prefixes():
    class Reversing:
        def encode(self, text): return np.asarray([ord(c) for c in text[::-1]])
    with pytest.raises(ValueError, match='are not a prefix'):
        word_spans(Reversing(), 'ab cd')


@pytest.mark.slow
def test_cli_quick_run(tmp_path):
    r = subprocess.run([str(BIN / 'howfar'), 'experiment', 'heads', '--quick', '--out', str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / 'heads.json').read_text())
    assert {(x['config']['model'], x['config']['criterion']) for x in records} == {
        ('bert', 'previous'), ('bert', 'next'), ('bert', 'separator'), ('bert', 'pronoun'), ('lm', 'previous'), ('lm', 'separator'),
        ('lm', 'pronoun'), ('lm', 'fit')}
