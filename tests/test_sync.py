"""The test command fails when the package and the notebooks disagree or a notebook is not clean."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path):
    "A copy of the project's sources, in sync, to break on purpose."
    for name in ('settings.ini', 'setup.py', 'README.md'): shutil.copy2(ROOT / name, tmp_path / name)
    for name in ('nbs', 'transformers_howfar', 'tools'):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
    return tmp_path


def check(project):
    return subprocess.run([sys.executable, str(project / 'tools' / 'check_sync.py'), str(project)], capture_output=True, text=True)


def test_in_sync_copy_passes(project):
    r = check(project)
    assert r.returncode == 0, r.stdout + r.stderr


def test_notebook_edited_without_export_fails(project):
    nb_path = project / 'nbs' / '00_core.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code' and ''.join(c['source']).startswith('#| export') and 'def make_key' in ''.join(c['source']))
    cell['source'] = ''.join(cell['source']).replace('def make_key(', 'def make_a_key(')
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    subprocess.run([str(Path(sys.executable).parent / 'nbdev_clean'), '--fname', str(nb_path)], cwd=project, check=True, capture_output=True)
    r = check(project)
    assert r.returncode == 1 and 'package differs from the notebooks' in r.stdout and 'core.py' in r.stdout


def test_package_edited_by_hand_fails(project):
    core = project / 'transformers_howfar' / 'core.py'
    core.write_text(core.read_text() + '\nHAND_EDIT = 1\n')
    r = check(project)
    assert r.returncode == 1 and 'core.py' in r.stdout


def test_unclean_notebook_fails(project):
    nb_path = project / 'nbs' / '50_bench.measure.ipynb'
    nb = json.loads(nb_path.read_text())
    nb['cells'][1]['metadata']['collapsed'] = True
    nb['cells'][1]['execution_count'] = 7
    nb_path.write_text(json.dumps(nb, indent=1))
    r = check(project)
    assert r.returncode == 1 and 'notebooks not clean' in r.stdout and '50_bench.measure.ipynb' in r.stdout


def test_stale_readme_fails(project):
    (project / 'README.md').write_text('old\n')
    r = check(project)
    assert r.returncode == 1 and 'README.md is stale' in r.stdout


def test_saved_output_with_a_machine_path_fails(project):
    nb_path = project / 'nbs' / '50_bench.measure.ipynb'
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if c['cell_type'] == 'code')
    kernel_file = '/' + '/'.join(['tmp', 'ipykernel_4242', '17.py'])  # what a warning prints
    cell['outputs'] = [{'name': 'stderr', 'output_type': 'stream', 'text': [f'{kernel_file}:3: DeprecationWarning: old\n']}]
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    r = check(project)
    assert r.returncode == 1 and 'machine paths' in r.stdout and '50_bench.measure.ipynb' in r.stdout


def test_the_readme_benchmark_table_is_the_one_the_records_give():
    "Every number in the README's table of measurements comes from benchmarks/results/, through bench.claims."
    from transformers_howfar.bench.claims import claims_table
    table = claims_table(ROOT / 'benchmarks' / 'results')
    assert table in (ROOT / 'README.md').read_text(), 'README.md: the benchmark table differs from the records; ' \
        'run nbs/index.ipynb again (tools/run_notebooks.py) and make readme'


def test_the_readme_claims_table_is_the_one_the_experiment_records_give():
    "Every verdict in the README's table of the talk's claims is its rules applied to experiments/results/."
    from transformers_howfar.experiments.claims import EXPERIMENT_CLAIMS, experiment_claims_table
    table = experiment_claims_table(ROOT / 'experiments' / 'results')
    assert len(table.splitlines()) == 2 + len(EXPERIMENT_CLAIMS)
    assert table in (ROOT / 'README.md').read_text(), 'README.md: the claims table differs from the records; ' \
        'run nbs/index.ipynb again (tools/run_notebooks.py) and make readme'
