"Tests of transformers_howfar.experiments.duplication: attention modes as config options on the same trained state, evaluation, the experiment command."
import json
import os
from pathlib import Path
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.experiments.duplication import (DUPLICATION_SEEDS, DUPLICATION_STEPS, PAPER_TABLE2, TRAIN_MODES, TRAIN_STEPS,
                                                 model_train_config, same_setup, accuracy_table, attention_options,
                                                 duplication_setup, evaluate_modes, mode_name, with_mode)
from transformers_howfar.layers.hashing import shared_qk_attention
from transformers_howfar.data.tokenizer import NUM_SPECIAL
from transformers_howfar.train.tasks import TASKS, DuplicateConfig
from transformers_howfar.train.trainer import TrainConfig


def _model(word_length=8):
    cfg = DuplicateConfig(vocab_size=NUM_SPECIAL + 5, d_model=16, d_ff=32, n_heads=2, n_layers=1, max_len=2 * word_length + 1,
                          dropout_rate=0.0, word_length=word_length, n_symbols=5, attention=('lsh',))
    return TASKS['duplicate'].build(cfg, TrainConfig.tiny().replace(batch_size=2))


@pytest.mark.parametrize('mode,expected', [
    ('full', ('lsh.chunk_length=8', f'lsh.dense_threshold={2**62}')),
    ('full-noself', ('lsh.chunk_length=8', f'lsh.dense_threshold={2**62}', 'lsh.mask_self=false')),
    (4, ('lsh.chunk_length=8', 'lsh.dense_threshold=0', 'lsh.n_buckets=null', 'lsh.n_rounds=4')),
])
def test_attention_options(mode, expected):
    assert attention_options(mode, 8) == expected
    assert mode_name(mode) == (mode if isinstance(mode, str) else 'lsh-4')


@pytest.mark.parametrize('bad', [0, -1, True, 2.0, 'lsh'])
def test_attention_options_errors(bad):
    with pytest.raises(ValueError, match='mode: expected'): attention_options(bad, 8)
    with pytest.raises(ValueError, match='chunk_length'): attention_options('full', 0)


def test_switch_modes_on_the_same_weights():
    task = _model()
    model, tokens = task.model, jnp.array([[3, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5]])
    full_model = with_mode(model, 'full', 4)
    full = full_model(tokens)
    # the 'full' mode is the dense shared-QK attention: check the attention layer against it directly
    mha = next(n for _, n in nnx.iter_graph(full_model) if type(n).__name__ == 'MultiHeadAttention')
    x = jnp.ones((1, 17, 16)) * jnp.arange(1, 18)[None, :, None] / 17
    ref = mha.out(shared_qk_attention(mha.q(x), mha.v(x), causal=True))
    np.testing.assert_allclose(mha(x), ref, atol=1e-5)
    noself = next(n for _, n in nnx.iter_graph(with_mode(model, 'full-noself', 4)) if type(n).__name__ == 'MultiHeadAttention')
    np.testing.assert_allclose(noself(x), mha.out(shared_qk_attention(mha.q(x), mha.v(x), causal=True, mask_self=False)), atol=1e-5)
    assert not np.allclose(noself(x), ref, atol=1e-3)  # the own key now competes
    np.testing.assert_allclose(with_mode(model, 1, 32)(tokens), full, atol=1e-5)  # one chunk holds every key
    two = with_mode(model, 2, 2)
    assert float(jnp.abs(two(tokens) - full).max()) > 1e-4
    layer = lambda m: next(n for _, n in nnx.iter_graph(m) if type(n).__name__ == 'MultiHeadAttention')
    assert dict(layer(two).options)['n_rounds'] == 2 and layer(model).options == ()  # a new model; the trained one is untouched
    np.testing.assert_array_equal(nnx.state(two, nnx.Param)['stack']['blocks'][0]['attention']['mha']['q']['kernel'][...],
                                  nnx.state(model, nnx.Param)['stack']['blocks'][0]['attention']['mha']['q']['kernel'][...])
    with pytest.raises(ValueError, match=r"model: expected a model whose config has attention \('lsh',\)"):
        with_mode(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 1, 4)


def test_saved_setups_still_match_so_resume_keeps_the_trained_models():
    model, train, chunk, buckets = duplication_setup(False)
    setup = lambda mode, seed: json.loads(json.dumps({'model': model.to_dict(), 'train': model_train_config(train, mode, seed).to_dict(),
                                                      'chunk_length': chunk, 'n_buckets': buckets}))
    results = Path(__file__).parents[1] / 'experiments' / 'results'
    found = 0
    for mode in TRAIN_MODES:
        for seed in DUPLICATION_SEEDS:
            path = results / f'duplication_{mode_name(mode)}-seed{seed}.json'
            if path.exists():
                found += 1
                assert same_setup(json.loads(path.read_text())['setup'], setup(mode, seed)), path.name
    assert found >= 3
    old = setup(4, 0)  # a setup saved before a config field existed reads with that field's default
    del old['model']['attention_options']
    assert same_setup(old, setup(4, 0)) and not same_setup(old, setup(4, 1))
    assert not same_setup(dict(old, chunk_length=8), setup(4, 0)) and not same_setup(None, setup(4, 0))
    assert not same_setup(dict(old, model=dict(old['model'], d_model=128)), setup(4, 0))


def test_budgets_and_seeds():
    _, train, _, _ = duplication_setup(False)
    assert model_train_config(train, 1, 2).steps == TRAIN_STEPS['lsh-1'] > DUPLICATION_STEPS == model_train_config(train, 4, 0).steps
    assert model_train_config(train, 'full', 2).seed == 2 and train.eval_batches == 32
    assert model_train_config(train, 1, 2, quick=True).steps == train.steps  # quick runs keep their two steps


def test_evaluate_modes_uses_fresh_hashes_and_every_mode():
    task = _model()
    out = evaluate_modes(task.model, task.loss_fn, task.eval_data, modes=('full', 1, 8), chunk_length=2, n_batches=2)
    assert sorted(out) == ['full', 'lsh-1', 'lsh-8']
    assert all(0 <= v['accuracy'] <= 1 and np.isfinite(v['nll']) for v in out.values())
    assert len({round(v['nll'], 6) for v in out.values()}) == 3  # the rounds change the attention, hence the loss
    with pytest.raises(ValueError, match='n_batches'):
        evaluate_modes(task.model, task.loss_fn, task.eval_data, chunk_length=2, n_batches=0)


def test_setup_and_tables():
    model, train, chunk, buckets = duplication_setup(False)
    assert (model.word_length, model.seq_len, model.d_model, model.n_heads, model.n_layers) == (127, 255, 256, 4, 1)
    assert 2 * model.word_length + 2 >= 256 and chunk == 16 and buckets == 32
    assert sorted(PAPER_TABLE2) == ['full', 'lsh-1', 'lsh-2', 'lsh-4'] and PAPER_TABLE2['lsh-4']['lsh-1'] == 91.9
    recs = [{'metric': 'accuracy', 'value': 50.0, 'config': {'train_mode': 'full', 'eval_mode': 'lsh-1', 'seed': 0}},
            {'metric': 'accuracy', 'value': 70.0, 'config': {'train_mode': 'full', 'eval_mode': 'lsh-1', 'seed': 1}},
            {'metric': 'nll', 'value': 1.0, 'config': {'train_mode': 'full', 'eval_mode': 'lsh-1', 'seed': 0}}]
    assert accuracy_table(recs) == {'full': {'lsh-1': 60.0}}  # the mean over seeds


def test_committed_results_are_complete():
    path = Path(__file__).parents[1] / 'experiments' / 'results' / 'duplication.json'
    table = accuracy_table(json.loads(path.read_text()))
    assert 'lsh-4' in table and set(table) <= {'full', 'lsh-1', 'lsh-2', 'lsh-4'}  # a model still training has no row yet
    assert all(sorted(v) == ['full', 'full-noself', 'lsh-1', 'lsh-2', 'lsh-4', 'lsh-8'] for v in table.values())
    seeds = {r['config']['seed'] for r in json.loads(path.read_text()) if r['config']['train_mode'] == 'lsh-4'}
    assert seeds == set(DUPLICATION_SEEDS)  # the claim's model has every seed


@pytest.mark.slow
def test_cli_quick_and_resume(tmp_path):
    howfar = str(Path(sys.executable).parent / 'howfar')
    env = dict(os.environ, HOWFAR_EXPERIMENT_CACHE=str(tmp_path / 'cache'))
    out = subprocess.run([howfar, 'experiment', 'duplication', '--quick', '--out', str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    first = json.loads((tmp_path / 'duplication.json').read_text())
    assert len(first) == 24 and {r['config']['train_mode'] for r in first} == {'full', 'lsh-1'}
    assert {r['config']['seed'] for r in first} == {0, 1}
    per_model = tmp_path / 'cache' / 'duplication' / 'quick'
    assert (per_model / 'duplication_lsh-1-seed1.json').exists() and (per_model / 'lsh-1-seed1' / 'checkpoints' / '2').exists()
    # resuming reads the finished models back: the same records, no training
    out = subprocess.run([howfar, 'experiment', 'duplication', '--quick', '--resume', '--out', str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / 'duplication.json').read_text()) == first
