"""The LSH-quality experiment's parts: the local baseline equals a dense windowed mask, the models differ only in attention,
evaluation with other hash rounds, the isolated step timing, config errors, and an interrupted run that resumes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.layers.attention import dot_product_attention
from transformers_howfar.bench.measure import run_isolated
from transformers_howfar.experiments.lsh_quality import (LSHQualitySetup, make_eval_fn, evaluate, load_lsh_data, model_config,
                                                 run_lsh_quality)
from transformers_howfar.models.reformer import ReformerLM

TINY = LSHQualitySetup.tiny()


@pytest.mark.parametrize('block, length', [(4, 16), (8, 32), (16, 48)])
def test_local_model_is_a_causal_window_of_two_blocks(block, length):
    setup = TINY.replace(chunk=block, seq_len=length, timing_lengths=(length,), timing_tokens=length)
    config = model_config(setup, 'local')
    assert (config.attention, config.attention_options) == (('local',), (f'local.block_size={block}', 'local.look_back=1'))
    layer = ReformerLM(config, rngs=nnx.Rngs(0)).stack.sublayers[0].attention  # the layer the model runs
    rng = np.random.default_rng(block)
    x = jnp.asarray(rng.normal(size=(2, length, setup.d_model)), jnp.float32)
    t = np.arange(length)
    mask = (t[None] <= t[:, None]) & (t[None] >= (t[:, None] // block - 1) * block)
    want = layer.out(dot_product_attention(layer.q(x), layer.k(x), layer.v(x), mask=jnp.asarray(mask)[None, None]))
    np.testing.assert_allclose(layer(x), want, atol=1e-5)


def test_models_differ_only_in_attention():
    shapes = {m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(ReformerLM(model_config(TINY, m), rngs=nnx.Rngs(0)), nnx.Param)))
              for m in TINY.models}
    assert shapes['local'] == shapes['full'] and shapes['lsh2'] == shapes['lsh1'] == shapes['full_shared']  # one shared query/key
    assert shapes['lsh1'] != shapes['full']
    x = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (1, TINY.seq_len)))
    out = {m: ReformerLM(model_config(TINY, m), rngs=nnx.Rngs(0))(x) for m in TINY.models}
    # same weights: identical outputs in the first block of positions, where local sees everything full does
    np.testing.assert_allclose(out['local'][:, :TINY.chunk], out['full'][:, :TINY.chunk], atol=1e-4)
    assert not np.allclose(out['local'], out['full'], atol=1e-3)
    # the control is the LSH layer made exact: dense shared-QK attention over the whole context, unlike hashed LSH
    assert model_config(TINY, 'full_shared').options_for('lsh')['dense_threshold'] == TINY.seq_len
    assert not np.allclose(out['full_shared'], out['lsh1'], atol=1e-3)


def test_evaluation_is_deterministic_and_depends_on_rounds():
    data = load_lsh_data(TINY)
    params = nnx.state(ReformerLM(model_config(TINY, 'lsh1'), rngs=nnx.Rngs(0)), nnx.Param)
    one = evaluate(make_eval_fn(model_config(TINY, 'lsh1')), params, data, TINY)
    assert one == evaluate(make_eval_fn(model_config(TINY, 'lsh1')), params, data, TINY)  # fixed evaluation hash key
    two = evaluate(make_eval_fn(model_config(TINY, 'lsh1', n_rounds=2)), params, data, TINY)
    assert one['nll'] != two['nll'] and abs(one['nll'] - two['nll']) < 0.5
    assert one['tokens'] == TINY.eval_batches * TINY.batch_size * TINY.seq_len


def test_step_seconds_in_its_own_process():
    r = run_isolated('transformers_howfar.experiments.lsh_quality:step_seconds', {'model': 'full', 'length': 32, 'setup': TINY.to_dict()})
    assert 'error' not in r, r
    assert r['batch'] == TINY.timing_tokens // 32 and r['seconds'] > 0 and np.isfinite(r['loss']) and r['peak_rss_gb'] > 0


@pytest.mark.parametrize('change, message', [
    (dict(rounds=()), 'rounds: expected positive'), (dict(seq_len=60), 'seq_len: expected a multiple of chunk'),
    (dict(timing_lengths=(48,)), 'timing_lengths: expected lengths that divide'), (dict(steps=0), 'steps'),
    (dict(corpora=()), 'corpora: expected a non-empty tuple')])
def test_setup_errors(change, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**change)


@pytest.mark.slow
def test_run_writes_each_model_and_resumes(tmp_path):
    s = TINY.replace(rounds=(1,), steps=2, seeds=(0, 1))
    records = run_lsh_quality(s, tmp_path, timing=False)
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / 'lsh_quality_runs').iterdir()}
    assert set(runs) == {f'{m}-seed{k}' for m in ('full', 'full_shared', 'local', 'lsh1') for k in (0, 1)}
    assert set(runs['lsh1-seed0']['eval_rounds']) == {'1'} and 'eval_rounds' not in runs['full_shared-seed0']
    assert runs['lsh1-seed0']['eval_rounds']['1']['bits_per_token'] == pytest.approx(runs['lsh1-seed0']['valid']['bits_per_token'])
    assert runs['full-seed0']['valid'] != runs['full-seed1']['valid']  # another seed, another model
    bits = {(r['config']['model'], r['config']['seed']): r['value'] for r in records if r['metric'] == 'valid_bits_per_token'}
    assert len(bits) == 8 and all(0 < b < np.log2(s.vocab_size) + 2 for b in bits.values())
    again = run_lsh_quality(s, tmp_path, timing=False, resume=True)  # read back, nothing trained
    assert [r['value'] for r in again if r['metric'] != 'train_seconds'] == [r['value'] for r in records if r['metric'] != 'train_seconds']
