"""Tokenizers: exact round trips over arbitrary Unicode, fixed-seed regression, batching, save/load, errors."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from transformers_howfar.data.tokenizer import (BOS_ID, CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, SPECIAL_TOKENS,
                                           UNK_ID, CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer)

FIXTURES = Path(__file__).parent / 'fixtures'
CORPUS = FIXTURES / 'hamlet_act1.txt'
SENTENCE = 'Nay, answer me: stand, and unfold yourself.'
# Any Unicode text that can be written as UTF-8 (lone surrogates cannot).
# any text but lone surrogates and U+2581, SentencePiece's own space symbol (it decodes as a space: see the test below)
unicode_text = st.text(alphabet=st.characters(blacklist_categories=('Cs',), blacklist_characters='\u2581'), max_size=60)


@pytest.fixture(scope='module', params=['unigram', 'bpe'])
def sp(request):
    return SentencePieceTokenizer.train(CORPUS, vocab_size=600, model_type=request.param, user_defined_symbols=['<n>'])


def test_special_ids_are_fixed():
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID, CLS_ID, NUM_SPECIAL) == (0, 1, 2, 3, 4, 5, 6, 7)
    assert list(SPECIAL_TOKENS.values()) == list(range(7))


def test_sentencepiece_layout(sp):
    assert sp.vocab_size == 600
    assert [sp.id_to_piece(i) for i in range(8)] == list(SPECIAL_TOKENS) + ['<n>']
    assert sp.id_to_piece(8) == '<0x00>' and sp.id_to_piece(8 + 255) == '<0xFF>'
    assert sp.token_id('<n>') == 7 and sp.token_id('<cls>') == CLS_ID


@settings(max_examples=150, deadline=None)
@given(text=unicode_text)
def test_sentencepiece_round_trip_any_unicode(sp, text):
    ids = sp.encode(text, bos=True, eos=True)
    assert ids.dtype == np.int32 and ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids.min() >= 0 and ids.max() < sp.vocab_size
    assert sp.decode(ids) == text


def test_sentencepiece_space_symbol_decodes_as_a_space(sp):
    assert sp.decode(sp.encode('a\u2581b')) == 'a b'  # the one character that does not round-trip


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(unicode_text, min_size=1, max_size=5))
def test_batch_round_trip_and_masks(sp, texts):
    b = sp.encode_batch(texts, eos=True, pad_multiple=8)
    B, T = b['ids'].shape
    assert B == len(texts) and T % 8 == 0 and b['mask'].shape == (B, T) and b['mask'].dtype == np.float32
    assert b['mask'].sum(1).tolist() == b['lengths'].tolist()
    assert np.all(b['ids'][b['mask'] == 0] == PAD_ID)
    assert sp.decode_batch(b['ids']) == texts


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet='0123456789+-*/=., ()', max_size=40))
def test_char_round_trip(text):
    tok = CharTokenizer.digits()
    ids = tok.encode(text, bos=True, eos=True)
    assert len(ids) == len(text) + 2 and tok.decode(ids) == text


def test_fixed_seed_regression():
    "A change in training settings, special ids or the SentencePiece version shows up here."
    uni = SentencePieceTokenizer.train(CORPUS, vocab_size=600, model_type='unigram', seed=0)
    assert [uni.id_to_piece(i) for i in range(263, 275)] == [',', '▁', 's', 't', '.', '▁the', 'd', '▁to', '▁of', '▁and', 'y', "'"]
    assert uni.encode(SENTENCE).tolist() == [264, 457, 402, 263, 436, 265, 353, 290, 318, 281, 264, 293, 350, 269, 263,
                                             272, 435, 301, 284, 304, 269, 315, 373, 267]
    bpe = SentencePieceTokenizer.train(CORPUS, vocab_size=600, model_type='bpe', seed=0)
    assert [bpe.id_to_piece(i) for i in range(263, 275)] == ['▁t', 'he', '▁a', 'ou', '▁s', 'in', '▁m', '▁w', 'nd', 'at', '▁the', 're']
    assert bpe.encode(SENTENCE).tolist() == [391, 321, 553, 479, 544, 556, 287, 379, 578, 339, 488, 553, 297, 453, 555,
                                             542, 360, 357, 442, 566]


def test_training_is_deterministic():
    "Same corpus and settings give the same model file (num_threads=1, the default: more threads reorder ties)."
    a = SentencePieceTokenizer.train(CORPUS, vocab_size=500)
    b = SentencePieceTokenizer.train(CORPUS, vocab_size=500)
    assert a.model_proto == b.model_proto


def test_train_from_iterator_equals_file():
    lines = (l for l in CORPUS.read_text().splitlines())
    assert SentencePieceTokenizer.train(lines, vocab_size=500).model_proto == SentencePieceTokenizer.train(CORPUS, vocab_size=500).model_proto


def test_truncation_keeps_bos_eos(sp):
    ids = sp.encode(SENTENCE, bos=True, eos=True, max_len=5)
    assert len(ids) == 5 and ids[0] == BOS_ID and ids[-1] == EOS_ID
    full = sp.encode(SENTENCE)
    assert sp.encode(SENTENCE, max_len=4, truncate='left').tolist() == full[-4:].tolist()
    b = sp.encode_batch([SENTENCE, 'a'], max_len=6, pad_to=10, as_jax=True)
    assert b['ids'].shape == (2, 10) and int(b['lengths'][0]) == 6 and type(b['ids']).__module__.startswith('jax')


@pytest.mark.parametrize('tok', [CharTokenizer('ab c'), CharTokenizer.digits()])
def test_char_save_load(tmp_path, tok):
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, CharTokenizer) and back.alphabet == tok.alphabet and back.vocab_size == tok.vocab_size


def test_sentencepiece_save_load(tmp_path, sp):
    sp.save(tmp_path / 'tok')
    back = Tokenizer.load(tmp_path / 'tok')
    assert back.model_proto == sp.model_proto and back.settings == sp.settings
    assert back.encode(SENTENCE).tolist() == sp.encode(SENTENCE).tolist()


@pytest.mark.parametrize('kwargs, message', [
    (dict(corpus=['', '   ']), 'corpus: expected some non-empty text, got none (empty corpus)'),
    (dict(corpus=[]), 'empty corpus'),
    (dict(corpus=CORPUS, vocab_size=50000), 'vocab_size: 50000 is larger than this corpus supports for unigram (at most'),
    (dict(corpus=CORPUS, vocab_size=50000, model_type='bpe'), 'is larger than this corpus supports for bpe'),
    (dict(corpus=CORPUS, vocab_size=200), 'vocab_size: expected at least 264'),
    (dict(corpus=CORPUS, vocab_size=300), 'vocab_size: 300 is too small for the 324 pieces'),
    (dict(corpus=CORPUS, user_defined_symbols=['<mask>']), "user_defined_symbols: '<mask>' is already a special token"),
    (dict(corpus=CORPUS, user_defined_symbols=['<a>', '<a>']), 'user_defined_symbols: expected distinct symbols'),
    (dict(corpus=CORPUS, model_type='char'), "model_type: expected one of ['unigram', 'bpe']"),
])
def test_training_errors(kwargs, message):
    with pytest.raises(ValueError, match=None) as e:
        SentencePieceTokenizer.train(**{'vocab_size': 600, **kwargs})
    assert message in str(e.value)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='corpus: no such file'):
        SentencePieceTokenizer.train(tmp_path / 'none.txt')


def test_unknown_special_token(sp):
    with pytest.raises(ValueError, match="token: unknown special token '<foo>'"):
        sp.token_id('<foo>')


def test_load_errors(tmp_path, sp):
    with pytest.raises(FileNotFoundError, match='is not a directory'):
        load_tokenizer(tmp_path / 'missing')
    with pytest.raises(FileNotFoundError, match='has no tokenizer.json'):
        load_tokenizer(tmp_path)
    sp.save(tmp_path)
    (tmp_path / 'tokenizer.model').write_bytes(b'\x00garbage')
    with pytest.raises(ValueError, match='is corrupt'):
        load_tokenizer(tmp_path)
    (tmp_path / 'tokenizer.model').unlink()
    with pytest.raises(FileNotFoundError, match='has no tokenizer.model'):
        load_tokenizer(tmp_path)
    (tmp_path / 'tokenizer.json').write_text('{not json')
    with pytest.raises(ValueError, match='tokenizer.json: not valid JSON'):
        load_tokenizer(tmp_path)


def test_foreign_model_rejected():
    "A SentencePiece model with other special ids would silently break every model: refuse it."
    import io
    import sentencepiece as spm
    m = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.read_text().splitlines()), model_writer=m, vocab_size=400, minloglevel=2)
    with pytest.raises(ValueError, match='expected the special pieces'):
        SentencePieceTokenizer(m.getvalue())
