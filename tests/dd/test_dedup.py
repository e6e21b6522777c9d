"""MinHash-LSH deduplication: planted duplicates dropped with their reasons, the rest kept."""

from __future__ import annotations

import random

import pytest

from potstill.dd.dedup import MinHashDedup, minhash_dedup, normalize, shingles
from potstill.dd.select import apply_filters
from potstill.errors import PotstillError


def corpus(n: int = 30, words: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def planted():
    base = corpus()
    w = base[3].split()
    w[30] = "changed"  # one word of 60: 3 of 58 trigrams differ
    near3 = " ".join(w)
    exact7 = "  " + base[7].upper().replace(" ", "   ") + "\n"  # same after normalization
    near10 = base[10] + " and one more"
    return base + [near3, exact7, near10]


def test_planted_duplicates_are_dropped_and_the_rest_kept():
    texts = planted()
    sel = minhash_dedup(texts, threshold=0.8, ngram=3, num_perm=128)
    assert sel.kept_index == list(range(30))
    by_index = {d.index: d.reason for d in sel.dropped}
    assert set(by_index) == {30, 31, 32}
    assert by_index[30].startswith("near-duplicate (of #3, jaccard~")
    assert by_index[31] == "exact duplicate (of #7)"
    assert by_index[32].startswith("near-duplicate (of #10, jaccard~")
    assert sel.report.dropped == {"near-duplicate": 2, "exact duplicate": 1}
    # the reported estimate is close to the true Jaccard similarity of the trigram sets
    true = jaccard(shingles(texts[30], ngram=3), shingles(texts[3], ngram=3))
    assert true == pytest.approx(55 / 61)
    est = float(by_index[30].split("jaccard~")[1].rstrip(")"))
    assert abs(est - true) < 0.1
    # deterministic for a seed
    again = minhash_dedup(texts, threshold=0.8, ngram=3, num_perm=128)
    assert [d.reason for d in again.dropped] == [d.reason for d in sel.dropped]


def test_threshold_and_keep_first_order():
    texts = planted()
    strict = minhash_dedup(texts, threshold=0.97, ngram=3, num_perm=256)
    assert {d.index for d in strict.dropped} == {31}  # only the exact copy is that similar
    # the earlier one is kept whichever way round they come
    rev = minhash_dedup([texts[30], texts[3]], threshold=0.8, ngram=3)
    assert rev.kept_index == [0] and rev.dropped[0].reason.startswith("near-duplicate (of #0")


def test_dedup_remembers_only_kept_examples():
    texts = planted()

    def drop_three(example, index):
        return True if index != 3 else (False, "dropped upstream")

    sel = apply_filters(texts, [drop_three, MinHashDedup(threshold=0.8, ngram=3)])
    assert 30 in sel.kept_index  # its original never reached the deduplicator
    assert sel.report.dropped == {"dropped upstream": 1, "exact duplicate": 1, "near-duplicate": 1}


def test_text_fields_and_char_shingles():
    rows = [
        {"prompt": "Say hi.", "response": "Hello there, my friend!"},
        {"prompt": "Say hi.", "response": "hello there, my friend!!"},
        {"prompt": "Count.", "response": "one two three four five"},
    ]
    char = minhash_dedup(rows, unit="char", ngram=4, threshold=0.8)
    assert char.kept_index == [0, 2] and char.dropped[0].reason.startswith("near-duplicate (of #0")
    by_key = minhash_dedup(rows, text="prompt")
    assert by_key.kept_index == [0, 2] and by_key.dropped[0].reason == "exact duplicate (of #0)"
    assert minhash_dedup(rows, text=lambda r: r["response"][::-1], unit="char", ngram=3).kept_index == [0, 2]
    assert shingles("a b", ngram=5) == {b"a b"}
    assert normalize("  A\tB \n") == "a b"


def test_dedup_errors():
    with pytest.raises(PotstillError, match="threshold"):
        MinHashDedup(threshold=0.0)
    with pytest.raises(PotstillError, match="unit"):
        MinHashDedup(unit="token")
    with pytest.raises(PotstillError, match="no 'body' field"):
        minhash_dedup([{"text": "x"}], text="body")
    with pytest.raises(PotstillError, match="pass text="):
        minhash_dedup([42])
    f = MinHashDedup()
    assert f("some text here", 0) is True
    with pytest.raises(PotstillError, match="new MinHashDedup"):
        f("entirely other words now", 0)
    assert minhash_dedup([]).report.total == 0
