"""bench's plumbing: the experiment folder outside git, what `run_experiment` passes to an experiment, compiler options for memory, pinned child processes."""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformers_howfar.bench import measure as bench
from transformers_howfar.bench.measure import check_cpus, make_record, memory_first_options, read_records, run_isolated
from transformers_howfar.experiments.common import experiment_dir, run_experiment


def test_experiment_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv('HOWFAR_EXPERIMENT_CACHE', raising=False)
    monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert experiment_dir('translation') == tmp_path / 'home' / '.cache' / 'transformers_howfar' / 'experiments' / 'translation'
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert experiment_dir('scaling') == tmp_path / 'xdg' / 'transformers_howfar' / 'experiments' / 'scaling'
    monkeypatch.setenv('HOWFAR_EXPERIMENT_CACHE', str(tmp_path / 'root'))
    assert experiment_dir('scaling') == tmp_path / 'root' / 'scaling'
    assert not (tmp_path / 'root').exists()  # a path, nothing created


@pytest.mark.parametrize('bad', ['', '.', '..', 'a/b', None])
def test_experiment_dir_rejects_paths(bad):
    with pytest.raises(ValueError, match='name: expected a non-empty folder name'): experiment_dir(bad)


@pytest.fixture
def registered():
    seen = []
    def old_style(quick: bool = False):
        seen.append(('old', quick)); return [make_record('_old', {}, 'x', 1, 'count')]
    def full(quick: bool = False, out_dir='experiments/results', resume: bool = False):
        seen.append(('full', quick, out_dir, resume)); return [make_record('_full', {}, 'x', 2, 'count')]
    return seen, old_style, full


def test_run_experiment_passes_quick_out_dir_and_resume(registered, tmp_path):
    registered, old_style, full = registered
    path = run_experiment(full, '_full', tmp_path / 'r', resume=True)
    assert path == tmp_path / 'r' / '_full.json' and json.loads(path.read_text())[0]['value'] == 2
    run_experiment(full, '_full', tmp_path, quick=True)
    assert registered == [('full', False, tmp_path / 'r', True), ('full', True, tmp_path, False)]
    with pytest.raises(ValueError, match=r"fn: expected an experiment function .* 'old_style' lacks \('out_dir', 'resume'\)"):
        run_experiment(old_style, '_old', tmp_path)
    assert len(registered) == 2 and not (tmp_path / '_old.json').exists()  # refused before running


def test_memory_first_options_leave_out_ynnpack_fusions():
    assert memory_first_options('gpu') == {}
    lowered = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b.T).lower(jnp.ones((256, 32)), jnp.ones((32, 64)))
    if '__ynn_fusion' not in lowered.compile().as_text(): pytest.skip('this XLA does not fuse into YNNPACK on this CPU')
    compiled = lowered.compile(memory_first_options('cpu'))
    assert '__ynn_fusion' not in compiled.as_text()
    np.testing.assert_allclose(compiled(jnp.ones((256, 32)), jnp.ones((32, 64))), np.full((256, 32), 64 * np.tanh(32.0)), rtol=1e-5)


def test_run_isolated_pins_the_child_to_the_cores_given(tmp_path):
    (tmp_path / 'cores_probe.py').write_text('import os\ndef f():\n    return {"cpus": sorted(os.sched_getaffinity(0))}\n')
    env = {'PYTHONPATH': str(tmp_path) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    one = max(os.sched_getaffinity(0))
    assert run_isolated('cores_probe:f', {}, env=env, cpus=[one])['cpus'] == [one]
    assert run_isolated('cores_probe:f', {}, env=env)['cpus'] == sorted(os.sched_getaffinity(0))
    for bad in ([], [-1], [10**6]):
        with pytest.raises(ValueError, match='cpus: expected a non-empty subset'): check_cpus(bad)


def test_every_experiment_has_the_one_signature():
    import inspect
    from transformers_howfar.cli import EXPERIMENTS
    for name, fn in EXPERIMENTS.items():
        params = inspect.signature(fn).parameters
        defaults = {p: params[p].default for p in ('quick', 'out_dir', 'resume')}
        assert defaults == {'quick': False, 'out_dir': 'experiments/results', 'resume': False}, name
        assert all(p.default is not inspect.Parameter.empty for p in params.values()), name  # own parameters optional
