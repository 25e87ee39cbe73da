"Tests of transformers_howfar.bench.lsh: the layer step, the PyTorch reference script's protocol, and `howfar bench lsh --quick`."
import pytest
import ast
import json
from pathlib import Path
import subprocess
import sys

from transformers_howfar.bench.lsh import lsh_layer_step, torch_reference
from transformers_howfar.bench.measure import REFERENCES

SCRIPT = REFERENCES / 'lsh_torch.py'


def test_layer_step_lsh_and_dense():
    for attention in ('lsh', 'dense'):
        r = lsh_layer_step(128, attention=attention, repeats=1)
        assert r['seconds'] > 0 and r['value'] == r['value']  # a number, not NaN


def test_reference_script_stands_alone():
    "The script reads one JSON argument and never imports this package (it runs in a Python without JAX)."
    tree = ast.parse(SCRIPT.read_text())
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'transformers_howfar' not in imported and 'jax' not in imported
    assert 'json.loads(sys.argv[1])' in SCRIPT.read_text() and '@@RESULT@@' in SCRIPT.read_text()


def test_reference_without_torch_python_is_an_error():
    assert 'error' in torch_reference('hf', 1024, python='/nonexistent/python')


@pytest.mark.slow
def test_cli_bench_quick(tmp_path):
    howfar = str(Path(sys.executable).parent / 'howfar')
    out = subprocess.run([howfar, 'bench'], capture_output=True, text=True)
    assert 'lsh' in out.stdout, out.stderr
    out = subprocess.run([howfar, 'bench', 'lsh', '--quick', '--out', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    records = json.loads((tmp_path / 'lsh.json').read_text())
    lsh = [r for r in records if r['metric'] == 'seconds' and r['config']['attention'] == 'lsh']
    assert lsh and all(r['value'] is not None and r['value'] > 0 for r in lsh)
