"""Faults that must not lose the last good copy: a model save cut short, damaged or deleted checkpoints, a run directory
in use, changed settings on resume, Ctrl-C, and bad input that must fail with one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.models.lm import LM, LMConfig
from transformers_howfar.models.saving import load, save_model
from transformers_howfar.train.checkpoint import DamagedCheckpointWarning
from transformers_howfar.train.tasks import train_task

HOWFAR = str(Path(sys.executable).parent / 'howfar')
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONWARNINGS': 'ignore'}
TINY = ['steps=20', 'checkpoint_every=5', 'keep_checkpoints=4', 'schedule_steps=20']  # a shorter first run keeps the schedule


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_save_model_killed_between_its_renames_keeps_a_whole_copy(tmp_path, monkeypatch):
    config = LMConfig.tiny()
    first, second = LM(config, rngs=nnx.Rngs(0)), LM(config, rngs=nnx.Rngs(1))
    save_model(first, tmp_path / 'model')
    real, calls = os.replace, []

    def killed_after_first(src, dst):  # the old copy is moved aside, then the process dies
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, 'replace', killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        save_model(second, tmp_path / 'model', overwrite=True)
    monkeypatch.setattr(os, 'replace', real)
    assert not (tmp_path / 'model').exists()
    with pytest.warns(UserWarning, match='a save was cut short; restored the new copy'):
        back = load(tmp_path / 'model')
    assert all(np.array_equal(a, b) for a, b in zip(params_of(back), params_of(second)))


def test_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path):
    run = tmp_path / 'run'
    straight, _ = train_task('duplicate', 'tiny', TINY, tmp_path / 'straight')
    train_task('duplicate', 'tiny', TINY[1:] + ['steps=15'], run)
    (run / 'checkpoints' / '15' / 'meta' / 'metadata').write_bytes(b'\0' * 16)  # zeroed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        resumed, _ = train_task('duplicate', 'tiny', TINY, run)
    damaged = [w for w in caught if issubclass(w.category, DamagedCheckpointWarning)]
    assert len(damaged) == 1 and 'checkpoints/15 is damaged' in str(damaged[0].message)
    assert [p.name.split('-')[0] for p in (run / 'damaged_checkpoints').iterdir()] == ['15']  # kept aside
    assert all(np.array_equal(a, b) for a, b in zip(params_of(resumed.model), params_of(straight.model)))


def test_deleted_checkpoints_or_config_refuse_a_silent_restart(tmp_path):
    run = tmp_path / 'run'
    train_task('duplicate', 'tiny', TINY[1:] + ['steps=10'], run)
    log = (run / 'metrics.jsonl').read_text()
    (run / 'config.json').rename(tmp_path / 'config.json')
    with pytest.raises(ValueError, match='has checkpoints but no config.json'):
        train_task('duplicate', 'tiny', TINY, run)
    (tmp_path / 'config.json').rename(run / 'config.json')
    shutil.rmtree(run / 'checkpoints')
    with pytest.raises(FileNotFoundError, match='records 10 steps but no checkpoint is left'):
        train_task('duplicate', 'tiny', TINY, run)
    assert (run / 'metrics.jsonl').read_text() == log  # nothing thrown away
    trainer, _ = train_task('duplicate', 'tiny', TINY, run, fresh=True)
    assert trainer.step == 20


def test_a_run_directory_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from transformers_howfar.train.tasks import '
                               'run_dir_lock\nwith run_dir_lock(sys.argv[1]): print("held", flush=True); time.sleep(600)',
                               str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(ValueError, match=f'is in use by another training process \\(pid {holder.pid}\\)'):
            train_task('duplicate', 'tiny', TINY, run)
    finally:
        holder.kill()
        holder.wait()
    trainer, _ = train_task('duplicate', 'tiny', TINY, run)  # the killed holder's lock went with it
    assert trainer.step == 20


def test_bad_run_dir_and_out_of_range_ids_fail_with_one_line(tmp_path):
    (tmp_path / 'file').write_text('x')
    r = subprocess.run([HOWFAR, 'train', 'duplicate', '--run-dir', str(tmp_path / 'file')], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and 'run_dir: expected a folder, got the file' in r.stderr and 'Traceback' not in r.stderr
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / 'model')
    vocab = LMConfig.tiny().vocab_size
    for bad in (str(vocab), '-1'):
        r = subprocess.run([HOWFAR, 'generate', str(tmp_path / 'model'), f'1 2 {bad}', '--ids'], capture_output=True,
                           text=True, env=ENV, timeout=300)
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
        assert f'prompts: expected token ids in [0, {vocab}) for this model, got {bad}' in r.stderr


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_says_where_to_resume(tmp_path):
    run = tmp_path / 'run'
    args = [HOWFAR, 'train', 'duplicate', '--preset', 'tiny', '--run-dir', str(run), 'steps=100000', 'log_every=1',
            'checkpoint_every=100000']
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / 'metrics.jsonl').exists():
        time.sleep(0.5)
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert 'Traceback' not in err and 'run the same command again to resume' in err.strip().splitlines()[-1]
    step = int(err.split('interrupted at step ')[1].split(';')[0])
    assert step > 0 and (run / 'checkpoints' / str(step)).is_dir()
