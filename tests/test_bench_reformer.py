"""bench.reformer: the benchmark model, the reformer-pytorch reference run by `run_reference`, the command line."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transformers_howfar.bench.reformer import bench_config, profile_shares, reformer_pytorch_benchmark, torch_lm_step
from transformers_howfar.bench.measure import REFERENCES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize('length', [1, 7, 100, 65536, 2 ** 20])
def test_bench_config_axial_positions_cover_length(length):
    c = bench_config(2, length)
    assert c.axial_shape[0] * c.axial_shape[1] >= length and c.max_len == length


def test_torch_benchmark_needs_its_python(monkeypatch):
    monkeypatch.delenv('HOWFAR_TORCH_PYTHON', raising=False)
    with pytest.raises(ValueError, match='HOWFAR_TORCH_PYTHON'): reformer_pytorch_benchmark(quick=True)


@pytest.mark.slow
def test_bench_memory_quick_cli(tmp_path):
    howfar = Path(sys.executable).with_name('howfar')
    r = subprocess.run([str(howfar), 'bench', 'memory', '--quick', '--out', str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / 'memory.json').read_text())
    peaks = [x for x in records if x['metric'] == 'peak_memory']
    assert {x['config']['residual'] for x in peaks} == {'reversible', 'ordinary'} and all(x['value'] and x['value'] > 0 for x in peaks), records
    steps = [x for x in records if x['metric'] == 'step_time']
    assert len(steps) == 2 and all(x['value'] > 0 and np.isfinite(x['config']['loss']) and x['config']['loss'] > 0 for x in steps), records


def test_torch_reference_is_a_script_run_by_run_reference():
    assert (REFERENCES / 'reformer_pytorch.py').is_file()
    source = (REFERENCES / 'reformer_pytorch.py').read_text()
    assert 'import transformers_howfar' not in source and 'from transformers_howfar' not in source  # runs without JAX
    r = torch_lm_step(1, 64, sys.executable, threads=1)  # this Python has no torch: the import fails, as a value
    assert list(r) == ['error'] and 'torch' in r['error']


@pytest.mark.slow
def test_bench_profile_quick_cli(tmp_path):
    howfar = Path(sys.executable).with_name('howfar')
    r = subprocess.run([str(howfar), 'bench', 'reformer_profile', '--quick', '--out', str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / 'reformer_profile.json').read_text())
    assert {x['config']['part'] for x in records} >= {'attention_forward', 'model_forward_backward', 'adam_update'}
    shares = {x['config']['part']: x['value'] for x in profile_shares(records)}
    assert all(v > 0 for v in shares.values()) and shares['sum of the first four parts'] > 50
