"""Classification metrics: accuracy, F1 of class 1, macro F1 and calibration (ECE) from class probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .metrics import expected_calibration_error

__all__ = ["classification_metrics"]


def _f1(pred: Tensor, gold: Tensor, cls: int) -> float:
    tp = int(((pred == cls) & (gold == cls)).sum())
    fp = int(((pred == cls) & (gold != cls)).sum())
    fn = int(((pred != cls) & (gold == cls)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def classification_metrics(probs: Tensor, labels: Sequence[int] | Tensor) -> dict:
    """``{accuracy, f1 (class 1 positive), macro_f1 (over all C classes), ece, n}`` from
    ``probs [N, C]`` and gold ``labels [N]``. F1 with no true positive is 0; ``N = 0`` gives nan."""
    gold = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = gold.numel()
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "f1": nan, "macro_f1": nan, "ece": nan, "n": 0}
    conf, pred = probs.max(-1)
    correct = pred == gold
    return {
        "accuracy": float(correct.double().mean()),
        "f1": _f1(pred, gold, 1),
        "macro_f1": sum(_f1(pred, gold, c) for c in range(probs.shape[-1])) / probs.shape[-1],
        "ece": expected_calibration_error(conf, correct),
        "n": n,
    }
