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
    metrics = run / 'metrics.jsonl'
    # Interrupt only once a step has finished (a cold compile cache can take a while), so there is a step to save.
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert 'Traceback' not in err and 'run the same command again to resume' in err.strip().splitlines()[-1]
    step = int(err.split('interrupted at step ')[1].split(';')[0])
    assert step > 0 and (run / 'checkpoints' / str(step)).is_dir()


def _damage(model: Path, case: str):
    "Damage a saved model as a bad copy, a full disk or a hand edit would."
    data = [p for p in (model / 'params').rglob('*') if p.is_file() and p.parent.name == 'd' and 'ocdbt' in str(p)]
    if case == 'zeroed weights':
        for f in data: f.write_bytes(bytes(f.stat().st_size))
    elif case == 'truncated weights':
        for f in data: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif case == 'garbled model.json':
        (model / 'model.json').write_text((model / 'model.json').read_text()[:40])
    elif case == 'model.json without its class':
        meta = json.loads((model / 'model.json').read_text()); del meta['class']
        (model / 'model.json').write_text(json.dumps(meta))
    elif case == 'config that disagrees with the weights':
        meta = json.loads((model / 'model.json').read_text()); meta['config']['d_model'] *= 2
        (model / 'model.json').write_text(json.dumps(meta))
    elif case == 'config with a wrong type':
        meta = json.loads((model / 'model.json').read_text()); meta['config']['n_layers'] = 'two'
        (model / 'model.json').write_text(json.dumps(meta))


CASES = {'zeroed weights': 'params: the weights are damaged or incomplete',
         'truncated weights': 'params: the weights are damaged or incomplete',
         'garbled model.json': 'model.json: not valid JSON', 'model.json without its class': "model.json: missing 'class'",
         'config that disagrees with the weights': 'model.json: the config and the weights disagree',
         'config with a wrong type': 'model.json: '}


@pytest.mark.parametrize('case', list(CASES))
def test_a_damaged_model_directory_is_one_line_naming_the_file(tmp_path, case):
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / 'model')
    _damage(tmp_path / 'model', case)
    with pytest.raises(ValueError, match='^' + str(tmp_path / 'model') + '.*') as e:
        load(tmp_path / 'model')
    assert CASES[case] in str(e.value) and '\n' not in str(e.value)


def test_failed_restores_leave_nothing_on_stderr(tmp_path, capfd, caplog):
    "A failed read closes orbax's loop while other reads are in flight: their late callbacks must not print."
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / 'model')
    _damage(tmp_path / 'model', 'zeroed weights')
    for _ in range(10):
        with pytest.raises(ValueError, match='the weights are damaged'): load(tmp_path / 'model')
    import gc; gc.collect(); time.sleep(0.5); gc.collect()
    err = capfd.readouterr().err
    assert 'Traceback' not in err and 'exception was never retrieved' not in err, err[:3000]
    assert not [r for r in caplog.records if 'never retrieved' in r.getMessage()], caplog.text[:3000]


@pytest.mark.parametrize('case', ['zeroed weights', 'garbled model.json'])
def test_generate_from_a_damaged_model_prints_one_line(tmp_path, case):
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / 'model')
    _damage(tmp_path / 'model', case)
    r = subprocess.run([HOWFAR, 'generate', str(tmp_path / 'model'), '1 2 3', '--ids'], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0, r.stderr[-3000:]
    assert CASES[case] in r.stderr


def test_command_line_slips_are_one_line_each(tmp_path, capsys):
    from transformers_howfar.cli import main
    from transformers_howfar.data.tokenizer import CharTokenizer
    run = str(tmp_path / 'run')
    cases = [(['train', 'duplicate', '--run-dir', run, 'steps=2', 'steps=3'], "override: steps is given twice"),
             (['train', 'duplicate', '--run-dir', run, '--batch-size', '-4'], 'batch_size: expected a number > 0, got -4')]
    model = LM(LMConfig.tiny().replace(vocab_size=CharTokenizer.digits().vocab_size), rngs=nnx.Rngs(0))
    save_model(model, tmp_path / 'model', CharTokenizer.digits())
    not_utf8 = b'12\xff3'.decode('utf-8', 'surrogateescape')  # how Python passes on an argument that is not UTF-8
    cases += [(['generate', str(tmp_path / 'model'), not_utf8], 'expected text that is valid Unicode'),
              (['generate', str(tmp_path / 'model'), '12', '--max-new-tokens', str(10**12)],
               'max_new_tokens: expected at most'),
              (['generate', str(tmp_path / 'model'), '12', '--max-new-tokens', '4', '--temperature', '1',
                '--seed', str(2**70)], 'seed: expected an integer in [-2^63, 2^63)')]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and '\n' not in err, (argv, err)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    import errno
    from transformers_howfar.train import trainer as trainer_module
    run = tmp_path / 'run'
    straight, _ = train_task('duplicate', 'tiny', TINY, tmp_path / 'straight')
    real = trainer_module.save_checkpoint

    def disk_full_at_15(manager, step, *args, **kwargs):
        if step != 15: return real(manager, step, *args, **kwargs)
        (run / 'checkpoints' / '15').mkdir()  # what a write cut short by a full disk may leave
        (run / 'checkpoints' / '15' / 'partial').write_bytes(b'\0' * 7)
        raise OSError(errno.ENOSPC, 'No space left on device', str(run / 'checkpoints' / '15'))

    monkeypatch.setattr(trainer_module, 'save_checkpoint', disk_full_at_15)
    with pytest.raises(OSError, match='No space left on device'):
        train_task('duplicate', 'tiny', TINY, run)
    monkeypatch.setattr(trainer_module, 'save_checkpoint', real)
    assert (run / 'checkpoints' / '10').is_dir()  # the last good checkpoint is untouched
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DamagedCheckpointWarning)
        resumed, _ = train_task('duplicate', 'tiny', TINY, run)  # room again: resumes from step 10
    assert all(np.array_equal(a, b) for a, b in zip(params_of(resumed.model), params_of(straight.model)))


def test_a_full_disk_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    from transformers_howfar.cli import main
    from transformers_howfar.train import trainer as trainer_module
    def full(*args, **kwargs): raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'run'))
    monkeypatch.setattr(trainer_module, 'save_checkpoint', full)
    assert main(['train', 'duplicate', '--run-dir', str(tmp_path / 'run'), 'steps=10', 'checkpoint_every=5']) == 1
    err = capsys.readouterr().err.strip()
    assert 'No space left on device' in err and '\n' not in err, err


def test_resume_step_insists_on_one_checkpoint_and_sets_newer_ones_aside(tmp_path):
    run = tmp_path / 'run'
    straight, _ = train_task('duplicate', 'tiny', TINY, tmp_path / 'straight')
    train_task('duplicate', 'tiny', TINY, run)  # checkpoints 5, 10, 15, 20
    with pytest.raises(ValueError, match=r'resume_step: expected one of the checkpoints \[5, 10, 15, 20\]'):
        train_task('duplicate', 'tiny', TINY, run, resume_step=7)
    (run / 'checkpoints' / '5' / 'meta' / 'metadata').write_bytes(b'\0' * 16)  # damaged: no fallback to another
    with pytest.raises(ValueError, match='step: checkpoint .*/5 cannot be read'):
        train_task('duplicate', 'tiny', TINY, run, resume_step=5)
    with pytest.warns(UserWarning, match=r'resuming from step 10: checkpoints \[15, 20\] moved to'):
        resumed, _ = train_task('duplicate', 'tiny', TINY, run, resume_step=10)
    assert sorted(p.name.split('-')[0] for p in (run / 'set_aside_checkpoints').iterdir()) == ['15', '20']  # kept
    assert all(np.array_equal(a, b) for a, b in zip(params_of(resumed.model), params_of(straight.model)))


def test_a_save_clears_what_killed_saves_left_beside_the_model(tmp_path):
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(0)), tmp_path / 'model')
    stale, young, old = tmp_path / '.model.new-dead', tmp_path / '.model.new-busy', tmp_path / '.model.old-gone'
    for p in (stale, young, old): p.mkdir(); (p / 'model.json').write_text('{}')
    os.utime(stale, (time.time() - 7200, time.time() - 7200))  # killed two hours ago
    save_model(LM(LMConfig.tiny(), rngs=nnx.Rngs(1)), tmp_path / 'model', overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.model.new-busy', 'model']  # a save may still own it


def test_out_of_memory_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys):
    from transformers_howfar import cli
    def exhausted(*args, **kwargs):
        raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.\n  details')
    monkeypatch.setattr(cli, 'train_task', exhausted)
    assert cli.main(['train', 'duplicate', '--run-dir', str(tmp_path / 'run')]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ('howfar train: error: out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate '
                   '8589934592 bytes); try smaller sizes'), err
