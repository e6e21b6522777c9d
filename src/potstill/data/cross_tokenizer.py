"""Cross-tokenizer alignment and batching: the teacher's view of a student example.

Teacher and student read the same text through different tokenizers. The teacher reads the text
the student's ids decode to (``student_tokenizer.decode(ids)``, special tokens kept as text; see
:class:`CrossTokenizerAligner`). Alignment is by character offsets: a character ``c`` is a
*boundary* of a tokenization when one of its ordinary tokens starts at ``c``. Where both
tokenizations have a boundary at ``c``, the student's position just before its token at ``c``
and the teacher's position just before its token at ``c`` have both read exactly ``text[:c]``
and both predict the text that begins at ``c``: their next-token distributions describe the
same event and can be compared. All other student rows are *unaligned* and get cross-entropy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import PotstillError
from ..models.vocab_map import special_ids
from ..signals import target_index
from .collate import PadCollator, pad_id


def token_starts(offsets: Sequence[tuple[int, int]], text: str, special: Sequence[int] | set[int] = ()) -> list[int]:
    """The character at which each token begins, or -1 where it does not begin a clean boundary.

    ``offsets`` are a fast tokenizer's ``(start, end)`` character spans of ``text``. Quirks handled:

    * zero-width tokens (BOS/EOS added by a post-processor) start nothing: -1;
    * the byte pieces of one character (byte-level BPE, byte fallback) report overlapping spans:
      a token starting before the end of the text already covered begins mid-character: -1;
    * offsets that exclude a token's leading space (``trim_offsets``): uncovered whitespace
      before a token belongs to it (byte-level and SentencePiece tokens carry their space in
      front), so the token starts where the covered text ends; an uncovered gap with other
      characters (text dropped by a normalizer) makes the boundary unclean: -1;
    * indices in ``special`` (control tokens such as ``<|im_end|>``) are never boundaries: their
      next-token distributions have no counterpart across tokenizers.
    """
    special = set(special)
    covered = 0
    out: list[int] = []
    for k, (s, e) in enumerate(offsets):
        s, e = int(s), int(e)
        if e <= s:
            out.append(-1)
            continue
        if s < covered:
            start = -1
        elif s == covered or text[covered:s].isspace():
            start = covered
        else:
            start = -1
        out.append(-1 if k in special else start)
        covered = max(covered, e)
    return out


def _align_starts(student_starts: Sequence[int], teacher_starts: Sequence[int]) -> list[tuple[int, int]]:
    at = {c: j for j, c in enumerate(teacher_starts) if c >= 0}
    pairs = []
    for k, c in enumerate(student_starts):
        j = at.get(c, -1) if c >= 0 else -1
        if k >= 1 and j >= 1:
            pairs.append((k - 1, j - 1))
    return pairs


def align_positions(
    student_offsets: Sequence[tuple[int, int]],
    teacher_offsets: Sequence[tuple[int, int]],
    text: str,
    *,
    student_special: Sequence[int] | set[int] = (),
    teacher_special: Sequence[int] | set[int] = (),
) -> list[tuple[int, int]]:
    """``(student_pos, teacher_pos)`` pairs of predicting positions that predict the same text.

    For every character ``c`` where both tokenizations have a token starting cleanly (see
    :func:`token_starts`), the pair is (index of the student token before it, index of the teacher
    token before it): both positions have read exactly ``text[:c]``. Restrictions: the tokens at
    ``c`` are ordinary (not in ``*_special``) on both sides, and a predicting position exists on
    both sides (a boundary at a sequence's first token has none). Pairs are increasing in both.
    """
    return _align_starts(
        token_starts(student_offsets, text, student_special), token_starts(teacher_offsets, text, teacher_special)
    )


def _decode_starts(tokenizer, ids: list[int], text: str, special: set[int]) -> list[int]:
    """Token starts from prefix decoding, for ids that re-tokenizing ``text`` does not reproduce
    (a non-canonical split, a cut inside a character). O(len(ids)^2) characters, in Rust."""
    prefixes = tokenizer.batch_decode(
        [ids[:k] for k in range(len(ids) + 1)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    out = []
    for k in range(len(ids)):
        a, b = prefixes[k], prefixes[k + 1]
        clean = (
            text.startswith(a)
            and text.startswith(b)
            and len(b) > len(a)
            and not a.endswith("\ufffd")
            and k not in special
        )
        out.append(len(a) if clean else -1)
    return out


class CrossTokenizerAligner:
    """Builds the teacher's view of a student example.

    The text is ``student_tokenizer.decode(input_ids)`` with special tokens kept as text and no
    clean-up: the exact string the student's ids spell, prompt markup included. Decoding rather
    than re-rendering a chat template keeps the existing data pipeline (examples are stored as
    student ids) and suits base-model teachers without a template of their own (Gemma-3 270M);
    an instruct teacher reads the student's chat markup as plain text. The teacher tokenizes the
    text with its own special tokens (BOS). Student character offsets come from re-tokenizing the
    text; when that does not reproduce ``input_ids``, from prefix decoding.

    ``aligner(input_ids, labels) -> {"text", "teacher_input_ids", "teacher_positions"}`` where
    ``teacher_positions[t]`` (length ``len(input_ids)``) is the teacher position that predicts the
    same text as student position ``t``, for *target* positions only (``labels[t + 1] != -100``),
    else -1. Control tokens on either side are never boundaries, so the rows predicting e.g. the
    student's ``<|im_end|>`` stay unaligned (CE only).
    """

    def __init__(self, student_tokenizer, teacher_tokenizer, *, max_teacher_length: int | None = None):
        self.student = student_tokenizer
        self.teacher = teacher_tokenizer
        self.max_teacher_length = max_teacher_length
        self.student_special = special_ids(student_tokenizer)
        self.teacher_special = special_ids(teacher_tokenizer)
        self.reproduced = 0
        self.fallbacks = 0

    def __call__(self, input_ids: Sequence[int], labels: Sequence[int]) -> dict[str, Any]:
        ids = [int(i) for i in input_ids]
        labels = [int(y) for y in labels]
        if len(labels) != len(ids):
            raise PotstillError(f"an example has {len(ids)} input_ids but {len(labels)} labels; encode it again")
        text = self.student.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        enc = self.student(text, add_special_tokens=False, return_offsets_mapping=True)
        s_special = {k for k, i in enumerate(ids) if i in self.student_special}
        if list(enc["input_ids"]) == ids:
            self.reproduced += 1
            s_starts = token_starts(enc["offset_mapping"], text, s_special)
        else:
            self.fallbacks += 1
            s_starts = _decode_starts(self.student, ids, text, s_special)
        t = self.teacher(text, add_special_tokens=True, return_offsets_mapping=True)
        t_ids = list(t["input_ids"])
        t_special = {k for k, i in enumerate(t_ids) if i in self.teacher_special}
        t_starts = token_starts(t["offset_mapping"], text, t_special)
        if self.max_teacher_length is not None:
            t_ids = t_ids[: self.max_teacher_length]
            t_starts = t_starts[: len(t_ids)]
        positions = [-1] * len(ids)
        for s, j in _align_starts(s_starts, t_starts):
            if labels[s + 1] != -100:
                positions[s] = j
        return {"text": text, "teacher_input_ids": t_ids, "teacher_positions": positions}


def teacher_view(input_ids, labels, student_tokenizer, teacher_tokenizer, **kw) -> dict[str, Any]:
    """One example's teacher view; see :class:`CrossTokenizerAligner` (build one to reuse it)."""
    return CrossTokenizerAligner(student_tokenizer, teacher_tokenizer, **kw)(input_ids, labels)


def target_alignment(labels: Tensor, teacher_positions: Tensor, teacher_length: int) -> Tensor:
    """Teacher row of every student target row, ``LongTensor [n]``, or -1 where unaligned.

    Row ``i`` is the ``i``-th row of :func:`~potstill.signals.target_index` (``labels [B, T]``);
    the value indexes the flattened teacher grid ``[B * teacher_length]``.
    """
    if teacher_positions.shape != labels.shape:
        raise PotstillError(
            f"teacher_positions {tuple(teacher_positions.shape)} does not match labels "
            f"{tuple(labels.shape)}; pad both with CrossTokenizerCollator"
        )
    index = target_index(labels)
    pos = teacher_positions[:, :-1].reshape(-1).index_select(0, index)
    example = index // max(labels.shape[1] - 1, 1)
    return torch.where(pos >= 0, example * teacher_length + pos, torch.full_like(pos, -1))


class CrossTokenizerCollator:
    """Pads student columns (as :class:`~potstill.data.PadCollator`) and the teacher's view.

    Adds ``teacher_input_ids`` and ``teacher_attention_mask`` ``[B, T_t]`` (right padding with the
    teacher's pad id) and ``teacher_positions [B, T]`` (-1 padding). Examples that already carry
    ``teacher_input_ids`` and ``teacher_positions`` (a ``dataset.map`` of the aligner) are only padded.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer,
        *,
        pad_token_id: int | None = None,
        teacher_pad_token_id: int | None = None,
        max_teacher_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        pad = pad_token_id if pad_token_id is not None else pad_id(student_tokenizer)
        self.pad = PadCollator(pad, pad_to_multiple_of)
        self.teacher_pad = teacher_pad_token_id if teacher_pad_token_id is not None else pad_id(teacher_tokenizer)
        self.aligner = CrossTokenizerAligner(
            student_tokenizer, teacher_tokenizer, max_teacher_length=max_teacher_length
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        views = [
            f if ("teacher_input_ids" in f and "teacher_positions" in f) else self.aligner(f["input_ids"], f["labels"])
            for f in features
        ]
        out = self.pad(features)
        b, t = out["input_ids"].shape
        t_len = max(len(v["teacher_input_ids"]) for v in views)
        ids = torch.full((b, t_len), self.teacher_pad, dtype=torch.long)
        mask = torch.zeros((b, t_len), dtype=torch.long)
        pos = torch.full((b, t), -1, dtype=torch.long)
        for i, v in enumerate(views):
            k = len(v["teacher_input_ids"])
            ids[i, :k] = torch.as_tensor(v["teacher_input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            p = torch.as_tensor(v["teacher_positions"], dtype=torch.long)
            pos[i, : p.numel()] = p
        out.update(teacher_input_ids=ids, teacher_attention_mask=mask, teacher_positions=pos)
        return out


__all__ = [
    "CrossTokenizerAligner",
    "CrossTokenizerCollator",
    "align_positions",
    "target_alignment",
    "teacher_view",
    "token_starts",
]
