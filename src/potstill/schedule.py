"""The training schedule shared by the small classifier trainers (:func:`potstill.kd.classifier.train_classifier`,
:func:`potstill.dd.protocol.train_top`): which rows each step sees and how the learning rate moves.

* :func:`warmup_adamw`: AdamW, weight decay on matrices only, linear warmup then linear decay to 0;
* :func:`reshuffled_batches`: fixed-size batches taken in order from seeded reshuffles of the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["reshuffled_batches", "warmup_adamw"]


def warmup_adamw(
    params: Iterable[Tensor],
    lr: float,
    weight_decay: float,
    steps: int,
    warmup_fraction: float,
    schedule: str = "linear",
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)``: AdamW with ``weight_decay`` on matrices (``ndim >= 2``) only, warmed up over
    ``warm = max(1, int(steps * warmup_fraction))`` steps (none when ``warmup_fraction`` is 0).

    ``schedule="linear"``: the learning rate rises as ``lr * (k + 1) / warm``, then falls linearly to 0 at
    ``steps``. ``"cosine"``: transformers' ``get_cosine_schedule_with_warmup`` over the same ``warm`` steps
    (linear warmup from 0, so the first step has lr 0, then half a cosine down to 0 at ``steps``)."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    warm = max(1, int(steps * warmup_fraction)) if warmup_fraction > 0 else 0
    if schedule == "cosine":
        from transformers import get_cosine_schedule_with_warmup

        return opt, get_cosine_schedule_with_warmup(opt, num_warmup_steps=warm, num_training_steps=steps)
    if schedule != "linear":
        raise ValueError(f"schedule={schedule!r} is not linear or cosine")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (steps - k) / max(1, steps - warm))
    )
    return opt, sched


def reshuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of ``batch_size`` indices of ``0..n-1``, taken in order from seeded reshuffles: a new
    ``randperm`` (of its own generator, seeded once with ``seed``) whenever fewer than ``batch_size`` are left,
    so a batch may straddle two reshuffles. The global RNG is not touched."""
    gen = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while True:
        while len(stream) < batch_size:
            stream += torch.randperm(n, generator=gen).tolist()
        yield stream[:batch_size]
        stream = stream[batch_size:]
