"""experiments.longcontext: byte windows, count baselines, training and resuming a run, the cost of a step, gathering runs."""
import dataclasses
import json
import shutil

import numpy as np
import pytest

from transformers_howfar.data.sources import SOURCES, fetch
from transformers_howfar.experiments.longcontext import (LONGCONTEXT_RUNS, longcontext_cost, longcontext_experiment,
                                                         ngram_bits, train_longcontext)


def cache(data_dir, monkeypatch, docs):
    "Fetch `docs` (lists of lines) into `data_dir` as the wikipedia and brown sources, checksums and all."
    for name in ('wikipedia', 'brown'):
        monkeypatch.setitem(SOURCES, name, dataclasses.replace(SOURCES[name], extract=lambda tmp: docs))
        fetch([name], data_dir, progress=False)


def test_longcontext_training_on_a_small_corpus(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran']
    cache(tmp_path, monkeypatch, [[' '.join(rng.choice(words, 12)) for _ in range(3)] for _ in range(80)])
    r = train_longcontext('transformer_1k', 8, quick=True, data_dir=tmp_path, evals=4)
    assert r['context'] == 16 and r['steps'] == 8 and [p['step'] for p in r['curve']] == [2, 4, 6, 8]
    assert r['valid_bits_per_byte'] < r['curve'][0]['valid_bits'] < 8.5  # learns the small vocabulary of letters
    with pytest.raises(ValueError, match='run'): train_longcontext('nope', 1, quick=True, data_dir=tmp_path)
    with pytest.raises(ValueError, match='eval_bytes'): train_longcontext('reformer_local_lsh_16k', 1, quick=True, data_dir=tmp_path, eval_bytes=1000)


@pytest.mark.slow
def test_longcontext_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    cache(tmp_path, monkeypatch, [[' '.join(rng.choice(['ab', 'cd', 'ef'], 40))] for _ in range(80)])
    whole = train_longcontext('reformer_local_lsh_16k', 6, quick=True, data_dir=tmp_path, evals=2)
    run_dir = tmp_path / 'run'
    train_longcontext('reformer_local_lsh_16k', 6, quick=True, data_dir=tmp_path, evals=2, run_dir=run_dir)
    shutil.rmtree(run_dir / 'checkpoints' / '6')  # as if stopped after the step-3 checkpoint
    log = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    for r in log:
        if r['split'] == 'eval' and r['step'] == 3: r['nll'] = 1.0  # a mark: a resumed run keeps what it logged up to step 3
    (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in log))
    resumed = train_longcontext('reformer_local_lsh_16k', 6, quick=True, data_dir=tmp_path, evals=2, run_dir=run_dir, resume=True)
    assert [p['step'] for p in resumed['curve']] == [3, 6] and resumed['curve'][0]['valid_bits'] == pytest.approx(1 / np.log(2))
    assert resumed['valid_bits_per_byte'] == pytest.approx(whole['valid_bits_per_byte'], rel=1e-5)
    with pytest.raises(ValueError, match='steps'):  # going on with another schedule length would change the finished steps' meaning
        train_longcontext('reformer_local_lsh_16k', 8, quick=True, data_dir=tmp_path, evals=2, run_dir=run_dir, resume=True)


def test_longcontext_cost_plans_and_times_a_step():
    r = longcontext_cost('reformer', 64, tokens_per_step=128, steps=2)
    assert 0 < r['plan_gb'] < r['machine_memory_gb'] and r['seconds'] > 0 and np.isfinite(r['loss'])
    with pytest.raises(ValueError, match='kind'): longcontext_cost('rnn', 64)


def test_longcontext_experiment_gathers_finished_runs(tmp_path):
    for run, (model, context, attention) in LONGCONTEXT_RUNS.items():
        result = {'run': run, 'model': model, 'context': context, 'attention': list(attention), 'steps': 5, 'tokens_per_step': 16384, 'eval_bytes': 131072,
                  'parameters': 10, 'valid_bits_per_byte': 2.5, 'curve': [{'step': 5, 'valid_bits': 2.5, 'train_bits': 2.6}],
                  'seconds': 9.0, 'median_step_s': 1.5, 'load_average': 0.1}
        (tmp_path / f'reformer_longcontext_{run}.json').write_text(json.dumps([result]))
    records = longcontext_experiment(steps=5, out_dir=tmp_path, resume=True, costs=False, baselines=())  # nothing to train: all runs are done
    assert {(r['config']['run'], r['metric']) for r in records} == {(run, m) for run in LONGCONTEXT_RUNS
                                                                     for m in ('valid_bits_per_byte', 'train_seconds', 'step_seconds')}
    with pytest.raises(ValueError, match='runs'): longcontext_experiment(steps=5, out_dir=tmp_path, resume=True, runs=('nope',))
    with pytest.raises(ValueError, match='steps'): longcontext_experiment(steps=6, out_dir=tmp_path, resume=True, costs=False, baselines=())


def test_ngram_bits_counts_the_previous_bytes():
    text = np.frombuffer(b'abcabcabcabcacb' * 40, np.uint8)
    one, two, three = (ngram_bits(text, text[:60], n) for n in (1, 2, 3))
    assert one == pytest.approx(np.log2(3), abs=0.01) and three < two < one  # longer contexts predict better here
    with pytest.raises(ValueError, match='alpha'): ngram_bits(text, text, 2, alpha=0)

