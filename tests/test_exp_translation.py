"""The translation experiment (Transformer against LSTM with attention): the quick run end to end, resuming from the
per-model files, scoring against sacrebleu's definitions, the budgeted training loop, the rule, and the errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.bench.measure import read_records
from transformers_howfar.data.batches import seq2seq_batches
from transformers_howfar.experiments.translation import (
    MIN_EPOCHS, TranslationSetup, load_translation_data, make_trainer, score_translations, train_within_budget,
    translate, translation_configs, translation_experiment, translation_findings)

BIN = Path(sys.executable).parent


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('translation')
    return out, translation_experiment(quick=True, out_dir=out)


@pytest.mark.slow
def test_quick_run_writes_every_model_and_metric(quick_run):
    out, records = quick_run
    assert sorted(p.name for p in out.iterdir()) == ['translation_rnn-seed0.json', 'translation_transformer-seed0.json']
    by = {(r['config']['model'], r['metric'], r['config'].get('decoding')): r['value'] for r in records}
    for model in ('transformer', 'rnn'):
        for decoding in ('greedy', 'beam'):
            assert 0 <= by[(model, 'bleu', decoding)] <= 100 and 0 <= by[(model, 'chrf', decoding)] <= 100
        assert by[(model, 'tokens_per_s_training', None)] > 0 and by[(model, 'train_seconds', None)] > 0
        assert np.isfinite(by[(model, 'valid_nll', None)])
        side = json.loads((out / f'translation_{model}-seed0.json').read_text())
        assert side['steps'] == TranslationSetup.tiny().steps and side['seed'] == 0
        seconds = [p['train_seconds'] for p in side['curve']]
        assert seconds == sorted(seconds) and 0 < seconds[0] and seconds[-1] == side['train_seconds']  # forward in time
        assert len(side['samples']) == TranslationSetup.tiny().n_samples


@pytest.mark.slow
def test_resume_reads_the_per_model_files_instead_of_training(quick_run, tmp_path):
    out, _ = quick_run
    for f in out.iterdir(): (tmp_path / f.name).write_text(f.read_text())
    side = json.loads((tmp_path / 'translation_rnn-seed0.json').read_text())
    side['beam']['bleu'] = 42.5  # a value training could not produce here: proves it was read back
    (tmp_path / 'translation_rnn-seed0.json').write_text(json.dumps(side))
    records = translation_experiment(quick=True, out_dir=tmp_path, resume=True)
    beam = [r for r in records if r['config']['model'] == 'rnn' and r['metric'] == 'bleu' and r['config']['decoding'] == 'beam']
    assert [r['value'] for r in beam] == [42.5]
    # the command line: --out reaches the experiment as out_dir, --resume as resume
    p = subprocess.run([str(BIN / 'howfar'), 'experiment', 'translation', '--quick', '--resume', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    records = json.loads((tmp_path / 'translation.json').read_text())
    assert [r['value'] for r in records if r['config']['model'] == 'rnn' and r['metric'] == 'bleu' and r['config']['decoding'] == 'beam'] == [42.5]
    # a file written with another set-up is trained again, not read
    side['setup']['learning_rate'] = 0.5
    (tmp_path / 'translation_rnn-seed0.json').write_text(json.dumps(side))
    records = translation_experiment(quick=True, out_dir=tmp_path, resume=True)
    assert [r['value'] for r in records if r['config']['model'] == 'rnn' and r['metric'] == 'bleu' and r['config']['decoding'] == 'beam'] != [42.5]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.text(alphabet='abcdefgh', min_size=1, max_size=6), min_size=4, max_size=9), min_size=1, max_size=5))
def test_identical_translations_score_100(word_lists):
    sentences = [' '.join(words) for words in word_lists]
    s = score_translations(sentences, sentences)
    assert s['bleu'] == pytest.approx(100) and s['chrf'] == pytest.approx(100)


def test_scores_fall_with_errors_and_match_sacrebleu():
    import sacrebleu
    refs = ['le chat est assis sur la table rouge .', 'il pleut depuis ce matin sur la ville .']
    one = ['le chat est assis sur la table bleue .', 'il pleut depuis ce matin sur la ville .']
    two = ['le chien est couché sous la table bleue .', 'il neige depuis hier soir .']
    s0, s1, s2 = (score_translations(h, refs) for h in (refs, one, two))
    assert s0['bleu'] > s1['bleu'] > s2['bleu'] and s0['chrf'] > s1['chrf'] > s2['chrf']
    assert s1['bleu'] == pytest.approx(sacrebleu.corpus_bleu(one, [refs]).score)
    with pytest.raises(ValueError, match='hypotheses'): score_translations(['a'], refs)
    with pytest.raises(ValueError, match='references'): score_translations([], [])


@pytest.fixture(scope='module')
def tiny():
    setup, configs = TranslationSetup.tiny(), translation_configs(quick=True)
    return setup, configs, load_translation_data(setup)


def test_training_pairs_fill_whole_batches(tiny):
    setup, _, data = tiny
    assert len(data['train']) % setup.batch_size == 0 and len(data['train']) > 0
    batches = seq2seq_batches(data['train'], setup.batch_size, seed=0, pad_multiple=setup.pad_multiple)
    assert {next(batches)['src'].shape[0] for _ in range(len(data['train']) // setup.batch_size + 2)} == {setup.batch_size}


def test_budget_counts_training_seconds_only(tiny):
    setup, configs, data = tiny
    setup = setup.replace(budget_s=1.5, steps=10**6, curve_every_s=0.5)
    trainer = make_trainer('transformer', configs['transformer'], setup)
    batches = seq2seq_batches(data['train'], setup.batch_size, seed=0, pad_multiple=setup.pad_multiple)
    valid = lambda: seq2seq_batches(data['valid'], setup.batch_size, shuffle=False, epochs=1)
    import time
    point = lambda step, seconds: (time.sleep(0.6), {'step': step, 'train_seconds': seconds})[1]  # slow points cost nothing
    summary = train_within_budget(trainer, batches, valid, setup, point)
    assert summary['train_seconds'] >= 1.5 and trainer.step == summary['step'] >= 1  # stops once the budget is spent
    curve = summary['curve']
    assert curve[-1] == {'step': trainer.step, 'train_seconds': summary['train_seconds']}
    assert summary['seconds'] >= summary['train_seconds'] + 0.6 * len(curve[:-1])  # the points' time is not counted
    assert all(b['train_seconds'] - a['train_seconds'] >= 0.5 for a, b in zip(curve[:-2], curve[1:-1]))  # one point per 0.5 s
    assert summary['target_tokens'] > 0 and 'nll' in summary['eval']


def test_rule_needs_seeds_and_epochs():
    rec = lambda model, seed, bleu, epochs=MIN_EPOCHS: {'metric': 'bleu', 'value': bleu, 'config': {
        'model': model, 'seed': seed, 'decoding': 'beam', 'epochs': epochs}}
    holds = [rec('transformer', s, 10 + s) for s in range(3)] + [rec('rnn', s, 5) for s in range(3)]
    assert translation_findings(holds).verdict == 'holds'
    assert translation_findings([rec('transformer', s, 5) for s in range(3)] + [rec('rnn', s, 10 + s) for s in range(3)]).verdict == 'does not hold'
    assert translation_findings(holds[:1] + holds[3:4]).verdict == 'not tested'
    short = [rec('transformer', s, 10 + s, epochs=MIN_EPOCHS / 2) for s in range(3)] + [rec('rnn', s, 5) for s in range(3)]
    assert translation_findings(short).verdict == 'not tested' and 'epochs' in translation_findings(short).reason


def test_translate_greedy_and_beam_shapes_and_errors(tiny):
    setup, configs, data = tiny
    model = make_trainer('transformer', configs['transformer'], setup).model
    sources = [s for s, _ in data['test'][:5]]
    greedy = translate(model, data['tokenizer'], sources, seq_len=32, max_new_tokens=6, batch_size=4)
    beam = translate(model, data['tokenizer'], sources, seq_len=32, max_new_tokens=6, beam_size=2, batch_size=4)
    assert len(greedy) == len(beam) == 5 and all(isinstance(t, str) for t in greedy + beam)
    with pytest.raises(ValueError, match='sources'): translate(model, data['tokenizer'], 'a sentence')
    with pytest.raises(ValueError, match='beam_size'): translate(model, data['tokenizer'], sources, beam_size=0)
    with pytest.raises(ValueError, match='name'): make_trainer('gru', configs['rnn'], setup)


@pytest.mark.parametrize('field, value', [('beam_size', 0), ('budget_s', -1.0), ('pad_multiple', 0), ('learning_rate', 0.0)])
def test_setup_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field): TranslationSetup(**{field: value})


def test_cli_lists_the_experiment():
    p = subprocess.run([str(BIN / 'howfar'), 'experiment'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert any(line.startswith('translation ') for line in p.stdout.splitlines())
