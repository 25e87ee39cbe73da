"""The `howfar` command end to end, as a user runs it."""
import pytest
import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def howfar(*args, cwd=None):
    return subprocess.run([str(BIN / 'howfar'), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_commands():
    r = howfar('--help')
    assert r.returncode == 0
    for cmd in ("bench", "demo", "data", "train", "generate"): assert cmd in r.stdout


def test_version():
    import transformers_howfar
    r = howfar('--version')
    assert r.returncode == 0 and transformers_howfar.__version__ in r.stdout


def test_bench_writes_records(tmp_path):
    r = howfar('bench', 'matmul', '--quick', '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr
    records = json.loads((tmp_path / 'matmul.json').read_text())
    assert records and all({'benchmark', 'config', 'metric', 'value', 'unit', 'machine'} <= set(rec) for rec in records)
    assert records[0]['value'] > 0 and records[0]['machine']['cpu_cores'] >= 1


def test_bench_lists_and_rejects_unknown_names(tmp_path):
    r = howfar('bench')
    assert r.returncode == 0 and 'matmul' in r.stdout
    r = howfar('bench', 'nope', '--out', str(tmp_path))
    assert r.returncode == 2 and "howfar bench: error: name: expected one of" in r.stderr
    assert 'Traceback' not in r.stderr


def test_quick_runs_default_to_a_quick_folder(tmp_path):
    r = howfar('bench', 'matmul', '--quick', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'benchmarks' / 'results' / 'quick' / 'matmul.json').exists()
    assert not (tmp_path / 'benchmarks' / 'results' / 'matmul.json').exists()  # a full run's results are never replaced


@pytest.mark.slow
def test_demo_runs_and_writes_plots(tmp_path):
    r = howfar('demo', '--quick', '--out', str(tmp_path / 'out'))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'out' / 'attention.png').stat().st_size > 1000
    assert 'held-out accuracy on the second copy' in r.stdout
    records = json.loads((tmp_path / 'out' / 'attention.json').read_text())
    assert {r['config']['attention'] for r in records} == {'exact', 'lsh'} and all(r['value'] > 0 for r in records)
    assert (tmp_path / 'out' / 'duplicate' / 'metrics.jsonl').exists()


@pytest.mark.slow
def test_train_reformer_then_generate_from_the_run_directory(tmp_path):
    run = tmp_path / 'reformer'
    r = howfar('train', 'reformer_lm', '--preset', 'tiny', 'steps=4', 'checkpoint_every=2', 'progress=false', '--run-dir', str(run))
    assert r.returncode == 0, r.stderr
    assert (run / 'model' / 'model.json').exists() and 'models.reformer:ReformerLM' in (run / 'model' / 'model.json').read_text()
    finished = howfar('generate', str(run), 'the cat', '--max-new-tokens', '6')
    assert finished.returncode == 0, finished.stderr
    at_step = howfar('generate', str(run), 'the cat', '--max-new-tokens', '6', '--step', '4')
    assert at_step.returncode == 0 and at_step.stdout == finished.stdout  # the last checkpoint is the finished model
    early = howfar('generate', str(run), 'the cat', '--max-new-tokens', '6', '--step', '2')
    assert early.returncode == 0, early.stderr
    again = howfar('train', 'reformer_lm', '--preset', 'tiny', 'steps=6', 'checkpoint_every=2', 'progress=false', '--run-dir', str(run))
    assert again.returncode == 0 and 'step 6' in again.stdout, again.stdout + again.stderr  # resumed from step 4
    bad = howfar('generate', str(run / 'model'), 'x', '--step', '2')
    assert bad.returncode == 2 and 'step: ' in bad.stderr and 'not a run directory' in bad.stderr
