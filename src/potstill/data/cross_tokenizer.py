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
from os.path import commonprefix
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


def char_starts(tokenizer, ids: Sequence[int], special: set[int]) -> tuple[str, list[int], bool]:
    """``(text, starts, reproduced)`` of token ids: the text they decode to (special tokens kept, no
    clean-up), the character each token begins at cleanly or -1 (:func:`token_starts`; tokens whose id is
    in ``special`` never begin one), and whether re-tokenizing the text reproduced the ids (else the
    starts come from prefix decoding)."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    at_special = {k for k, i in enumerate(ids) if i in special}
    if list(enc["input_ids"]) == ids:
        return text, token_starts(enc["offset_mapping"], text, at_special), True
    return text, _decode_starts(tokenizer, ids, text, at_special), False


def _response_starts(tokenizer, ids: Sequence[int], labels: Sequence[int], special: set[int]):
    """``(response text, {character in the response: target row})`` of one encoded example: the text from
    its first target token on, and the rows (counted over the example's target tokens) whose token begins
    cleanly at a character of it."""
    text, starts, _ = char_starts(tokenizer, ids, special)
    targets = [k for k in range(1, len(ids)) if int(labels[k]) != -100]
    if not targets:
        return "", {}
    first = targets[0]
    r = starts[first]
    if r < 0:  # the first response token shares a character with the prompt: start where the prompt's text ends
        head = tokenizer.decode(list(ids[:first]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        r = len(head) if text.startswith(head) else -1
    if r < 0:
        return "", {}
    at = {starts[k] - r: row for row, k in enumerate(targets) if starts[k] >= r}
    return text[r:], at


def response_alignment(
    student_tokenizer,
    student_ids: Sequence[int],
    student_labels: Sequence[int],
    teacher_tokenizer,
    teacher_ids: Sequence[int],
    teacher_labels: Sequence[int],
    *,
    student_special: set[int] | None = None,
    teacher_special: set[int] | None = None,
) -> list[int]:
    """For each target row of a student example, the target row of the *same example encoded by the
    teacher's tokenizer* that predicts the same response text, or -1.

    Unlike :class:`CrossTokenizerAligner` (the teacher reads the student's text, prompt markup included),
    each side has read the prompt in its own rendering (its own chat template), so the two are aligned
    on the response only: a student row and a teacher row are paired when the tokens they predict begin
    at the same character ``c`` of the response and the two responses agree on their first ``c``
    characters (truncation and the end-of-turn markup may differ after that). Both have then read the
    prompt and the same ``response[:c]``, so the teacher's distribution at its row is a target for the
    student's, whatever either copy holds from ``c`` on. This is how a teacher-signal cache written in the teacher's own
    tokens serves a student of another family (:class:`potstill.signals.cache.cross.CrossTokenizerCache`).
    """
    s_special = special_ids(student_tokenizer) if student_special is None else student_special
    t_special = special_ids(teacher_tokenizer) if teacher_special is None else teacher_special
    s_text, s_at = _response_starts(student_tokenizer, student_ids, student_labels, s_special)
    t_text, t_at = _response_starts(teacher_tokenizer, teacher_ids, teacher_labels, t_special)
    n = sum(1 for k in range(1, len(student_ids)) if int(student_labels[k]) != -100)
    out = [-1] * n
    common = len(commonprefix([s_text, t_text]))
    for c, row in s_at.items():
        if c <= common and c in t_at:
            out[row] = t_at[c]
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
        text, s_starts, reproduced = char_starts(self.student, ids, self.student_special)
        self.reproduced += int(reproduced)
        self.fallbacks += int(not reproduced)
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
    "char_starts",
    "response_alignment",
    "target_alignment",
    "teacher_view",
    "token_starts",
]
