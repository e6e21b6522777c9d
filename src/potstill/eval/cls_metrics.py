"""Classification metrics: accuracy, F1 of class 1, macro F1 and calibration (ECE, Brier score, credible-interval
coverage) from class probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .metrics import expected_calibration_error

__all__ = [
    "ECE_BINS",
    "binned_coverage",
    "brier_score",
    "classification_metrics",
    "example_scores",
    "interval_coverage",
]

ECE_BINS = 15
"""Equal-width confidence bins of every ECE and interval coverage here (Guo et al. 2017 use 15)."""


def _f1(pred: Tensor, gold: Tensor, cls: int) -> float:
    tp = int(((pred == cls) & (gold == cls)).sum())
    fp = int(((pred == cls) & (gold != cls)).sum())
    fn = int(((pred != cls) & (gold == cls)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def brier_score(probs: Tensor, labels: Sequence[int] | Tensor) -> float:
    """Multi-class Brier score (Brier 1950): ``mean_i sum_c (p_ic - 1[y_i = c])^2``, in ``[0, 2]``.

    ``probs [N, C]``, ``labels [N]``; computed in float64; ``N = 0`` gives nan. (For ``C = 2`` this is twice
    the binary Brier score ``mean_i (p_i1 - y_i)^2``.)"""
    p = torch.as_tensor(probs, dtype=torch.float64)
    gold = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if gold.numel() == 0:
        return float("nan")
    onehot = torch.nn.functional.one_hot(gold, p.shape[-1]).to(torch.float64)
    return float((p - onehot).pow(2).sum(-1).mean())


def _bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Bin ``k`` of each confidence, bins ``(k/n_bins, (k+1)/n_bins]`` as in :func:`expected_calibration_error`."""
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    return torch.bucketize(conf.clamp(0.0, 1.0), edges, right=False)


def interval_coverage(
    mean: Tensor, lower: Tensor, upper: Tensor, labels: Sequence[int] | Tensor, n_bins: int = ECE_BINS
) -> dict:
    """Coverage of per-example credible intervals by the empirical accuracy of the example's confidence bin.

    A real data set has no true class probability to cover, so the target is the frequency calibration
    measures: each example is predicted ``c_i = argmax_c mean[i]`` with confidence ``mean[i, c_i]``; examples are
    put in the ``n_bins`` equal-width confidence bins of :func:`expected_calibration_error`; bin ``b``'s empirical
    accuracy ``acc_b`` is the share of its examples predicted right. Example ``i`` is *covered* iff
    ``lower[i, c_i] <= acc_{b(i)} <= upper[i, c_i]``. A point estimate (``lower = upper = mean``) covers only where
    its confidence equals its bin's accuracy exactly, so its coverage is near 0.

    ``mean, lower, upper [N, C]`` (predictive mean and interval ends of each class probability), ``labels [N]``.
    Returns ``{"coverage": share of covered examples, "mean_width": mean of upper - lower at c_i}``; nan when N = 0.
    """
    m = torch.as_tensor(mean, dtype=torch.float64)
    gold = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if gold.numel() == 0:
        return {"coverage": float("nan"), "mean_width": float("nan")}
    conf, pred = m.max(-1)
    lo = torch.as_tensor(lower, dtype=torch.float64).gather(-1, pred[:, None])[:, 0]
    hi = torch.as_tensor(upper, dtype=torch.float64).gather(-1, pred[:, None])[:, 0]
    return binned_coverage(conf, pred == gold, lo, hi, n_bins)


def binned_coverage(conf: Tensor, correct: Tensor, lower: Tensor, upper: Tensor, n_bins: int = ECE_BINS) -> dict:
    """:func:`interval_coverage` from per-example values at the predicted class: confidence ``conf [N]``,
    ``correct [N]`` (prediction right) and the interval ``lower, upper [N]`` of that class's probability (a
    vocabulary-sized prediction need not keep the other classes)."""
    conf = torch.as_tensor(conf, dtype=torch.float64).reshape(-1)
    n = conf.numel()
    if n == 0:
        return {"coverage": float("nan"), "mean_width": float("nan")}
    lo = torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
    hi = torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
    bins = _bin_index(conf, n_bins)
    right = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(right))
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, right) / count.clamp_min(1.0)
    target = acc[bins]
    covered = (lo <= target) & (target <= hi)
    return {"coverage": float(covered.to(torch.float64).mean()), "mean_width": float((hi - lo).mean())}


def classification_metrics(probs: Tensor, labels: Sequence[int] | Tensor) -> dict:
    """``{accuracy, f1 (class 1 positive), macro_f1 (over all C classes), ece (15 bins), brier, n}`` from
    ``probs [N, C]`` and gold ``labels [N]``. F1 with no true positive is 0; ``N = 0`` gives nan."""
    gold = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = gold.numel()
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "f1": nan, "macro_f1": nan, "ece": nan, "brier": nan, "n": 0}
    conf, pred = probs.max(-1)
    correct = pred == gold
    return {
        "accuracy": float(correct.double().mean()),
        "f1": _f1(pred, gold, 1),
        "macro_f1": sum(_f1(pred, gold, c) for c in range(probs.shape[-1])) / probs.shape[-1],
        "ece": expected_calibration_error(conf, correct, n_bins=ECE_BINS),
        "brier": brier_score(probs, gold),
        "n": n,
    }


EXAMPLE_METRICS = {"accuracy": False, "nll": True}
"""The per-example scores of :func:`example_scores` and whether lower is better (for
:func:`potstill.eval.verdict.compare_arms`)."""


def example_scores(probs: Tensor, labels: Sequence[int] | Tensor) -> dict[str, list[float]]:
    """Per held-out example, the scores whose means are the set's: ``accuracy`` (1 where the most probable
    class is the gold one, else 0; its mean is :func:`classification_metrics`' accuracy) and ``nll`` (the
    negative log-probability of the gold class, floored at float32's smallest normal). Paired across arms
    and seeds, they are what a verdict with an interval over examples needs (:mod:`potstill.eval.verdict`)."""
    gold = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    p = probs.double()
    correct = (p.argmax(-1) == gold).double()
    nll = -p.gather(-1, gold[:, None]).squeeze(-1).clamp_min(torch.finfo(torch.float32).tiny).log()
    return {"accuracy": correct.tolist(), "nll": nll.tolist()}
