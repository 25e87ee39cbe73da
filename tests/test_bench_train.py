"""`howfar bench train` in its quick version: every record is there and consistent, the FLOP formula agrees with XLA's
count, and the PyTorch reference is a script of its own, run through `run_reference`."""
import pytest
import sys

from transformers_howfar.bench.measure import REFERENCES, run_reference
from transformers_howfar.bench.train import decoder_train_flops, train_benchmark


@pytest.mark.slow
def test_train_benchmark_quick_records(monkeypatch):
    monkeypatch.delenv('HOWFAR_TORCH_PYTHON', raising=False)
    name = lambda c: c.get('framework', c.get('reference')) + (f"/{c['attention']}" if 'attention' in c else '')
    all_records = train_benchmark(quick=True)
    records = {(name(r['config']), r['metric']): r for r in all_records if r['metric'] != 'seconds'}
    peak = records[('matmul', 'matmul_peak')]['value']
    assert peak > 0
    for kind in ('full', 'chunked'):  # the library's LM with each attention kind
        jax_tps, mfu = records[(f'jax/{kind}', 'tokens_per_s')]['value'], records[(f'jax/{kind}', 'mfu')]
        assert jax_tps > 0 and len(mfu['config']['load_average']) == 2
        assert abs(mfu['value'] - jax_tps * mfu['config']['flops_per_token'] / (peak * 1e9)) < 1e-9
        # the analytic count and XLA's count of the compiled step agree within a factor of two
        assert 0.5 < mfu['config']['xla_flops_per_token'] / mfu['config']['flops_per_token'] < 2.0
        assert records[(f'jax/torch/{kind}', 'speedup')]['value'] is None  # no PyTorch, no ratio
        parts = {r['config']['part']: r['value'] for r in all_records if r['metric'] == 'seconds' and r['config'].get('attention') == kind}
        assert set(parts) == {'forward_loss', 'forward_backward', 'optimizer', 'attention', 'output_layer_loss'}
        assert all(v > 0 for v in parts.values())
    assert records[('torch', 'tokens_per_s')]['value'] is None and 'HOWFAR_TORCH_PYTHON' in records[('torch', 'mfu')]['config']['error']
    assert decoder_train_flops(6, 512, 2048, 512, 8192) == 6 * (6 * (4 * 512**2 + 2 * 512 * 2048) + 512 * 8192) + 12 * 6 * 512 * 512


def test_reference_scripts_stand_alone():
    for script in ('train_torch.py', 'generate_hf.py'):  # they run in a Python with torch, without this package
        text = (REFERENCES / script).read_text()
        assert 'transformers_howfar' not in text and '@@RESULT@@' in text and 'json.loads(sys.argv[1])' in text
    # an interpreter without torch: the protocol answers with the error, it does not raise
    assert 'torch' in run_reference('train_torch.py', {}, python=sys.executable)['error']
