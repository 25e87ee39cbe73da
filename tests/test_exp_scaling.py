"""The scaling experiment: the quick run end to end with saved models that load back, the same batches for every size,
parameter counts, the power-law fit against known exponents, resuming from the per-size files, and the errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.experiments.scaling import (
    QUICK_SIZES, SIZES, ScalingSetup, fit_power_law, load_scaling_data, load_scaling_model, scaling_batches,
    parameter_counts, scaling_config, scaling_experiment, train_size)
from transformers_howfar.models.lm import LM
from transformers_howfar.models.saving import load, load_tokenizer

BIN = Path(sys.executable).parent


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out, models = tmp_path_factory.mktemp('scaling'), tmp_path_factory.mktemp('scaling_models')
    return out, scaling_experiment(quick=True, out_dir=out, folder=models), models


@pytest.mark.slow
def test_quick_run_records_each_size_and_both_fits(quick_run):
    out, records, _ = quick_run
    assert sorted(p.name for p in out.iterdir()) == ['scaling_q1.json', 'scaling_q2.json']
    losses = {r['config']['size']: r['value'] for r in records if r['metric'] == 'valid_nll'}
    assert set(losses) == set(QUICK_SIZES) and all(0 < v < math.log(36) + 1 for v in losses.values())
    fits = {r['config']['against']: r for r in records if r['metric'] == 'alpha'}
    assert set(fits) == {'params', 'non_embedding_params'}
    tokens = {r['config']['tokens'] for r in records if 'tokens' in r['config']}
    assert tokens == {ScalingSetup.tiny().tokens}  # every size saw the same number of tokens
    side = json.loads((out / 'scaling_q2.json').read_text())
    assert [s['prompt'] for s in side['samples']] == list(ScalingSetup.tiny().prompts)
    assert any(c['split'] == 'eval' for c in side['curve'])


@pytest.mark.slow
def test_resume_reads_the_per_size_files(quick_run, tmp_path):
    out, _, _ = quick_run
    for f in out.iterdir(): (tmp_path / f.name).write_text(f.read_text())
    side = json.loads((tmp_path / 'scaling_q1.json').read_text())
    side['valid_nll'] = 9.25
    (tmp_path / 'scaling_q1.json').write_text(json.dumps(side))
    records = scaling_experiment(quick=True, out_dir=tmp_path, resume=True)
    assert [r['value'] for r in records if r['metric'] == 'valid_nll' and r['config']['size'] == 'q1'] == [9.25]


@pytest.mark.slow
def test_resample_draws_from_the_saved_models(quick_run, tmp_path):
    out, records, models = quick_run
    for f in out.iterdir(): (tmp_path / f.name).write_text(f.read_text())
    side = json.loads((tmp_path / 'scaling_q2.json').read_text())
    side['samples'] = []
    (tmp_path / 'scaling_q2.json').write_text(json.dumps(side))
    scaling_experiment(quick=True, out_dir=tmp_path, resume=True, folder=models, resample=True)
    again = json.loads((tmp_path / 'scaling_q2.json').read_text())['samples']
    assert again == json.loads((out / 'scaling_q2.json').read_text())['samples']  # same saved model, same key: same text


@pytest.mark.slow
def test_table_has_one_row_per_size(quick_run):
    from transformers_howfar.bench.measure import records_table
    lines = records_table(quick_run[1], ['valid_nll', 'train_seconds'], ['size', 'model_config.d_model', 'params']).splitlines()
    assert len(lines) == 4 and lines[2].startswith('| q1 |') and lines[3].startswith('| q2 |')
    assert all(cell.strip() not in ('–', 'None') for line in lines[2:] for cell in line.strip('|').split('|'))


@pytest.mark.slow
def test_saved_model_reproduces_the_reported_validation_loss(quick_run):
    out, records, models = quick_run
    setup = ScalingSetup.tiny()
    model, tok = load(models / 'q2' / 'model'), load_tokenizer(models / 'q2' / 'model')
    assert tok.vocab_size == setup.vocab_size and (models / 'tokenizer' / 'tokenizer.json').exists()
    data = load_scaling_data(setup, tok)
    nll, n = 0.0, 0
    for b in list(scaling_batches(data, setup, 'valid'))[:setup.eval_batches]:
        logp = np.asarray(jax.nn.log_softmax(model(b['inputs']), -1))
        nll -= float(np.take_along_axis(logp, b['targets'][..., None], -1).sum()); n += b['targets'].size
    reported = [r['value'] for r in records if r['metric'] == 'valid_nll' and r['config']['size'] == 'q2'][0]
    assert nll / n == pytest.approx(reported, rel=1e-4)  # the saved parameters are the trained ones
    with pytest.raises(FileNotFoundError, match='size'): load_scaling_model('xs', retrain=False, folder=models)
    with pytest.raises(ValueError, match='size'): load_scaling_model('q1', retrain=False, folder=models)  # not a full-run size


def test_load_scaling_model_reads_a_saved_size(tmp_path):
    setup = ScalingSetup.tiny()
    data = load_scaling_data(setup)
    from transformers_howfar.models.saving import save_model
    model = LM(scaling_config(setup, 'xs', SIZES).replace(vocab_size=36), rngs=nnx.Rngs(0))
    save_model(model, tmp_path / 'xs' / 'model', data['tokenizer'])
    loaded, tok = load_scaling_model('xs', retrain=False, folder=tmp_path)
    assert loaded.config == model.config and tok.vocab_size == 36


def test_every_size_gets_the_same_batches():
    setup = ScalingSetup.tiny()
    data = load_scaling_data(setup)
    a, b = scaling_batches(data, setup), scaling_batches(data, setup)
    for _ in range(3): np.testing.assert_array_equal(next(a)['inputs'], next(b)['inputs'])
    valid = list(scaling_batches(data, setup, 'valid'))
    assert len(valid) >= 1 and all(v['inputs'].shape == (setup.batch_size, setup.seq_len) for v in valid)
    with pytest.raises(ValueError, match='which'): scaling_batches(data, setup, 'test')


@pytest.mark.parametrize('size', ['xs', 's'])
def test_parameter_counts_match_the_built_model(size):
    config = scaling_config(ScalingSetup(), size).replace(vocab_size=100, max_len=16)
    model = LM(config, rngs=nnx.Rngs(0))
    counts = parameter_counts(model)
    assert counts['params'] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counts['params'] - counts['non_embedding_params'] == (100 + 16) * config.d_model  # token and position tables
    assert parameter_counts(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))) == counts  # counted without allocating


def test_sizes_span_the_range_asked_for_and_match_the_committed_results():
    counts = {s: parameter_counts(nnx.eval_shape(lambda: LM(scaling_config(ScalingSetup(), s), rngs=nnx.Rngs(0)))) for s in SIZES}
    totals = [c['params'] for c in counts.values()]
    assert totals == sorted(totals) and totals[0] < 0.2e6 and totals[-1] > 3e6
    results = Path(__file__).parents[1] / 'experiments' / 'results'
    for s, c in counts.items():
        side = json.loads((results / f'scaling_{s}.json').read_text())
        assert {k: side[k] for k in c} == c, s


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 1.0), st.floats(0.5, 50.0), st.lists(st.floats(1e4, 1e8), min_size=3, max_size=6, unique=True))
def test_power_law_fit_recovers_exponent(alpha, a, n):
    n = np.array(sorted(n))
    if n[-1] / n[0] < 2: return  # too narrow a range to pin down the slope
    fit = fit_power_law(n, a * n ** -alpha)
    assert fit['alpha'] == pytest.approx(alpha, rel=1e-6, abs=1e-9) and fit['a'] == pytest.approx(a, rel=1e-5)
    assert fit['r2'] == pytest.approx(1.0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match='length'): fit_power_law([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match='positive'): fit_power_law([1.0, -2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match='corpora'): ScalingSetup(corpora=())
    with pytest.raises(ValueError, match='steps'): ScalingSetup(steps=0)
    with pytest.raises(ValueError, match='size'): scaling_config(ScalingSetup(), 'huge')
    setup = ScalingSetup.tiny()
    with pytest.raises(ValueError, match='vocab_size'): load_scaling_data(setup.replace(vocab_size=40))


def test_cli_lists_the_experiment():
    p = subprocess.run([str(BIN / 'howfar'), 'experiment'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert any(line.startswith('scaling ') for line in p.stdout.splitlines())
