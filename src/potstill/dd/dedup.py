"""Exact and near-duplicate removal: a streaming filter that keeps the first of each cluster.

Near duplicates are found with MinHash (Broder 1997) and locality-sensitive hashing over
bands of the signature (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets",
ch. 3.4), from ``datasketch``: each text becomes a set of shingles (word or character
n-grams of its normalized form), its MinHash signature estimates the Jaccard similarity
``|A & B| / |A | B|`` of two such sets, and the LSH index proposes candidates whose
similarity is likely above ``threshold``. A candidate counts only if its *estimated*
Jaccard similarity really is ``>= threshold`` (LSH proposes false positives); LSH can
miss a pair just above the threshold (a false negative), with a probability set by
``num_perm`` and the band layout datasketch chooses.

Texts equal after normalization (lower case, runs of whitespace collapsed) take a fast
path: a hash lookup, reason ``"exact duplicate (of #i)"``, no MinHash.

The filter is stateful: it remembers the examples it *kept* (its own and those other
filters let through), so use one instance per pass. Keep-first means the earlier index
wins; a near-duplicate chain ``a ~ b ~ c`` with ``a`` not similar to ``c`` keeps ``a`` and
``c`` when ``b`` is dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from ..errors import PotstillError
from .select import Selection, apply_filters

_WORD = re.compile(r"\w+", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped."""
    return _SPACE.sub(" ", text.lower()).strip()


def shingles(text: str, *, ngram: int = 5, unit: Literal["word", "char"] = "word") -> set[bytes]:
    """The shingle set of ``text``: word n-grams (``\\w+`` tokens of the normalized text) or
    character n-grams of the normalized text. A text shorter than ``ngram`` units is one shingle."""
    if ngram < 1:
        raise PotstillError(f"ngram={ngram} must be >= 1")
    norm = normalize(text)
    if unit == "word":
        toks = _WORD.findall(norm)
        grams = [" ".join(toks[i : i + ngram]) for i in range(max(1, len(toks) - ngram + 1))]
    elif unit == "char":
        grams = [norm[i : i + ngram] for i in range(max(1, len(norm) - ngram + 1))]
    else:
        raise PotstillError(f"unit='{unit}' is unknown; use 'word' or 'char'")
    return {g.encode("utf-8") for g in grams}


def default_text(example: Any) -> str:
    """The text of an example: a ``str`` itself; a mapping's ``text``, else its ``prompt`` and
    ``response`` joined by a newline (either may be missing)."""
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping):
        if isinstance(example.get("text"), str):
            return example["text"]
        parts = [example[k] for k in ("prompt", "response") if isinstance(example.get(k), str)]
        if parts:
            return "\n".join(parts)
    raise PotstillError(
        f"cannot find the text of a {type(example).__name__} example for deduplication; "
        "pass text=<key or function> (e.g. text='response')"
    )


class MinHashDedup:
    """A filter ``f(example, index) -> True | (False, reason)`` dropping exact and near duplicates
    of earlier kept examples.

    ``text``: a key of mapping examples, a function ``example -> str``, or ``None``
    (:func:`default_text`). ``threshold``: Jaccard similarity of shingle sets at or above
    which two texts are duplicates. ``num_perm``: MinHash permutations (the estimate's
    standard error is about ``sqrt(J (1 - J) / num_perm)``). ``seed``: the MinHash
    permutations (deterministic for a seed). Reasons:
    ``"exact duplicate (of #i)"`` and ``"near-duplicate (of #i, jaccard~x)"`` with the
    kept example ``#i`` most similar to this one (ties: the lower index).
    """

    def __init__(
        self,
        *,
        text: str | Callable[[Any], str] | None = None,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        unit: Literal["word", "char"] = "word",
        seed: int = 1,
    ):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise PotstillError(f"threshold={threshold} must be in (0, 1] (a Jaccard similarity)")
        if num_perm < 2:
            raise PotstillError(f"num_perm={num_perm} must be >= 2")
        if unit not in ("word", "char"):
            raise PotstillError(f"unit='{unit}' is unknown; use 'word' or 'char'")
        self.threshold, self.num_perm, self.ngram, self.unit, self.seed = threshold, num_perm, ngram, unit, seed
        self.text = text
        self._exact: dict[bytes, int] = {}
        self._sigs: dict[int, Any] = {}
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.__name__ = "minhash_dedup"

    def _text_of(self, example: Any) -> str:
        if self.text is None:
            out = default_text(example)
        elif callable(self.text):
            out = self.text(example)
        else:
            try:
                out = example[self.text]
            except (KeyError, TypeError, IndexError):
                raise PotstillError(f"an example has no '{self.text}' field to deduplicate on; check text=") from None
        if not isinstance(out, str):
            raise PotstillError(f"deduplication text must be a str, got {type(out).__name__}; check text=")
        return out

    def signature(self, text: str):
        """The ``datasketch.MinHash`` of ``text``'s shingles."""
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(sorted(shingles(text, ngram=self.ngram, unit=self.unit)))
        return m

    def __call__(self, example: Any, index: int):
        text = self._text_of(example)
        key = hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()
        if key in self._exact:
            return False, f"exact duplicate (of #{self._exact[key]})"
        sig = self.signature(text)
        best, best_j = None, -1.0
        for cand in sorted(self._lsh.query(sig)):
            j = sig.jaccard(self._sigs[cand])
            if j >= self.threshold and j > best_j:
                best, best_j = cand, j
        if best is not None:
            return False, f"near-duplicate (of #{best}, jaccard~{best_j:.2f})"
        if index in self._sigs:
            raise PotstillError(f"example #{index} was deduplicated twice; use a new MinHashDedup for each pass")
        self._exact[key] = index
        self._sigs[index] = sig
        self._lsh.insert(index, sig)
        return True


def minhash_dedup(examples: Iterable, **kwargs) -> Selection:
    """``apply_filters(examples, [MinHashDedup(**kwargs)])``: the kept examples (first of each
    cluster) and the dropped ones, each with its reason."""
    return apply_filters(examples, [MinHashDedup(**kwargs)])
