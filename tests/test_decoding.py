"Decoding: greedy against full passes, sampling reproducibility, beam search, one compile per shape, the CLI."
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

from transformers_howfar.decoding import beam_search, filter_logits, generate, left_pad
from transformers_howfar.models.lm import LM, LMConfig
from transformers_howfar.models.rnn import RNNConfig, RNNEncoderDecoder
from transformers_howfar.models.saving import save_model
from transformers_howfar.data.tokenizer import EOS_ID, CharTokenizer
from transformers_howfar.models.transformer import EncoderDecoder, TransformerConfig

LM_MODEL = LM(LMConfig.tiny().replace(position='rotary'), rngs=nnx.Rngs(0))
PROMPTS = [[9, 10, 11, 12, 13], [14, 15], [16, 17, 18]]
SRC = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
HOWFAR = str(Path(sys.executable).parent / 'howfar')


def full_pass_greedy(model, prompt, n):
    "Greedy continuation by argmax of full passes over a fixed window (one compile)."
    forward = nnx.jit(lambda m, t: m(t))
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(jnp.argmax(forward(model, jnp.array([seq + [0] * (32 - len(seq))]))[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_batch_of_different_lengths_equals_full_passes():
    out = generate(LM_MODEL, PROMPTS, 10, stop_tokens=())
    for prompt, row in zip(PROMPTS, out):
        assert row.tolist() == full_pass_greedy(LM_MODEL, prompt, 10)


def test_uncached_loop_agrees_with_cached():
    np.testing.assert_array_equal(generate(LM_MODEL, PROMPTS, 8, use_cache=False, stop_tokens=()),
                                  generate(LM_MODEL, PROMPTS, 8, stop_tokens=()))


def test_sampling_is_reproducible_given_a_key():
    a = generate(LM_MODEL, PROMPTS, 10, temperature=1.0, top_k=8, key=jax.random.key(5))
    b = generate(LM_MODEL, PROMPTS, 10, temperature=1.0, top_k=8, key=jax.random.key(5))
    c = generate(LM_MODEL, PROMPTS, 10, temperature=1.0, top_k=8, key=jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_one_compile_per_shape_not_per_token():
    traced = []  # JAX reports every trace of a jitted function: a program that is not reused is traced again
    def listen(event, seconds, **kw):
        if event == '/jax/core/compile/jaxpr_trace_duration': traced.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        generate(LM_MODEL, [[7, 8, 9, 10]], 12, stop_tokens=())
        first = len(traced)
        generate(LM_MODEL, [[20, 21, 22, 23]], 12, stop_tokens=())  # same shapes and settings: nothing new
        again = len(traced) - first
        generate(LM_MODEL, [[20, 21, 22, 23, 24]], 12, stop_tokens=())  # another prompt length: a new program
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert again == 0 and len(traced) > first


def test_prompt_mask_any_padding_side():
    tokens = np.array([[9, 10, 11, 0, 0], [0, 0, 14, 15, 16]])
    mask = tokens != 0
    out = generate(LM_MODEL, tokens, 6, prompt_mask=mask, stop_tokens=())
    np.testing.assert_array_equal(out, generate(LM_MODEL, [[9, 10, 11], [14, 15, 16]], 6, stop_tokens=()))


@pytest.mark.parametrize('make', [lambda: LM_MODEL,
                                  lambda: EncoderDecoder(TransformerConfig.tiny(), rngs=nnx.Rngs(3)),
                                  lambda: RNNEncoderDecoder(RNNConfig.tiny(), rngs=nnx.Rngs(3))])
def test_beam_size_one_is_greedy(make):
    model = make()
    inputs = PROMPTS if isinstance(model, LM) else SRC
    greedy = generate(model, inputs, 8)
    seqs, scores = beam_search(model, inputs, 8, beam_size=1, alpha=0.0)
    np.testing.assert_array_equal(seqs[:, 0], greedy)


def test_beam_search_finds_at_least_greedys_probability():
    model = EncoderDecoder(TransformerConfig.tiny(), rngs=nnx.Rngs(3))
    def logprob(row, y):
        y = list(y); y = y[:y.index(EOS_ID) + 1] if EOS_ID in y else y
        lp = jax.nn.log_softmax(model(SRC[row:row + 1], jnp.array([[2] + y[:-1]]))[0])
        return float(jnp.take_along_axis(lp, jnp.array(y)[:, None], 1).sum())
    greedy = generate(model, SRC, 8)
    seqs, scores = beam_search(model, SRC, 8, beam_size=4, alpha=0.0)
    for row in range(2):
        assert scores[row, 0] == pytest.approx(logprob(row, seqs[row, 0]), abs=1e-3)
        assert scores[row, 0] >= logprob(row, greedy[row]) - 1e-4


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(0.05, 1.0))
def test_nucleus_keeps_the_smallest_set_reaching_p(logits, p):
    logits = np.asarray(logits, np.float32)
    kept = np.isfinite(np.asarray(filter_logits(logits[None], top_p=p))[0])
    probs = np.exp(logits - logits.max()); probs /= probs.sum()
    assert probs[kept].sum() >= p - 1e-5 or kept.all()  # enough mass
    assert probs[kept].min() >= probs[~kept].max(initial=0) - 1e-6  # the most probable ones
    lowest = np.isclose(probs, probs[kept].min(), rtol=1e-6) & kept  # tokens tied at the cut-off are kept together
    if not lowest.all():  # minimal: without its least probable tokens the set falls short of p
        assert probs[kept].sum() - probs[lowest].sum() < p + 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError, match='top_p: expected a number in'):
        generate(LM_MODEL, PROMPTS, 4, top_p=1.5)
    with pytest.raises(ValueError, match='prompts: expected a non-empty list'):
        left_pad([])
    with pytest.raises(ValueError, match='beam_size: expected a whole number > 0'):
        beam_search(LM_MODEL, PROMPTS, 4, beam_size=0)


def test_howfar_generate_end_to_end(tmp_path):
    tok = CharTokenizer('abcdefghijklmnopqrstuvwxy')
    save_model(LM_MODEL, tmp_path / 'lm', tokenizer=tok)
    run = subprocess.run([HOWFAR, 'generate', str(tmp_path / 'lm'), 'abc', '--max-new-tokens', '5'], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    expected = generate(LM_MODEL, [[EOS_ID] + tok.encode('abc').tolist()], 5)[0].tolist()
    expected = expected[:expected.index(EOS_ID)] if EOS_ID in expected else expected
    assert run.stdout.strip().splitlines() == [tok.decode(expected)]
    bad = subprocess.run([HOWFAR, 'generate', str(tmp_path / 'missing'), 'abc'], capture_output=True, text=True)
    assert bad.returncode == 2 and 'howfar generate: error: path: no model.json' in bad.stderr
