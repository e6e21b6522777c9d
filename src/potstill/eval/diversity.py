"""Diversity of a model's answers to the held-out prompts, beside distinct-n: self-BLEU, the mean pairwise
embedding distance, the share of answers caught in a loop, and the collapse flag of a student whose diversity
falls below a fraction of the teacher's.

* **self-BLEU** (Zhu et al. 2018, *Texygen*): each answer's sentence BLEU (sacrebleu, exponential smoothing)
  against all the other answers as references, averaged; 0 to 1, *higher is less diverse*.
* **embedding spread**: ``1 - mean_{i != j} cos(e_i, e_j)`` over sentence embeddings (all-MiniLM-L6-v2 mean
  pooled, :func:`potstill.dd.diversity.embed_texts`); higher is more diverse.
* **loop share**: the share of answers in which some word 4-gram occurs 3 or more times ("The sentence, the
  sentence, the sentence, ..."); lower is better.
* **collapse**: a student whose distinct-2 or embedding spread is below ``fraction`` of the teacher's.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence

log = logging.getLogger("potstill")

__all__ = ["collapsed", "embedding_spread", "loop_share", "self_bleu"]

LOOP_N, LOOP_REPEATS = 4, 3


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (0..1) of each text against the others; nan with fewer than two non-empty texts."""
    import sacrebleu

    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return float("nan")
    scores = [
        sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :], smooth_method="exp").score / 100.0
        for i, t in enumerate(texts)
    ]
    return sum(scores) / len(scores)


def loop_share(texts: Sequence[str], n: int = LOOP_N, repeats: int = LOOP_REPEATS) -> float:
    """Share of texts with a word ``n``-gram (lower-cased, whitespace split) occurring ``repeats`` or more times."""
    if not texts:
        return float("nan")

    def loops(text: str) -> bool:
        words = text.lower().split()
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        return any(c >= repeats for c in grams.values())

    return sum(loops(t) for t in texts) / len(texts)


def embedding_spread(texts: Sequence[str], model_path: str | None = None) -> float:
    """``1 - mean pairwise cosine`` of the texts' sentence embeddings; nan with fewer than two non-empty texts."""
    from ..dd.diversity import embed_texts

    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return float("nan")
    e = embed_texts(texts, model_path)  # L2-normalized rows
    n = e.shape[0]
    sims = e @ e.T
    mean_off_diag = (float(sims.sum()) - float(sims.diagonal().sum())) / (n * (n - 1))
    return 1.0 - mean_off_diag


def collapsed(runs: Mapping[str, Mapping[str, float]], fraction: float, teacher: str = "teacher") -> list[str]:
    """Students whose distinct-2 or embedding spread is below ``fraction`` of the teacher's (metrics that are nan
    on either side are not judged)."""
    t = runs.get(teacher)
    if t is None:
        return []
    out = []
    for name, m in runs.items():
        if name == teacher:
            continue
        for key in ("distinct_2", "embedding_spread"):
            a, b = m.get(key), t.get(key)
            if a is None or b is None or math.isnan(a) or math.isnan(b):
                continue
            if a < fraction * b:
                out.append(name)
                break
    return out
