"""The online teacher: a live model, frozen, in eval mode, run without gradients."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..distributed import global_rows
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

    ``out_device``: a teacher placed on its own (another device, or spread by a device map,
    :mod:`potstill.models.placement`) gets each batch on its input device, and its hidden rows come
    back to ``out_device`` (the student's), where a copy of its output head is kept for the reducer.
    """

    def __init__(self, model: torch.nn.Module, memo: TeacherMemo | None = None, out_device=None):
        from ..models import output_head

        self.model = model.eval()
        self.model.requires_grad_(False)
        self.out_device = None if out_device is None else torch.device(out_device)
        if self.out_device is not None:
            from ..models.placement import head_on

            self.head = head_on(self.model, self.out_device)
        else:
            self.head = output_head(self.model)
        self.memo = memo
        # tokens this teacher was asked to read (memo hits included: the cost of the run on its own), for
        # compare's cost table; the trainer reads the difference over a run
        self.forward_tokens = 0

    @property
    def vocab_size(self) -> int:
        """Rows of the teacher's output head (the trainer aligns the student's vocabulary to it)."""
        return global_rows(self.head.weight)

    def to(self, device) -> OnlineTeacher:
        if self.out_device is not None:  # placed on its own: it stays there
            return self
        self.model.to(device)
        from ..models import output_head

        self.head = output_head(self.model)
        return self

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor]) -> DenseSignal:
        from ..data.packing import forward_kwargs
        from ..models import final_hidden

        self.forward_tokens += int(batch["attention_mask"].sum())
        key = None
        if self.memo is not None:
            key = self.memo.key(batch)
            rows = self.memo.get(key, batch["labels"].device)
            if rows is not None:
                return DenseSignal(hidden=rows, head=self.head)
        if self.model.training:  # someone called .train() on the shared module
            self.model.eval()
        if self.out_device is not None:  # its inputs on its own (input) device, its rows back to the student's
            from ..models.placement import input_device

            dev = input_device(self.model)
            batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        hidden = final_hidden(self.model, batch["input_ids"], batch["attention_mask"], **forward_kwargs(batch))
        rows = target_rows(hidden, target_index(batch["labels"]).to(hidden.device))
        if self.out_device is not None:
            rows = rows.to(self.out_device)
        if self.memo is not None:
            assert key is not None  # computed above whenever there is a memo
            self.memo.put(key, rows)
        return DenseSignal(hidden=rows, head=self.head)


def teacher_tokens(source) -> int:
    """Tokens a signal source's live teachers have read so far (0 for a cache, which read them when it was built)."""
    return int(getattr(source, "forward_tokens", 0) or 0)


class TeacherMemo:
    """The teacher's final hidden states of the target rows, kept in memory by batch content.

    Several students trained on the same batches (the runs of one recipe) then pay the
    teacher's forward once: the head is still applied chunk by chunk, so the signal is
    exactly the online one. Entries are keyed by a hash of the batch tensors and stored
    on the CPU; past ``max_bytes`` new batches are simply not memoized.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._rows: dict[str, Tensor] = {}

    @staticmethod
    def key(batch: dict[str, Tensor]) -> str:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for name in ("input_ids", "attention_mask", "labels", "position_ids"):
            if batch.get(name) is None:  # position_ids: packed batches only
                continue
            h.update(name.encode())
            t = batch[name].detach().to("cpu", torch.long).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def get(self, key: str, device) -> Tensor | None:
        rows = self._rows.get(key)
        if rows is None:
            return None
        self.hits += 1
        return rows.to(device)

    def put(self, key: str, rows: Tensor) -> None:
        size = rows.numel() * rows.element_size()
        if key in self._rows or self.bytes + size > self.max_bytes:
            return
        self._rows[key] = rows.detach().to("cpu", copy=True)
        self.bytes += size
