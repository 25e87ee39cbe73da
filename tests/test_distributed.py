"""Several processes of one training job on this machine (loopback only): the same trajectory as one process, checkpoints
that resume with another number of processes, a launcher that stops the job when a process dies, and one clear line for
bad settings."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from transformers_howfar.models.saving import load
from transformers_howfar.train.distributed import free_port

BIN = Path(sys.executable).parent
# a few steps of the tiny LM with a loss logged at every step and a schedule that does not depend on `steps`
TRAIN = ['train', 'lm', '--preset', 'tiny', 'log_every=1', 'schedule_steps=8', 'checkpoint_every=2', 'eval_batches=1']


def howfar(*args, devices: int = 1, timeout: int = 300, **kw):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                                     + os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count', '--_'))
    return subprocess.run([str(BIN / 'howfar'), *args], capture_output=True, text=True, env=env, timeout=timeout, **kw)


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]
    return [r['loss'] for r in records if r['split'] == 'train']


def params(run_dir) -> list[np.ndarray]:
    from flax import nnx
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load(Path(run_dir) / 'model'), nnx.Param))]


def close(a, b, tol=2e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b): np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices_and_with_one(tmp_path):
    runs = {'2x1': ('--processes', '2'), '1x2': (), '1x1': ()}
    for name, extra in runs.items():
        r = howfar(*TRAIN, 'steps=6', '--run-dir', str(tmp_path / name), *extra, devices=2 if name == '1x2' else 1)
        assert r.returncode == 0, r.stdout + r.stderr
    assert len(losses(tmp_path / '2x1')) == 6
    close(losses(tmp_path / '2x1'), losses(tmp_path / '1x2'))
    close(losses(tmp_path / '2x1'), losses(tmp_path / '1x1'))
    close(params(tmp_path / '2x1'), params(tmp_path / '1x1'))
    r = howfar(*TRAIN, 'steps=6', '--run-dir', str(tmp_path / '2x1'), '--processes', '2')  # finished: nothing to do
    assert r.returncode == 0 and r.stdout.count('run directory:') == 1, r.stdout  # process 0 speaks for the job


@pytest.mark.slow
def test_checkpoints_resume_with_another_number_of_processes(tmp_path):
    straight = howfar(*TRAIN, 'steps=8', '--run-dir', str(tmp_path / 'straight'))
    assert straight.returncode == 0, straight.stderr
    for first, then, name in ((2, 1, 'two_then_one'), (1, 2, 'one_then_two')):
        for steps, n in ((4, first), (8, then)):
            r = howfar(*TRAIN, f'steps={steps}', '--run-dir', str(tmp_path / name), '--processes', str(n))
            assert r.returncode == 0, r.stdout + r.stderr
        close(losses(tmp_path / name), losses(tmp_path / 'straight'))
        close(params(tmp_path / name), params(tmp_path / 'straight'))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f'/proc/{pid}/task').iterdir():
        children = (task / 'children').read_text().split()
        out += [int(c) for c in children]
    return out


@pytest.mark.slow
def test_a_killed_process_stops_the_job_and_the_run_resumes(tmp_path):
    run = tmp_path / 'run'
    env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', ''))
    long = ['train', 'lm', '--preset', 'tiny', 'log_every=1', 'checkpoint_every=2', 'schedule_steps=400', '--run-dir', str(run)]
    p = subprocess.Popen([str(BIN / 'howfar'), *long, 'steps=400', '--processes', '2'], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    saved_steps = lambda: [int(c.name) for c in (run / 'checkpoints').glob('*') if c.name.isdigit()]
    deadline = time.monotonic() + 240
    while len(saved_steps()) < 2 and time.monotonic() < deadline: time.sleep(0.5)
    assert saved_steps(), 'no checkpoint was written'
    victim = _children(p.pid)[1]
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    out, _ = p.communicate(timeout=120)
    assert time.monotonic() - started < 60  # the other process was stopped, not left waiting
    assert p.returncode != 0
    assert 'launch: process 1 exited with status -9; stopping the others' in out, out
    saved = max(saved_steps())
    r = howfar(*long, f'steps={saved + 4}')  # one process goes on from the last checkpoint
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['split'] == 'train']
    assert steps == list(range(1, saved + 5))  # every step once: nothing lost, nothing repeated


@pytest.mark.parametrize('args, message', [
    (('--coordinator', '127.0.0.1:1234', '--num-processes', '2', '--process-id', '2'),
     'process_id: expected 0 .. 1 (num_processes = 2), got 2'),
    (('--coordinator', 'localhost', '--num-processes', '2', '--process-id', '0'), "coordinator: expected 'host:port'"),
    (('--coordinator', '127.0.0.1:1234', '--num-processes', '2'), 'expected --coordinator, --num-processes and --process-id together'),
    (('--processes', '2', '--coordinator', '127.0.0.1:1234'), 'processes: --processes starts a local job of its own'),
    (('--processes', '0'), 'processes: expected a number > 0'),
])
def test_bad_settings_give_one_line(args, message):
    r = howfar(*TRAIN, 'steps=2', *args, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unreachable_coordinator_and_busy_port(tmp_path):
    port = free_port()
    r = howfar(*TRAIN, 'steps=2', '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', '1',
               '--join-timeout', '1', timeout=120)
    assert r.returncode == 2 and f'coordinator: nothing answered at 127.0.0.1:{port}' in r.stderr, r.stderr
    import socket
    with socket.socket() as busy:
        busy.bind(('', 0)); busy.listen()
        r = howfar(*TRAIN, 'steps=2', '--coordinator', f'127.0.0.1:{busy.getsockname()[1]}', '--num-processes', '2',
                   '--process-id', '0', timeout=120)
    assert r.returncode == 2 and 'is in use on this machine' in r.stderr, r.stderr
