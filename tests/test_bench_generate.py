"""`howfar bench generate` in its quick version: the measurements run, every record is written, and without a torch
Python the HF side says why it is missing."""
import pytest
from transformers_howfar.bench.generate import generate_benchmark, measure_generation, measure_step


def test_benchmark_measurements_quick():
    assert measure_generation(4, quick=True, repeats=1)['tokens_per_s'] > 0
    assert measure_step(4, use_cache=True, window=8, quick=True)['ms'] > 0
    assert measure_step(4, use_cache=False, quick=True)['ms'] > 0


@pytest.mark.slow
def test_generate_benchmark_quick_records(monkeypatch):
    monkeypatch.delenv('HOWFAR_TORCH_PYTHON', raising=False)
    records = generate_benchmark(quick=True)
    ours = [r for r in records if r['config'].get('impl') == 'ours']
    assert {(r['metric'], r['config']['cache']) for r in ours} == {(m, c) for m in ('tokens_per_s', 'step_ms') for c in (True, False)}
    assert all(r['value'] > 0 for r in ours)
    hf = [r for r in records if r['config'].get('impl') == 'hf']
    assert len(hf) == 1 and hf[0]['value'] is None and 'HOWFAR_TORCH_PYTHON' in hf[0]['config']['error']
    ratios = {r['metric']: r['value'] for r in records if 'target' in r['config']}
    assert ratios['speedup_vs_hf_cached'] is None and ratios['cache_speedup'] > 0
