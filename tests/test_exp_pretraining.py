"""The pre-training experiment's parts: logistic regression at its optimum (binary and multinomial), bag-of-words features,
the encoder transfer that survives training, the seed confidence interval, the config's errors, the suite's tasks, and
`howfar experiment pretraining --quick` end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.data.tokenizer import SEP_ID
from transformers_howfar.models.bert import Bert, BertConfig
from transformers_howfar.experiments.common import bag_of_words, logistic_regression, mean_ci, predict_logistic
from transformers_howfar.experiments.pretraining import (PretrainingConfig, corpus_tokenizer, finetune, load_corpora,
                                                         load_pretrained_bert, transfer_encoder)
from transformers_howfar.experiments.suite import make_task, pair_row
from transformers_howfar.models.saving import save_model

BIN = Path(sys.executable).parent


def dense_loss(params, X, y, l2):
    w, b = params
    return optax.sigmoid_binary_cross_entropy(X @ w + b, y).mean() + l2 * (w ** 2).sum()


@pytest.mark.parametrize('l2', [1e-3, 1e-1])
def test_logistic_regression_reaches_the_optimum_of_the_dense_objective(l2):
    rng = np.random.default_rng(0)
    n, f = 200, 30
    X = (rng.random((n, f)) < 0.2).astype(np.float32)
    y = (X @ rng.standard_normal(f) + 0.3 * rng.standard_normal(n) > 0.2).astype(np.float32)
    idx = np.full((n, f), -1, np.int32)
    for i, row in enumerate(X): on = np.flatnonzero(row); idx[i, :len(on)] = on
    params = logistic_regression(idx, y, f, l2, steps=300)
    grad = jax.grad(dense_loss)(params, jnp.asarray(X), jnp.asarray(y), l2)  # the padded-index loss is the dense one
    assert float(optax.tree.norm(grad)) < 1e-4
    np.testing.assert_array_equal(predict_logistic(params, idx), (np.asarray(X @ params[0] + params[1]) > 0).astype(np.int32))


def test_bag_of_words_counts_and_bigrams():
    (tr, te), names = bag_of_words(['A good film.', 'a GOOD plot', 'bad'], ['good film, bad'], min_count=2)
    assert names == ['a', 'a good', 'good']  # seen twice, case-folded; 'film' and 'bad' only once
    assert sorted(te[0][te[0] >= 0].tolist()) == [names.index('good')]
    (_, _), unigram = bag_of_words(['a b', 'a b'], [], bigrams=False)
    assert unigram == ['a', 'b']


def test_transfer_survives_training_and_skips_the_head():
    c = PretrainingConfig.tiny()
    data = load_corpora(c)
    tok = corpus_tokenizer(c, data['text'])
    source = Bert(c.bert_config(), rngs=nnx.Rngs(3))
    before = np.asarray(source.embed.token.embedding[...]).copy()
    task = make_task('toy', tok, c.classify_len, c.max_train, c.max_eval)
    run = finetune(c.replace(finetune_steps=3, select_every=3), task, seed=0, pretrained=source,
                   learning_rate=1e-3)  # the trainer donates its state
    np.testing.assert_array_equal(np.asarray(source.embed.token.embedding[...]), before)  # the source is intact and alive
    assert run['init'] == 'pretrained' and 0 <= run['test_accuracy'] <= 1
    target = transfer_encoder(source, Bert(c.bert_config(), rngs=nnx.Rngs(4)))
    np.testing.assert_array_equal(target.encoder.blocks[0].feed_forward.up.kernel[...], source.encoder.blocks[0].feed_forward.up.kernel[...])
    assert not np.allclose(target.pooler.kernel[...], source.pooler.kernel[...])


def test_mean_ci_matches_student_t():
    m, h = mean_ci([0.70, 0.74, 0.72, 0.76])
    assert math.isclose(m, 0.73) and math.isclose(h, 3.182 * np.std([0.70, 0.74, 0.72, 0.76], ddof=1) / 2)
    with pytest.raises(ValueError, match='values: expected a non-empty 1-D'):
        mean_ci([[1, 2]])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=40))
def test_mean_ci_contains_the_mean_and_shrinks_with_agreement(values):
    m, h = mean_ci(values)
    assert min(values) - 1e-12 <= m <= max(values) + 1e-12 and h >= 0
    assert mean_ci([m] * len(values))[1] < 1e-12


@pytest.mark.parametrize('change, message', [
    (dict(seeds=()), 'seeds: expected a non-empty tuple'), (dict(text=()), 'text: expected a non-empty tuple'),
    (dict(classify_len=3), 'classify_len: expected at least 4'), (dict(finetune_dropout=1.0), 'finetune_dropout'),
    (dict(n_heads=3), 'd_model'), (dict(pretrain_steps=0), 'pretrain_steps'),
    (dict(pretrain_seeds=()), 'pretrain_seeds: expected a non-empty tuple'),
    (dict(finetune_lrs=(1e-3, -1.0)), 'finetune_lrs'), (dict(suite=('rotten_tomatoes', 'sst2')), 'suite: expected one of'),
    (dict(max_predictions=0), 'max_predictions')])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        PretrainingConfig(**change)


def test_load_pretrained_bert_round_trip_and_error(tmp_path):
    c = PretrainingConfig.tiny()
    tok = corpus_tokenizer(c, load_corpora(c)['text'])
    model = Bert(c.bert_config(), rngs=nnx.Rngs(0))
    save_model(model, tmp_path / 'bert', tok)
    back, back_tok = load_pretrained_bert(tmp_path / 'bert')
    x = jnp.asarray(tok.encode('the red cat'))[None]
    np.testing.assert_allclose(back.mlm_logits(x), model.mlm_logits(x), atol=1e-5)
    with pytest.raises(FileNotFoundError, match='no pre-trained BERT'):
        load_pretrained_bert(tmp_path)


@pytest.mark.slow
def test_cli_quick_run_writes_every_model(tmp_path):
    r = subprocess.run([str(BIN / 'howfar'), 'experiment', 'pretraining', '--quick', '--out', str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / 'pretraining.json').read_text())
    models = {(x['config']['model'], x['metric']) for x in records}
    assert {('bert-random', 'test_accuracy'), ('bert-pretrained', 'test_accuracy'), ('bow-logistic', 'test_accuracy'),
            ('majority', 'test_accuracy'), ('bert-mlm', 'valid_mlm_accuracy'), ('bert-random', 'search_valid_accuracy')} <= models
    assert {x['config']['task'] for x in records if x['metric'] == 'test_accuracy'} == {'toy', 'toy_order'}
    assert all(x['value'] is not None and 0 <= x['value'] <= 1 for x in records if 'accuracy' in x['metric'])
    assert not (tmp_path / 'pretraining_runs.json').exists()  # --quick keeps nothing but the records


def test_multinomial_logistic_regression_is_at_its_optimum():
    rng = np.random.default_rng(1)
    n, f, C, l2 = 150, 12, 3, 1e-2
    X = (rng.random((n, f)) < 0.3).astype(np.float32)
    y = (X @ rng.standard_normal((f, C))).argmax(1)
    idx = np.full((n, f), -1, np.int32)
    for i, row in enumerate(X): on = np.flatnonzero(row); idx[i, :len(on)] = on
    params = logistic_regression(idx, y, f, l2, steps=300, n_classes=C)

    def dense(p):
        w, b = p
        return optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(X) @ w + b, jnp.asarray(y)).mean() + l2 * (w ** 2).sum()
    assert float(optax.tree.norm(jax.grad(dense)(params))) < 1e-4
    np.testing.assert_array_equal(predict_logistic(params, idx), np.asarray(jnp.asarray(X) @ params[0] + params[1]).argmax(1))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(7, 99), max_size=60), st.lists(st.integers(7, 99), max_size=60),
       st.integers(4, 40))
def test_pair_row_fits_and_keeps_the_junction(first, second, max_len):
    row = pair_row(np.asarray(first, np.int32), np.asarray(second, np.int32), max_len)
    assert len(row) <= max_len - 1  # with the [CLS] classification_batch adds
    at = row.tolist().index(SEP_ID)  # ordinary tokens (7 and up) never equal <sep>
    h = (max_len - 2) // 2
    assert row[:at].tolist() == first[max(0, len(first) - h):] and row[at + 1:].tolist() == second[:h]
