"""Property tests of the public API: random shapes, lengths, dtypes and option values, good and bad. Every outcome is
a correct result or one ValueError whose single line starts with the name of the argument at fault."""
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from transformers_howfar.data.tokenizer import CharTokenizer
from transformers_howfar.decoding import generate
from transformers_howfar.layers.attention import dot_product_attention, get_attention
from transformers_howfar.layers.losses import cross_entropy
from transformers_howfar.models.lm import LM, LMConfig

FEW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COUNTS = st.sampled_from([-1, 0, 1, 2, 3, 8, 2.5])  # counts as a user might pass them, good and bad


def clear(error: ValueError, names) -> str:
    "The argument a one-line error names, checked to be one of `names`."
    text = str(error)
    assert '\n' not in text and re.match(r'^[\w.\[\]]+: ', text), text
    assert text.split(':')[0] in names, text
    return text.split(':')[0]


OPTIONS = {  # each kind's options, drawn from good and bad values
    'full': {},
    'chunked': {'block_q': COUNTS, 'block_kv': COUNTS},
    'local': {'block_size': COUNTS, 'look_back': COUNTS, 'look_ahead': st.sampled_from([-1, 0, 1])},
    'sparse': {'stride': COUNTS, 'summary': COUNTS, 'pattern': st.sampled_from(['fixed', 'strided', 'dense'])},
    'memory_compressed': {'stride': COUNTS},
    'ssmax': {},
    'lsh': {'chunk_length': st.sampled_from([0, 2, 4, 8, 2.5]), 'n_rounds': COUNTS},
}


@pytest.mark.parametrize('name', list(OPTIONS))
@FEW
@given(data=st.data(), T=st.integers(1, 16), heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]), causal=st.booleans(),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), padded=st.integers(0, 3))
def test_attention_is_a_convex_mix_of_the_values_or_a_clear_error(name, data, T, heads, causal, dtype, padded):
    N, K = heads
    if name == 'lsh': K = N  # shared queries and keys
    options = {k: data.draw(s, label=k) for k, s in OPTIONS[name].items()}
    r = np.random.default_rng(T)
    q, k, v = (jnp.asarray(r.normal(size=(2, T, n, 4)), dtype) for n in (N, K, K))
    padding = jnp.ones((2, T), bool).at[1, T - min(padded, T - 1):].set(False) if padded and T > 1 else None
    kind = get_attention(name)
    extra = kind.make_params(K, 4, rngs=nnx.Rngs(0, lsh=1)).as_kwargs() if kind.make_params else {}
    if name == 'memory_compressed': extra = {}  # mean pooling: the summaries are convex mixes too
    try:
        out = kind.fn(k if name == 'lsh' else q, k, v, causal=causal, padding_mask=padding, **options, **extra)
    except ValueError as e:
        clear(e, set(options))
        return
    assert out.shape == (2, T, N, 4) and out.dtype == dtype and bool(jnp.isfinite(out).all())
    tol = 0.02 if dtype == jnp.bfloat16 else 1e-5
    group = np.repeat(np.asarray(v, np.float32), N // K, axis=2)  # (B, S, N, H)
    out = np.asarray(out, np.float32)
    for b in range(2):  # every row mixes the values: each output lies between their smallest and largest
        real = slice(None) if padding is None else np.asarray(padding[b])
        low, high = group[b, real].min(0), group[b, real].max(0)  # (N, H)
        rows = out[b] if padding is None else out[b, np.asarray(padding[b])]
        if name == 'memory_compressed' and causal:  # a query before the first whole summary sees nothing: zeros
            rows = rows[np.abs(rows).sum((1, 2)) > 0]
        assert (rows >= low - tol).all() and (rows <= high + tol).all(), (name, options)
    if name == 'chunked' and dtype == jnp.float32:
        np.testing.assert_allclose(out, dot_product_attention(q, k, v, causal=causal, padding_mask=padding),
                                   rtol=1e-5, atol=1e-5)


@SOME
@given(alphabet=st.text(min_size=1, max_size=8), data=st.data(), fault=st.sampled_from([None, None, 'foreign', 'lone']),
       max_len=st.sampled_from([None, None, -1, 0, 1, 3, 2.5]), truncate=st.sampled_from(['right', 'left', 'error', 'mid']))
def test_char_tokenizer_round_trips_or_says_why(alphabet, data, fault, max_len, truncate):
    try:
        tok = CharTokenizer(alphabet)
    except ValueError as e:
        assert clear(e, {'alphabet'}) and len(set(alphabet)) < len(alphabet)
        return
    text = data.draw(st.text(alphabet=sorted(set(alphabet)), max_size=12), label='text')
    if fault == 'foreign': text += data.draw(st.characters().filter(lambda c: c not in alphabet), label='foreign')
    if fault == 'lone': text = text[:2] + '\udcff' + text[2:]  # a byte that was not UTF-8, as Python passes it on
    try:
        ids = tok.encode(text, max_len=max_len, truncate=truncate)
    except ValueError as e:
        name = clear(e, {'text', 'max_len', 'truncate'})
        expected = ({'text'} if fault else set()) | ({'truncate'} if truncate == 'mid' else set())
        if max_len is not None and not (isinstance(max_len, int) and max_len > 0): expected.add('max_len')
        if truncate == 'error' and max_len is not None and len(text) > max_len: expected.add('max_len')
        assert name in expected, (name, expected)
        return
    assert ids.dtype == np.int32 and not fault and truncate != 'mid'
    kept = text if max_len is None else text[:max_len] if truncate == 'right' else text[max(0, len(text) - max_len):]
    assert tok.decode(ids) == kept


@SOME
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6)), data=st.data(),
       smoothing=st.sampled_from([0.0, 0.1, -0.1, 1.0]))
def test_cross_entropy_is_the_mean_over_counted_tokens_or_a_clear_error(shape, data, smoothing):
    B, T, V = shape
    r = np.random.default_rng(B * 100 + T * 10 + V)
    logits = r.normal(size=shape).astype(np.float32)
    targets = np.asarray(data.draw(st.lists(st.integers(-3, V + 2), min_size=B * T, max_size=B * T))).reshape(B, T)
    mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).reshape(B, T)
    try:
        loss, m = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), smoothing)
    except ValueError as e:
        assert clear(e, {'label_smoothing'}) and not 0 <= smoothing < 1
        return
    counted = mask
    if not counted.any():
        assert float(loss) == 0 and float(m['tokens']) == 0
    elif ((targets < 0) | (targets >= V))[counted].any():  # a counted target outside the vocabulary
        assert np.isnan(float(m['nll']))
    else:  # masked targets may hold anything: they change nothing
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(log_p, np.clip(targets, 0, V - 1)[..., None], -1)[..., 0]
        np.testing.assert_allclose(float(m['nll']), nll[counted].mean(), rtol=1e-5, atol=1e-6)


LM_MODEL = LM(LMConfig.tiny().replace(position='rotary'), rngs=nnx.Rngs(0))


GOOD = dict(n=3, temperature=0.7, top_k=5, top_p=0.5)
BAD = dict(n=[-1, 0, 2.5, 10**12], temperature=[-1.0], top_k=[-1, 40, 1.5], top_p=[-0.1, 0.0, 1.5])
NAMES = dict(n='max_new_tokens', temperature='temperature', top_k='top_k', top_p='top_p', prompts='prompts')


@FEW
@given(prompts=st.lists(st.lists(st.integers(0, 31), min_size=1, max_size=4), min_size=1, max_size=2),
       fault=st.sampled_from([None, None, 'n', 'temperature', 'top_k', 'top_p', 'prompts']), data=st.data())
def test_generate_continues_within_the_vocabulary_or_names_the_bad_argument(prompts, fault, data):
    args = dict(GOOD)
    if fault == 'prompts': prompts = [prompts[0] + [data.draw(st.sampled_from([-1, 32, 99]), label='bad id')]]
    elif fault: args[fault] = data.draw(st.sampled_from(BAD[fault]), label=fault)
    try:
        out = generate(LM_MODEL, prompts, args['n'], temperature=args['temperature'], top_k=args['top_k'],
                       top_p=args['top_p'], key=0)
    except ValueError as e:
        assert fault and clear(e, {NAMES[fault]})
        return
    assert fault is None, f'{fault}={args.get(fault, prompts)} was accepted'
    assert out.shape == (len(prompts), args['n']) and ((out >= 0) & (out < LM_MODEL.config.vocab_size)).all()
