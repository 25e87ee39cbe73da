"Tests of transformers_howfar.bench.attention: one case, the PyTorch reference script's protocol, the quick benchmark's records."
import ast

from transformers_howfar.bench.attention import attention_benchmark, attention_case
from transformers_howfar.bench.measure import REFERENCES, run_reference

SCRIPT = REFERENCES / 'attention_torch.py'


def test_case_of_every_kind():
    for kind in ('jax_dense', 'chunked', 'local', 'memory_compressed', 'sparse'):
        r = attention_case(kind, 256, repeats=1)
        assert r['seconds'] > 0 and r['compile_s'] > 0, kind


def test_reference_script_stands_alone():
    "The script reads one JSON argument and never imports this package (it runs in a Python without JAX)."
    text = SCRIPT.read_text()
    tree = ast.parse(text)
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'transformers_howfar' not in imported and 'jax' not in imported
    assert 'json.loads(sys.argv[1])' in text and '@@RESULT@@' in text


def test_reference_without_torch_python_is_an_error():
    assert 'error' in run_reference('attention_torch.py', {'length': 256}, python='/nonexistent/python')


def test_quick_benchmark_records(monkeypatch):
    monkeypatch.delenv('HOWFAR_TORCH_PYTHON', raising=False)
    records = attention_benchmark(quick=True)
    kinds = {r['config']['kind'] for r in records}
    assert kinds == {'jax_dense', 'chunked', 'local'}
    assert {r['metric'] for r in records} == {'time', 'peak_memory', 'time_per_token'}
    assert all(r['config']['length'] == 512 and r['value'] is not None and r['value'] > 0 for r in records)
