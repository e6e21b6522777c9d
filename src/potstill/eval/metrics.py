"""Evaluation metrics as pure functions: tensors or strings in, python numbers out.

Sums rather than means where a metric is accumulated over batches
(:func:`teacher_forced_stats`), so the caller divides once by the global count.
Empty inputs give ``float("nan")``, never an exception: "no data" is not "zero error".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "count_parameters",
    "distinct_n",
    "expected_calibration_error",
    "perplexity",
    "rouge_l",
    "teacher_forced_rows",
    "teacher_forced_stats",
]


def teacher_forced_stats(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict:
    """Per-position agreement between a student and its teacher, summed over ``n`` positions.

    Args:
        student_logits: ``[n, V]`` the student's logits at the positions that predict ``targets``.
        teacher_logits: ``[n, V]`` the teacher's logits at the same positions (same vocabulary
            ``V``: slice padding rows off before calling).
        targets: ``LongTensor [n]`` the reference tokens.

    Returns:
        ``{"kl_sum": float, "agree": int, "nll_sum": float, "n": int}`` where

        * ``kl_sum`` = sum_i KL(p_T,i || p_S,i) at temperature 1 (forward KL,
          Hinton et al. 2015 eq. 1 with T=1), via :func:`potstill.divergences.forward_kl`;
        * ``agree`` = #{i : argmax p_S,i == argmax p_T,i} (top-1 agreement count);
        * ``nll_sum`` = sum_i -log p_S,i(targets_i) (the student's NLL of the reference);
        * ``n`` = number of positions.

    Logits are promoted to at least float32 first (bf16 log-softmax sums drift).
    """
    rows = teacher_forced_rows(student_logits, teacher_logits, targets)
    return {
        "kl_sum": float(rows["kl"].sum()),
        "agree": int(rows["agree"].sum()),
        "nll_sum": float(rows["nll"].sum()),
        "n": int(targets.shape[0]),
    }


def teacher_forced_rows(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """The per-position terms that :func:`teacher_forced_stats` sums: ``{"kl", "agree", "nll"}``, each ``[n]``
    (forward KL at T = 1, top-1 agreement as 0/1, the student's NLL of the reference token)."""
    from ..divergences import forward_kl

    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; align the vocabularies first"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.to(device=s.device, dtype=dtype)
    if s.shape[0] == 0:
        empty = s.new_zeros(0)
        return {"kl": empty, "agree": empty.long(), "nll": empty}
    return {
        "kl": forward_kl(s, t, temperature=1.0),
        "agree": (s.argmax(dim=-1) == t.argmax(dim=-1)).long(),
        "nll": torch.nn.functional.cross_entropy(s, targets.to(s.device), reduction="none"),
    }


def perplexity(nll_sum: float, n: int) -> float:
    """``exp(nll_sum / n)``; ``nan`` when ``n == 0``, ``inf`` when the exponent overflows."""
    if n <= 0:
        return float("nan")
    try:
        return math.exp(nll_sum / n)
    except OverflowError:
        return float("inf")


_ROUGE = None


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004, LCS-based) of ``predictions[i]`` vs ``references[i]``.

    Uses ``rouge_score.RougeScorer(["rougeL"], use_stemmer=True)`` (its tokenizer lowercases
    and keeps ``[a-z0-9]`` runs). Empty lists give ``nan``.
    """
    global _ROUGE
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return float("nan")
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for pred, ref in zip(predictions, references):
        total += _ROUGE.score(ref, pred)["rougeL"].fmeasure  # score(target, prediction)
    return total / len(predictions)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016, *A Diversity-Promoting Objective Function for Neural Conversation
    Models*): distinct word n-grams over all n-grams in ``texts``, pooled across texts.

    Words are lowercased whitespace-separated tokens. In ``[0, 1]``; ``nan`` when the texts hold
    no n-gram. A collapsed model that answers every prompt the same scores near ``1 / len(texts)``.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.lower().split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i : i + n]))
            total += 1
    return len(seen) / total if total else float("nan")


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (e.g. embeddings = lm_head) count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def expected_calibration_error(probs_max, correct, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al. 2017, eq. 3).

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` with bins ``(k/n_bins, (k+1)/n_bins]``
    (a confidence of exactly 0 falls in the first bin); empty bins contribute nothing.

    Args:
        probs_max: ``[N]`` the confidence of each prediction (max probability), in ``[0, 1]``.
        correct: ``[N]`` bool/0-1: whether each prediction was right.
        n_bins: number of bins.

    Returns ``nan`` when ``N == 0``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = torch.as_tensor(probs_max, dtype=torch.float64).reshape(-1)
    acc = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    if conf.shape != acc.shape:
        raise ValueError(f"{conf.numel()} confidences but {acc.numel()} correctness values")
    n = conf.numel()
    if n == 0:
        return float("nan")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    # right=False: index k such that edges[k-1] < x <= edges[k], i.e. bins are (lo, hi].
    bins = torch.bucketize(conf.clamp(0.0, 1.0), edges, right=False)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, acc)
    # |B| * |acc - conf| = |acc_sum - conf_sum|, so empty bins give 0 without dividing.
    return float((acc_sum - conf_sum).abs().sum() / n)
