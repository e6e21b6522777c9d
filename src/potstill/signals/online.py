"""The online teacher: a live model, frozen, in eval mode, run without gradients."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .types import DenseSignal, Signal


def target_index(labels: Tensor) -> Tensor:
    """Flat indices of the positions that predict a label.

    Position ``t`` of a causal LM predicts ``labels[:, t + 1]``; the rows of every signal
    are the flattened ``[B, T-1]`` grid restricted to ``labels[:, 1:] != -100``, in
    row-major order. Returns ``LongTensor [n]``.
    """
    return (labels[:, 1:] != -100).reshape(-1).nonzero().squeeze(1)


def target_rows(hidden: Tensor, index: Tensor) -> Tensor:
    """``hidden [B, T, H]`` -> ``[n, H]``: the rows of :func:`target_index`."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)


class SignalSource(Protocol):
    """Anything that tells what the teacher says about a batch: a live model or a cache."""

    def signal(self, batch: dict[str, Tensor]) -> Signal:
        """The teacher's signal for the rows of :func:`target_index` of ``batch["labels"]``."""
        ...


class OnlineTeacher:
    """A live teacher model behind :class:`SignalSource`.

    The teacher body runs once per batch without gradients; its output head is *not*
    applied here: the signal carries final hidden states and the head, and the chunked
    reducer projects them chunk by chunk, so ``[n, V]`` teacher logits never exist whole.
    """

    def __init__(self, model: torch.nn.Module):
        from ..models import output_head

        self.model = model.eval()
        self.model.requires_grad_(False)
        self.head = output_head(self.model)

    def to(self, device) -> "OnlineTeacher":
        self.model.to(device)
        from ..models import output_head

        self.head = output_head(self.model)
        return self

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor]) -> DenseSignal:
        from ..models import final_hidden

        if self.model.training:  # someone called .train() on the shared module
            self.model.eval()
        hidden = final_hidden(self.model, batch["input_ids"], batch["attention_mask"])
        index = target_index(batch["labels"])
        return DenseSignal(hidden=target_rows(hidden, index), head=self.head)
