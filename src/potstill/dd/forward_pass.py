"""Forward passes of models over encoded examples, shared by the data scorers of :mod:`potstill.dd`.

Encoded examples carry ``input_ids`` and ``labels`` (``-100`` on prompt tokens); a *target
row* is a position whose next label is a response token (:func:`potstill.signals.target_index`).
Here: the example check, eval mode for a pass, the model's device and pad id, length-sorted
batches, the owner and label of each target row, a model's own :class:`~potstill.signals.DenseSignal`
of its target rows, and the entropy of log-probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import PotstillError
from ..models.head import eval_mode  # noqa: F401  (re-exported: the scorers' import site)

__all__ = [
    "IGNORE_INDEX",
    "batches",
    "check_examples",
    "device_of",
    "entropy",
    "eval_mode",
    "model_signal",
    "pad_id",
    "row_owner",
    "row_targets",
]

IGNORE_INDEX = -100


def check_examples(examples: Sequence[dict], what: str = "examples") -> None:
    if examples is None or len(examples) == 0:
        raise PotstillError(f"no {what} to score (empty dataset); check the data section of the recipe")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex or "labels" not in ex:
            raise PotstillError(
                f"{what} #{i} has no input_ids/labels; encode examples with potstill.data.encode_example"
            )
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise PotstillError(f"{what} #{i}: input_ids and labels differ in length; re-encode it")
        if not any(int(t) != IGNORE_INDEX for t in list(ex["labels"])[1:]):
            raise PotstillError(
                f"{what} #{i} has no response token (every label is -100); drop it before scoring "
                "(e.g. a prompt that fills max_length)"
            )


def device_of(model: torch.nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def pad_id(model: torch.nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    from ..models.head import text_config

    p = getattr(text_config(model), "pad_token_id", None)
    return int(p) if p is not None else 0  # right padding under an attention mask: any id works


def batches(examples: Sequence[dict], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``examples`` in batches of similar length (longest first, so memory fails early)."""
    if batch_size < 1:
        raise PotstillError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    for b in range(0, len(order), batch_size):
        yield order[b : b + batch_size]


def row_owner(labels: Tensor) -> Tensor:
    """For each row of :func:`target_index` (row-major), the batch row it belongs to: ``[n]``."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]


def row_targets(labels: Tensor) -> Tensor:
    """The label each target row predicts: ``[n]``."""
    lab = labels[:, 1:]
    return lab[lab != IGNORE_INDEX]


def model_signal(model: torch.nn.Module, batch: dict[str, Tensor]):
    """``DenseSignal(hidden=[n, H], head)`` of a model's own target rows (no ``[n, V]`` yet)."""
    from ..models import final_hidden, output_head
    from ..signals import DenseSignal, target_index, target_rows

    device = device_of(model)
    hidden = final_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    rows = target_rows(hidden, target_index(batch["labels"].to(device)))
    return DenseSignal(hidden=rows, head=output_head(model))


def entropy(lp: Tensor) -> Tensor:
    """``-sum p log p`` over the last dim from log-probs (``0 log 0 = 0``)."""
    p = lp.exp()
    return -(p * torch.where(torch.isneginf(lp), torch.zeros_like(lp), lp)).sum(-1)
