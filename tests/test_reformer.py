"""ReformerLM and the encoder-decoder: configs, axial positions, modes agree, chunked loss, trainer and decoding interfaces, CLI."""
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformers_howfar.core import make_key
from transformers_howfar.layers.losses import cross_entropy
from transformers_howfar.layers.lsh import LSHSelfAttention
from transformers_howfar.models.reformer import AxialPositions, ReformerConfig, ReformerEncoderDecoder, ReformerLM, reformer_loss
from transformers_howfar.bench.reformer import bench_config, reformer_pytorch_benchmark
from transformers_howfar.experiments.longcontext import LONGCONTEXT_RUNS, longcontext_cost, longcontext_experiment, ngram_bits, train_longcontext

ROOT = Path(__file__).resolve().parent.parent


def test_config_errors():
    for kwargs, message in [(dict(n_layers=3, attention=('lsh', 'full')), 'n_layers'), (dict(max_len=70000), 'axial_shape'),
                            (dict(axial_dims=(100, 100)), 'axial_dims'), (dict(attention=('nope',)), 'attention'),
                            (dict(residual='magic'), 'residual'), (dict(ff_chunk=0), 'ff_chunk')]:
        with pytest.raises(ValueError, match=message): ReformerConfig(**kwargs)


@pytest.mark.parametrize('length', [1, 7, 100, 65536, 2 ** 20])
def test_bench_config_axial_positions_cover_length(length):
    c = bench_config(2, length)
    assert c.axial_shape[0] * c.axial_shape[1] >= length and c.max_len == length


def test_axial_positions_any_length():
    ax = AxialPositions((5, 7), (2, 4), 35, rngs=nnx.Rngs(0))
    for T in (1, 13, 35):
        assert ax(jnp.arange(T)[None]).shape == (1, T, 6)
    p = ax(jnp.arange(35)[None])[0]
    np.testing.assert_array_equal(p[15, :2], ax.first[...][2]); np.testing.assert_array_equal(p[15, 2:], ax.second[...][1])


def batch_for(c, B=2, T=24, seed=1):
    tokens = jax.random.randint(make_key(seed), (B, T + 1), 0, c.vocab_size)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': (jax.random.uniform(make_key(seed + 1), (B, T)) < 0.9).astype(jnp.float32)}


def test_attention_types_cycle_over_layers():
    c = ReformerConfig.tiny().replace(attention=('lsh', 'local', 'memory_compressed', 'full'), n_layers=8)
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    kinds = [layer.kind for layer in m.stack.sublayers[::2]]
    assert kinds == list(c.attention) * 2 and m.stack.period == 8
    assert all(isinstance(layer.attention, LSHSelfAttention) == (layer.kind == 'lsh') for layer in m.stack.sublayers[::2])


@pytest.mark.parametrize('attention', [('lsh',)])
def test_reversible_gradients_equal_ordinary_with_dropout_and_lsh(attention):
    c = ReformerConfig.tiny().replace(attention=attention, n_layers=len(attention), dropout_rate=0.2)
    b, loss_fn = batch_for(c), reformer_loss(0.1)
    def grads(mode):
        m = ReformerLM(c.replace(residual=mode), rngs=nnx.Rngs(0))
        loss, g = nnx.value_and_grad(lambda m: loss_fn(m, b, nnx.Rngs(dropout=make_key(4)))[0])(m)
        return loss, nnx.state(g, nnx.Param)
    (l_rev, g_rev), (l_ord, g_ord) = grads('reversible'), grads('ordinary')
    np.testing.assert_allclose(l_rev, l_ord, rtol=1e-6)
    for a, o in zip(jax.tree.leaves(g_rev), jax.tree.leaves(g_ord)): np.testing.assert_allclose(a, o, atol=5e-5, rtol=1e-3)
    assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves(g_rev))


def test_lsh_sublayer_is_the_lsh_module_and_hash_key_replays():
    c = ReformerConfig.tiny().replace(attention=('lsh',))
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    assert isinstance(m.stack.sublayers[0].attention, LSHSelfAttention)
    x = jax.random.normal(make_key(0), (1, 24, c.d_model))
    layer = m.stack.sublayers[0]
    np.testing.assert_array_equal(layer(x, key=make_key(1)), layer(x, key=make_key(1)))  # same key, same buckets
    assert not np.allclose(layer(x, key=make_key(1)), layer(x, key=make_key(2)))


def test_chunked_loss_equals_full_logits_loss_and_lengths_not_multiple_of_chunks():
    c = ReformerConfig.tiny().replace(ff_chunk=7, loss_chunk=9)
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    b = batch_for(c, T=37)
    loss, metrics = reformer_loss()(m, b, None)
    want, wm = cross_entropy(m(b['inputs']), b['targets'], b['loss_mask'])
    np.testing.assert_allclose(loss, want, rtol=1e-5); np.testing.assert_allclose(metrics['accuracy'], wm['accuracy'], rtol=1e-6)


def test_lm_deterministic_without_key_and_random_with():
    c = ReformerConfig.tiny().replace(dropout_rate=0.1)
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    t = batch_for(c)['inputs']
    np.testing.assert_array_equal(m(t), m(t))
    assert not np.allclose(m(t, rngs=nnx.Rngs(dropout=1)), m(t, rngs=nnx.Rngs(dropout=2)))
    with pytest.raises(ValueError, match='exceeds max_len'): m(jnp.zeros((1, c.max_len + 1), jnp.int32))


def test_encoder_decoder_modes_agree():
    c = ReformerConfig.tiny().replace(attention=('full',), n_layers=1, dropout_rate=0.1)
    src, tgt = jax.random.randint(make_key(5), (2, 12), 0, 32), jax.random.randint(make_key(6), (2, 8), 0, 32)
    def run(mode):
        m = ReformerEncoderDecoder(c.replace(residual=mode), rngs=nnx.Rngs(0))
        f = lambda m: (m(src, tgt, rngs=nnx.Rngs(dropout=make_key(7))) ** 2).mean()
        return m(src, tgt).shape, nnx.state(nnx.jit(nnx.grad(f))(m), nnx.Param)  # compiled: eager autodiff of the scans is slow
    (s1, g1), (s2, g2) = run('reversible'), run('ordinary')
    assert s1 == (2, 8, 32)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)): np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-3)
    assert float(jnp.abs(g1['encoder']['sublayers'][0]['attention']['q']['kernel'][...]).sum()) > 0  # through the decoder's VJP


def test_torch_benchmark_needs_its_python(monkeypatch):
    monkeypatch.delenv('HOWFAR_TORCH_PYTHON', raising=False)
    with pytest.raises(ValueError, match='HOWFAR_TORCH_PYTHON'): reformer_pytorch_benchmark(quick=True)


def test_longcontext_training_on_a_small_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran']
    for name in ('wikipedia', 'brown'):
        (tmp_path / name).mkdir()
        docs = ['\n'.join(' '.join(rng.choice(words, 12)) for _ in range(3)) for _ in range(80)]
        (tmp_path / name / 'text.txt').write_text('\n\n'.join(docs) + '\n')
    r = train_longcontext('transformer_1k', 8, quick=True, data_dir=tmp_path, evals=4)
    assert r['context'] == 16 and r['steps'] == 8 and [p['step'] for p in r['curve']] == [2, 4, 6, 8]
    assert r['valid_bits_per_byte'] < r['curve'][0]['valid_bits'] < 8.5  # learns the small vocabulary of letters
    with pytest.raises(ValueError, match='run'): train_longcontext('nope', 1, quick=True, data_dir=tmp_path)
    with pytest.raises(ValueError, match='eval_bytes'): train_longcontext('reformer_local_lsh_16k', 1, quick=True, data_dir=tmp_path, eval_bytes=1000)


def test_longcontext_resumes_from_its_checkpoints(tmp_path):
    rng = np.random.default_rng(1)
    for name in ('wikipedia', 'brown'):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'text.txt').write_text('\n\n'.join(' '.join(rng.choice(['ab', 'cd', 'ef'], 40)) for _ in range(80)) + '\n')
    whole = train_longcontext('reformer_local_lsh_16k', 6, quick=True, data_dir=tmp_path, evals=2)
    run_dir = tmp_path / 'run'
    train_longcontext('reformer_local_lsh_16k', 6, quick=True, data_dir=tmp_path, evals=2, run_dir=run_dir)
    shutil.rmtree(run_dir / 'checkpoints' / '6')  # as if stopped after the step-3 checkpoint
    log = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    for r in log:
        if r['split'] == 'eval' and r['step'] == 3: r['nll'] = 1.0  # a mark: a resumed run keeps what it logged up to step 3
    (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in log))
    resumed = train_longcontext('reformer_local_lsh_16k', 6, quick=True, data_dir=tmp_path, evals=2, run_dir=run_dir, resume=True)
    assert [p['step'] for p in resumed['curve']] == [3, 6] and resumed['curve'][0]['valid_bits'] == pytest.approx(1 / np.log(2))
    assert resumed['valid_bits_per_byte'] == pytest.approx(whole['valid_bits_per_byte'], rel=1e-5)
    with pytest.raises(ValueError, match='steps'):  # going on with another schedule length would change the finished steps' meaning
        train_longcontext('reformer_local_lsh_16k', 8, quick=True, data_dir=tmp_path, evals=2, run_dir=run_dir, resume=True)


def test_bench_memory_quick_cli(tmp_path):
    howfar = Path(sys.executable).with_name('howfar')
    r = subprocess.run([str(howfar), 'bench', 'memory', '--quick', '--out', str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / 'memory.json').read_text())
    peaks = [x for x in records if x['metric'] == 'peak_memory']
    assert {x['config']['residual'] for x in peaks} == {'reversible', 'ordinary'} and all(x['value'] and x['value'] > 0 for x in peaks), records
    steps = [x for x in records if x['metric'] == 'step_time']
    assert len(steps) == 2 and all(x['value'] > 0 and np.isfinite(x['config']['loss']) and x['config']['loss'] > 0 for x in steps), records


def test_attention_options_reach_the_layers():
    c = ReformerConfig.tiny().replace(attention=('lsh', 'local'), attention_options=('local.block_size=8', 'lsh.n_buckets=4', 'lsh.dense_threshold=0'))
    m = ReformerLM(c, rngs=nnx.Rngs(0))
    lsh, local = m.stack.sublayers[0].attention, m.stack.sublayers[2].attention
    assert (lsh.n_buckets, lsh.dense_threshold, lsh.n_rounds, lsh.chunk_length) == ((4,), 0, c.n_rounds, c.lsh_chunk)
    assert local.options == (('block_size', 8),)
    x = jax.random.randint(make_key(1), (1, 40), 0, 32)
    assert m(x).shape == (1, 40, 32)
    assert ReformerConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match='attention_options: lsh.chunk_length is set by the field lsh_chunk'):
        c.replace(attention_options=('lsh.chunk_length=16',))


def test_longcontext_cost_plans_and_times_a_step():
    r = longcontext_cost('reformer', 64, tokens_per_step=128, steps=2)
    assert 0 < r['plan_gb'] < r['machine_memory_gb'] and r['seconds'] > 0 and np.isfinite(r['loss'])
    with pytest.raises(ValueError, match='kind'): longcontext_cost('rnn', 64)


def test_longcontext_experiment_gathers_finished_runs(tmp_path):
    for run, (model, context, attention) in LONGCONTEXT_RUNS.items():
        result = {'run': run, 'model': model, 'context': context, 'attention': list(attention), 'steps': 5, 'tokens_per_step': 16384, 'eval_bytes': 131072,
                  'parameters': 10, 'valid_bits_per_byte': 2.5, 'curve': [{'step': 5, 'valid_bits': 2.5, 'train_bits': 2.6}],
                  'seconds': 9.0, 'median_step_s': 1.5, 'load_average': 0.1}
        (tmp_path / f'reformer_longcontext_{run}.json').write_text(json.dumps([result]))
    records = longcontext_experiment(steps=5, out_dir=tmp_path, resume=True, costs=False, baselines=())  # nothing to train: all runs are done
    assert {(r['config']['run'], r['metric']) for r in records} == {(run, m) for run in LONGCONTEXT_RUNS
                                                                     for m in ('valid_bits_per_byte', 'train_seconds', 'step_seconds')}
    with pytest.raises(ValueError, match='runs'): longcontext_experiment(steps=5, out_dir=tmp_path, resume=True, runs=('nope',))
    with pytest.raises(ValueError, match='steps'): longcontext_experiment(steps=6, out_dir=tmp_path, resume=True, costs=False, baselines=())


def test_ngram_bits_counts_the_previous_bytes():
    text = np.frombuffer(b'abcabcabcabcacb' * 40, np.uint8)
    one, two, three = (ngram_bits(text, text[:60], n) for n in (1, 2, 3))
    assert one == pytest.approx(np.log2(3), abs=0.01) and three < two < one  # longer contexts predict better here
    with pytest.raises(ValueError, match='alpha'): ngram_bits(text, text, 2, alpha=0)


def test_greedy_uncached_generation_is_the_argmax_of_full_passes():
    from transformers_howfar.decoding import generate
    model = ReformerLM(ReformerConfig.tiny().replace(attention=('lsh', 'full')), rngs=nnx.Rngs(3))
    prompt = [[5, 6, 7, 8, 9, 10, 11]]
    out = generate(model, prompt, 5, use_cache=False, stop_tokens=())
    tokens = list(prompt[0])
    for _ in range(5):  # one full pass per new token, the evaluation hash key fixed
        tokens.append(int(jnp.argmax(model(jnp.array([tokens]))[0, -1])))
    assert out.tolist() == [tokens[len(prompt[0]):]]
