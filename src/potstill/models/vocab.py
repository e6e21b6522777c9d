"""Teacher/student vocabulary alignment.

Two models can share a tokenizer yet have output heads of different sizes, because the
embedding matrix is padded (Qwen2.5: tokenizer 151,665 tokens, heads of 151,936 or
152,064 rows). The rows beyond ``len(tokenizer)`` are never targets, so both heads are
sliced to the tokenizer's size ``V`` (``Head.with_vocab(V)``) and compared there.

Feeding a student's token ids to a teacher with another tokenizer is silently wrong
(TRL #4562): :func:`align_vocab` refuses it with :class:`VocabMismatchError` unless the
token -> id mappings and special tokens are identical.
"""

from __future__ import annotations

from potstill.errors import PotstillError, VocabMismatchError

__all__ = ["align_vocab", "special_tokens"]

_CROSS_FIX = "choose a cross-tokenizer method or use the teacher's tokenizer for the student"


def special_tokens(tok) -> dict[str, str | None]:
    """The named special tokens (bos, eos, pad, unk, ...) as strings."""
    out: dict[str, str | None] = {}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        val = getattr(tok, attr, None)
        out[attr] = None if val is None else str(val)
    return out


def _token_space(tok) -> int:
    vocab = tok.get_vocab()
    top = max(vocab.values()) + 1 if vocab else 0
    return max(len(tok), top)


def align_vocab(teacher_tok, student_tok, teacher_vocab_rows: int, student_vocab_rows: int) -> int:
    """The vocabulary size ``V`` to slice both heads to, or :class:`VocabMismatchError`.

    The tokenizers must be identical: same token -> id mapping (added tokens included)
    and the same special tokens. Then ``V = len(tokenizer)`` (or max id + 1 if larger) and
    both heads must have at least ``V`` rows; any rows beyond ``V`` are padding and are
    dropped from both heads (``Head.with_vocab(V)``).
    """
    if teacher_tok is not student_tok:
        t_vocab = teacher_tok.get_vocab()
        s_vocab = student_tok.get_vocab()
        if t_vocab != s_vocab:
            union = t_vocab.keys() | s_vocab.keys()
            differ = sum(1 for t in union if t_vocab.get(t) != s_vocab.get(t))
            raise VocabMismatchError(
                f"teacher and student tokenizers differ ({differ} of {len(union)} tokens map to "
                f"different ids); {_CROSS_FIX}"
            )
        t_special, s_special = special_tokens(teacher_tok), special_tokens(student_tok)
        if t_special != s_special:
            diff = [f"{k}: {t_special[k]!r} vs {s_special[k]!r}" for k in t_special if t_special[k] != s_special[k]]
            raise VocabMismatchError(
                f"teacher and student tokenizers differ in special tokens ({'; '.join(diff)}); "
                "use the same tokenizer for both (set the student's special tokens to the teacher's)"
            )
    V = _token_space(teacher_tok)
    for who, rows in (("teacher", teacher_vocab_rows), ("student", student_vocab_rows)):
        if int(rows) < V:
            raise PotstillError(
                f"the {who} head has {rows} rows but the tokenizer has {V} tokens; resize the {who}'s "
                "embeddings (model.resize_token_embeddings(len(tokenizer)))"
            )
    return V
