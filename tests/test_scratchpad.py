"Tests of transformers_howfar.scratchpad: formats, slots, sampling, the model, greedy decoding, scoring and the CLI."
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from transformers_howfar import scratchpad as sp
from transformers_howfar.scratchpad import (FORMATS, ROLE, TOKENIZER, AdditionConfig, AdditionLM, addition_batches,
                                            encode_problems, evaluate_addition, format_problem, greedy_answers,
                                            parse_answer, problem_slots, sample_problems, step_accuracy, held_out_problems)

HOWFAR = str(Path(sys.executable).with_name('howfar'))
numbers = st.integers(0, 10**40)
forward = nnx.jit(lambda model, tokens, slots: model(tokens, slots))  # one compile instead of op-by-op dispatch
step = nnx.jit(lambda model, tokens, slots, cache: model.step(tokens, slots, cache))


@settings(max_examples=200, deadline=None)
@given(numbers, numbers, st.sampled_from(FORMATS))
def test_every_format_parses_back_to_the_sum(a, b, fmt):
    prompt, target = format_problem(a, b, fmt)
    assert prompt == f'{a}+{b}='
    assert parse_answer(target, fmt) == a + b
    roles, sig = problem_slots(a, b, fmt)
    assert len(roles) == len(sig) == len(prompt + target)
    TOKENIZER.encode(prompt + target)  # every character is in the digit tokenizer


@settings(max_examples=100, deadline=None)
@given(numbers, numbers)
def test_scratchpad_lines_are_the_school_algorithm(a, b):
    target = format_problem(a, b)[1]
    lines, carry = target.split(',')[:-1], 0
    n = max(len(str(a)), len(str(b)))
    assert len(lines) == n and len(target.split(',')[-1]) == n + 1
    for i, line in enumerate(lines):
        x, y, c, eq, out, s = line
        assert eq == '=' and int(c) == carry
        assert int(x) == (a // 10**i) % 10 and int(y) == (b // 10**i) % 10
        assert int(x) + int(y) + int(c) == 10 * int(out) + int(s)
        carry = int(out)
    assert step_accuracy(target, target) == 1.0


def test_slots_follow_significance():
    roles, sig = problem_slots(1234, 56, 'scratchpad')
    assert sig[:4] == [3, 2, 1, 0] and sig[5:7] == [1, 0]
    line3 = slice(8 + 3 * 7, 8 + 4 * 7)  # the line of digit position 3
    assert sig[line3] == [3, 3, 3, 3, 4, 3, 3]
    assert [sp.ROLES[r] for r in roles[line3]][:2] == ['line_a', 'line_b']
    assert sig[-5:] == [4, 3, 2, 1, 0] and sp.ROLES[roles[-5]] == 'answer_top'


def test_sampler_is_balanced_and_never_draws_a_test_problem():
    rng = np.random.default_rng(1)
    held = frozenset(held_out_problems(1)) | frozenset(held_out_problems(2))
    problems = sample_problems(rng, 3000, max_digits=2, exclude=held)
    assert not held & set(problems)
    lengths = np.bincount([max(len(str(a)), len(str(b))) for a, b in problems])
    assert abs(lengths[1] - lengths[2]) < 300
    # carries: about as many problems with a carry out of the last position as without
    tops = [format_problem(a, b)[1].split(',')[-1][0] == '1' for a, b in problems]
    assert 0.25 < np.mean(tops) < 0.75
    batch = next(addition_batches(AdditionConfig.tiny().replace(train_digits=2), 64))
    texts = TOKENIZER.decode_batch(batch['inputs'][:, 1:])
    seen = {tuple(map(int, t.split('=')[0].split('+'))) for t in texts}
    assert not seen & held


def test_test_sets_are_fixed_and_sized():
    assert held_out_problems(7, 50) == held_out_problems(7, 1000)[:50]
    assert len(held_out_problems(1)) == 20 and len(set(held_out_problems(3))) == 1000
    with pytest.raises(ValueError, match='n_digits'): held_out_problems(0)


def test_encoded_batch_masks_the_prompt():
    b = encode_problems([(12, 345)], 'direct', length=20, offsets=[3])
    assert b['inputs'].shape == (1, 20) and b['slots'].shape == (1, 20, 4)
    assert TOKENIZER.decode(b['targets'][0][b['loss_mask'][0] > 0]) == '0357'
    assert b['slots'][0, 0, 3] == 1 + 3  # <s> must write a's digit of significance 1, shifted by the offset
    assert (b['slots'][0, :, 0] == ROLE['answer_top']).sum() == 1


@pytest.mark.parametrize('position,codes', [('digits', 'offset'), ('digits', 'random'), ('learned', 'offset'), ('rotary', 'offset')])
def test_cached_steps_equal_a_full_pass(position, codes):
    cfg = AdditionConfig.tiny().replace(position=position, digit_codes=codes)
    model = AdditionLM(cfg, rngs=nnx.Rngs(1))
    b = encode_problems([(123, 456), (7, 89)], 'scratchpad', offsets=[0, 4])
    full = forward(model, b['inputs'], b['slots'])
    cache = model.lm.init_cache(2, b['inputs'].shape[1])
    parts = []
    for lo, hi in ((0, 5), (5, 6), (6, b['inputs'].shape[1])):
        logits, cache = step(model, b['inputs'][:, lo:hi], b['slots'][:, lo:hi], cache)
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=1e-4)
    moved = forward(model, b['inputs'], b['slots'] + np.array([0, 1, 0, 1]))
    assert np.allclose(moved, full) == (position != 'digits')  # only the digit scheme reads the slots


def test_greedy_decoding_is_the_argmax_of_a_full_pass():
    model = AdditionLM(AdditionConfig.tiny(), rngs=nnx.Rngs(3))
    problems = list(held_out_problems(4, 6))
    outputs = greedy_answers(model, problems, batch_size=4)
    for (a, b), out in zip(problems, outputs):
        prompt, target = format_problem(a, b)
        assert len(out) == len(target)
        # feed the model its own output: each written token is the argmax after the tokens before it
        ids = [sp.BOS_ID] + list(TOKENIZER.encode(prompt + out))
        slots = encode_problems([(a, b)], 'scratchpad')['slots'][:, :len(ids)]
        logits = forward(model, jnp.asarray([ids]), slots)
        want = np.asarray(jnp.argmax(logits[0, len(prompt):len(ids) - 1], -1))
        assert list(want) == ids[len(prompt) + 1:]


def test_scoring_counts_only_the_final_answer(monkeypatch):
    model = AdditionLM(AdditionConfig.tiny(), rngs=nnx.Rngs(0))
    problems = list(held_out_problems(3, 10))
    gold = [format_problem(a, b)[1] for a, b in problems]
    wrong_steps = [g[:2] + str(9 - int(g[2])) + g[3:] for g in gold]  # a wrong carry-in digit, right answer
    wrong_answer = [g[:-1] + str((int(g[-1]) + 1) % 10) for g in gold]  # right steps, wrong answer
    for outputs, exact, steps in ((gold, 1.0, 1.0), (wrong_steps, 1.0, 2 / 3), (wrong_answer, 0.0, 1.0)):
        monkeypatch.setattr(sp, 'greedy_answers', lambda m, p, outputs=outputs: outputs)
        r = evaluate_addition(model, 3, 10)
        assert r['exact_match'] == exact and r['step_accuracy'] == pytest.approx(steps)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match='format'): AdditionConfig(format='binary')
    with pytest.raises(ValueError, match='position'): AdditionConfig(position='abacus')
    with pytest.raises(ValueError, match='max_len'): AdditionConfig(max_len=50)
    with pytest.raises(ValueError, match='vocab_size'): AdditionConfig(vocab_size=30)
    with pytest.raises(ValueError, match='digit_codes'): AdditionConfig(digit_codes='hash')
    with pytest.raises(ValueError, match='n_codes'):
        greedy_answers(AdditionLM(AdditionConfig.tiny().replace(digit_codes='random'), rngs=nnx.Rngs(0)), [(10**11, 10**11)])
    with pytest.raises(ValueError, match='one length'): greedy_answers(AdditionLM(AdditionConfig.tiny(), rngs=nnx.Rngs(0)), [(1, 23)])


@pytest.mark.slow
def test_experiment_command_writes_records(tmp_path):
    p = subprocess.run([HOWFAR, 'experiment', 'scratchpad', '--quick', '--out', str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'scratchpad-random' in p.stdout and 'direct-random' in p.stdout and 'verdict: not tested' in p.stdout
    records = json.loads((tmp_path / 'scratchpad.json').read_text())
    records = records['records'] if isinstance(records, dict) else records
    digits = {r['config']['n_digits'] for r in records if r['metric'] == 'exact_match'}
    assert digits == {1, 3, 5}
    assert {r['config']['seed'] for r in records} == {0, 1, 2}
    assert all(0 <= r['value'] <= 1 for r in records)
    # an interrupted experiment resumes from the runs it finished: their results are reused, not recomputed
    (tmp_path / 'scratchpad.json').unlink()
    again = subprocess.run([HOWFAR, 'experiment', 'scratchpad', '--quick', '--resume', '--out', str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads((tmp_path / 'scratchpad.json').read_text())
    resumed = resumed['records'] if isinstance(resumed, dict) else resumed
    assert [(r['config'], r['value']) for r in resumed] == [(r['config'], r['value']) for r in records]


@pytest.mark.parametrize('codes', ['offset', 'spread', 'random'])
def test_training_labels_are_distinct_per_significance(codes):
    cfg = AdditionConfig(digit_codes=codes, train_digits=6, max_offset=10)
    b = next(addition_batches(cfg, 32, seed=2))
    for inputs, slots in zip(b['inputs'], b['slots']):
        a_text = TOKENIZER.decode(inputs[1:]).split('+')[0]
        labels = slots[1:1 + len(a_text), 1]  # a's digits, most significant first
        assert len(set(labels)) == len(labels) and labels.max() < cfg.n_codes
        if codes != 'random': assert (np.diff(labels) < 0).all()  # labels grow with the significance
        if codes == 'offset': assert (np.diff(labels) == -1).all()
