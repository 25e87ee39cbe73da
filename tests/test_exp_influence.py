"""The influence experiment's parts: vmapped per-example gradients equal one-at-a-time gradients, TracIn equals its definition,
self-influence is the diagonal of influence, the share of flips found, labels flipped in place, the rule, config errors, and the
command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar.data.batches import classification_batch
from transformers_howfar.bench.measure import make_record
from transformers_howfar.experiments.common import VERDICTS
from transformers_howfar.experiments.influence import (BagOfEmbeddings, InfluenceSetup, bag_loss, example_gradients, found_at_share,
                                              influence_findings, load_influence_data, tracin)

BIN = Path(sys.executable).parent
TINY = InfluenceSetup.tiny()


@pytest.fixture(scope='module')
def parts():
    model = BagOfEmbeddings(20, 6, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 20, rng.integers(2, 9)).astype(np.int32) for _ in range(30)]
    batch = classification_batch(rows, rng.integers(0, 2, 30), 12, pad_multiple=12)
    moved = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    return graphdef, rest, [(10, 0.5, params), (20, 0.25, moved)], batch


@pytest.mark.parametrize('which', ['all', 'last'])
def test_vmapped_gradients_equal_single_gradients(parts, which):
    graphdef, rest, ckpts, batch = parts
    g, losses = example_gradients(graphdef, ckpts[1][2], rest, batch, which)
    for i in (0, 13, 29):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loss, grad = jax.value_and_grad(lambda p: bag_loss(nnx.merge(graphdef, p, rest), one, None)[0])(ckpts[1][2])
        grad = grad['classifier'] if which == 'last' else grad
        np.testing.assert_allclose(g[i], jnp.concatenate([x.ravel() for x in jax.tree.leaves(grad)]), atol=1e-6)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)


def test_tracin_is_the_lr_weighted_sum_and_self_influence_its_diagonal(parts):
    graphdef, rest, ckpts, batch = parts
    out = tracin(graphdef, rest, ckpts, batch, batch, chunk=7)
    want = sum(lr * np.asarray(example_gradients(graphdef, p, rest, batch)[0] @ example_gradients(graphdef, p, rest, batch)[0].T) for _, lr, p in ckpts)
    np.testing.assert_allclose(out['influence'], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out['self_influence'], np.diag(out['influence']), rtol=1e-4, atol=1e-7)
    assert (out['self_influence'] >= 0).all()
    assert tracin(graphdef, rest, ckpts, batch)['influence'].shape == (30, 0)


def test_first_order_meaning_of_tracin(parts):
    """One SGD step on example z changes the loss on z' by about -lr * g(z)·g(z'): the quantity TracIn adds up."""
    graphdef, rest, ckpts, batch = parts
    params, lr = ckpts[0][2], 1e-3
    z, zt = ({k: v[i:i + 1] for k, v in batch.items()} for i in (3, 4))
    loss = lambda p, b: bag_loss(nnx.merge(graphdef, p, rest), b, None)[0]
    g = jax.grad(loss)(params, z)
    stepped = jax.tree.map(lambda p, d: p - lr * d, params, g)
    predicted = -lr * float(tracin(graphdef, rest, [(0, 1.0, params)], z, zt)['influence'][0, 0])
    np.testing.assert_allclose(float(loss(stepped, zt) - loss(params, zt)), predicted, rtol=1e-2, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=30), st.data())
def test_found_at_share_properties(scores, data):
    flagged = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)).filter(any))
    shares = [k / len(scores) for k in range(1, len(scores) + 1)]
    found = found_at_share(scores, flagged, shares)
    assert found[1.0] == 1.0  # inspecting everything finds every flip
    curve = [found[s] for s in shares]
    assert curve == sorted(curve)  # never drops as more is inspected
    assert found_at_share(np.asarray(flagged, float), flagged, [sum(flagged) / len(flagged)]) == {sum(flagged) / len(flagged): 1.0}


def test_found_at_share_errors():
    with pytest.raises(ValueError, match='flagged: expected shape'):
        found_at_share([1, 2, 3], [True, False], (0.5,))


def test_labels_flip_in_place_and_fill_whole_batches():
    data = load_influence_data(TINY)
    flipped = data['is_flipped']
    assert flipped.sum() == round(TINY.flip_fraction * len(flipped)) and len(data['train_rows']) % TINY.batch_size == 0
    np.testing.assert_array_equal(data['train_labels'][flipped], 1 - data['true_labels'][flipped])
    np.testing.assert_array_equal(data['train_labels'][~flipped], data['true_labels'][~flipped])
    other = load_influence_data(TINY.replace(seed=1))['is_flipped']
    assert (other != flipped).any()  # each seed flips its own labels


def _records(gains, gaps):
    out = []
    for seed, (gain, gap) in enumerate(zip(gains, gaps)):
        c = {'seed': seed}
        out += [make_record('influence', c | {'ranking': 'self_influence_all', 'share': 0.1}, 'found_at_share', 0.3 + gain, 'fraction', {}),
                make_record('influence', c | {'ranking': 'final_loss', 'share': 0.1}, 'found_at_share', 0.3, 'fraction', {}),
                make_record('influence', c | {'model': 'bag-of-embeddings'}, 'test_accuracy', 0.75 - gap, 'fraction', {}),
                make_record('influence', c | {'model': 'bow-logistic'}, 'test_accuracy', 0.75, 'fraction', {})]
    return out


def test_the_rule_reads_the_records():
    assert influence_findings(_records([0.10, 0.12, 0.11], [0, 0.01, 0.02])).verdict == 'holds'
    assert influence_findings(_records([-0.10, -0.12, -0.11], [0, 0.01, 0.02])).verdict == 'does not hold'
    assert influence_findings(_records([0.3, -0.2, 0.1], [0, 0, 0])).verdict == 'inconclusive'
    unfit = influence_findings(_records([0.10, 0.12, 0.11], [0, 0.1, 0]))
    assert unfit.verdict == 'not tested' and 'below bag-of-words' in unfit.reason
    assert influence_findings(_records([0.10, 0.12], [0, 0])).verdict == 'not tested'  # two seeds


@pytest.mark.parametrize('change, message', [(dict(params='first'), 'params: expected one of'), (dict(shares=()), 'shares: expected'),
                                             (dict(n_checkpoints=0), 'n_checkpoints'), (dict(learning_rate=0), 'learning_rate')])
def test_setup_errors(change, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**change)


def test_cli_quick_run(tmp_path):
    r = subprocess.run([str(BIN / 'howfar'), 'experiment', 'influence', '--quick', '--out', str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads((tmp_path / 'influence.json').read_text())
    rankings = {x['config']['ranking'] for x in records if x['metric'] == 'found_at_share'}
    assert rankings == {'self_influence_all', 'self_influence_last', 'final_loss', 'loss_sum', 'random'}
    assert {x['config']['seed'] for x in records} == {0, 1, 2}
    assert all(0 <= x['value'] <= 1 for x in records if x['metric'] in ('found_at_share', 'test_accuracy'))
    assert any(line.startswith(f'{v}: TracIn minus final loss') for v in VERDICTS for line in r.stdout.splitlines()), r.stdout
    again = subprocess.run([str(BIN / 'howfar'), 'experiment', 'influence', '--quick', '--resume', '--out', str(tmp_path)],
                           capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONWARNINGS': 'ignore'})
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / 'influence.json').read_text()) == records  # the finished run is reused, not redone
