"""A teacher with another tokenizer as a signal source: its distribution projected onto the student's vocabulary.

This is how teachers with different tokenizers join a :class:`~potstill.signals.MultiTeacher`
(issue 5: "teachers with different tokenizers combine through" cross-tokenizer KD). Per batch:

1. each example's student ids are decoded and read by the teacher through its own tokenizer
   (:class:`~potstill.data.cross_tokenizer.CrossTokenizerAligner`: character-offset alignment; a
   student target row is *aligned* when both tokenizations have a token boundary at the character
   the row predicts);
2. the teacher runs once without grad; on aligned rows its head gives ``log softmax(z / T)``
   over its own vocabulary, chunk by chunk, projected onto student ids with the vocabulary map
   (:func:`~potstill.models.vocab_map.project_teacher`: exact, normalized and MinED-style mined
   matches; the result is the teacher's distribution conditioned on a mappable next token);
3. the signal is a :class:`MaskedDenseSignal`: ``[n, V_s]`` logits ``T * log p_S`` for the
   batch's target rows (so that ``softmax(logits / T) = p_S``) and ``valid [n]``, true where the
   row is aligned and some teacher mass was mapped. Rows that are not valid carry no information
   from this teacher; :class:`~potstill.signals.MultiTeacher` gives them weight 0.

The source is *partial* (it does not cover every row) so it only serves inside a MultiTeacher
next to at least one teacher that shares the student's tokenizer; alone, use
:class:`~potstill.kd.cross_tokenizer.CrossTokenizerKDTrainer`, which trains unaligned rows with CE.
``coverage()`` reports the share of target rows it covered and the mapped teacher mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ..errors import PotstillError
from .online import target_index
from .types import DenseSignal


@dataclass
class MaskedDenseSignal(DenseSignal):
    """A :class:`DenseSignal` whose rows are informative only where ``valid [N]`` (bool) is true."""

    valid: Tensor | None = None

    def rows(self, index: Tensor) -> MaskedDenseSignal:
        # Built from logits only (module docstring, step 3).
        logits = cast(Tensor, self.logits)
        return MaskedDenseSignal(logits=logits[index], valid=None if self.valid is None else self.valid[index])


class CrossTokenizerTeacher:
    """A live teacher with its own tokenizer, seen through the student's vocabulary (module docstring)."""

    partial = True  # covers aligned rows only; MultiTeacher needs a full-coverage teacher beside it

    def __init__(
        self,
        model: torch.nn.Module,
        teacher_tokenizer,
        student_tokenizer,
        *,
        student_vocab: int,
        vocab_map=None,
        kinds: Sequence[str] | None = None,
        temperature: float = 1.0,
        max_teacher_length: int | None = None,
        chunk_size: int = 256,
    ):
        from ..data.collate import pad_id
        from ..data.cross_tokenizer import CrossTokenizerAligner
        from ..models.vocab_map import DEFAULT_KINDS, build_vocab_map

        if not temperature > 0:
            raise PotstillError(f"temperature={temperature} must be > 0")
        self.kinds = tuple(kinds or DEFAULT_KINDS)
        bad = [k for k in self.kinds if k not in DEFAULT_KINDS]
        if bad:
            raise PotstillError(f"kinds {bad} are not vocab-map match kinds; use a subset of {list(DEFAULT_KINDS)}")
        self.model = model
        self.vocab_size = int(student_vocab)
        self.vocab_map = vocab_map or build_vocab_map(teacher_tokenizer, student_tokenizer, student_vocab=student_vocab)
        self.aligner = CrossTokenizerAligner(
            student_tokenizer, teacher_tokenizer, max_teacher_length=max_teacher_length
        )
        self.teacher_pad = pad_id(teacher_tokenizer)
        self.temperature = None  # no temperature of its own: MultiTeacher passes its T to signal()
        self._T = float(temperature)
        self.chunk_size = int(chunk_size)
        self._cov = {"rows": 0.0, "aligned": 0.0, "valid": 0.0, "mass": 0.0}
        self.forward_tokens = 0  # teacher-side tokens read (in its own tokenization)

    def to(self, device) -> CrossTokenizerTeacher:
        self.model.to(device)
        return self

    def _views(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher ids / mask ``[B, T_t]`` and teacher positions ``[B, T]`` for the batch's examples."""
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        views = []
        for i in range(ids.shape[0]):
            # right padding (PadCollator): the example is its first attention_mask.sum() tokens
            k = int(mask[i].sum()) if mask is not None else ids.shape[1]
            views.append(self.aligner(ids[i, :k].tolist(), labels[i, :k].tolist()))
        t_len = max(1, max(len(v["teacher_input_ids"]) for v in views))
        t_ids = torch.full((len(views), t_len), self.teacher_pad, dtype=torch.long)
        t_mask = torch.zeros((len(views), t_len), dtype=torch.long)
        pos = torch.full(tuple(ids.shape), -1, dtype=torch.long)
        for i, v in enumerate(views):
            n = len(v["teacher_input_ids"])
            t_ids[i, :n] = torch.as_tensor(v["teacher_input_ids"], dtype=torch.long)
            t_mask[i, :n] = 1
            pos[i, : len(v["teacher_positions"])] = torch.as_tensor(v["teacher_positions"], dtype=torch.long)
        dev = ids.device
        return t_ids.to(dev), t_mask.to(dev), pos.to(dev)

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor], temperature: float | None = None) -> MaskedDenseSignal:
        from ..data.cross_tokenizer import target_alignment
        from ..models import final_hidden, output_head
        from ..models.vocab_map import project_teacher

        T = float(temperature) if temperature is not None else self._T
        labels = batch["labels"]
        n = int(target_index(labels).numel())
        out = torch.zeros(n, self.vocab_size, dtype=torch.float32, device=labels.device)
        valid = torch.zeros(n, dtype=torch.bool, device=labels.device)
        self._cov["rows"] += n
        if n == 0:
            return MaskedDenseSignal(logits=out, valid=valid)
        t_ids, t_mask, pos = self._views(batch)
        self.forward_tokens += int(t_mask.sum())
        row_map = target_alignment(labels, pos, t_ids.shape[1])
        aligned = (row_map >= 0).nonzero().squeeze(1)
        if aligned.numel() == 0:
            return MaskedDenseSignal(logits=out, valid=valid)
        if self.model.training:
            self.model.eval()
        self._cov["aligned"] += aligned.numel()
        hidden = final_hidden(self.model, t_ids, t_mask)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, row_map.index_select(0, aligned))
        head = output_head(self.model)
        for start in range(0, aligned.numel(), self.chunk_size):
            sl = slice(start, min(start + self.chunk_size, aligned.numel()))
            lp = torch.log_softmax(head(rows[sl]).float() / T, dim=-1)
            projected, mass = project_teacher(lp, self.vocab_map, self.vocab_size, self.kinds)
            idx = aligned[sl]
            out.index_copy_(0, idx, projected.float() * T)
            valid.index_copy_(0, idx, mass > 0)
            self._cov["mass"] += float(mass.sum())
        self._cov["valid"] += float(valid.sum())
        return MaskedDenseSignal(logits=out, valid=valid)

    def coverage(self) -> dict[str, float]:
        """Shares of target rows aligned and informed (aligned, mass mapped) by this teacher, and its
        mean mapped mass per aligned row (at the distillation temperature)."""
        c = self._cov
        rows = max(c["rows"], 1.0)
        return {
            "aligned_row_share": c["aligned"] / rows,
            "valid_row_share": c["valid"] / rows,
            "teacher_mass_used": c["mass"] / max(c["aligned"], 1.0),
        }


__all__ = ["CrossTokenizerTeacher", "MaskedDenseSignal"]
