"""Vocabulary map between a teacher and a student tokenizer (for cross-tokenizer KD).

The projection of GOLD / NeMo-RL's cross-tokenizer KD, with a MinED-style fallback: every
teacher token gets a student token and a match kind, ``exact`` (same bytes), ``normalized`` (same
text after NFKC, then after NFKC + casefold), ``mined`` (the longest student token that is a byte
prefix of it: MinED of FuseLLM, Wan et al. 2024, restricted to prefixes) or none.
:func:`project_teacher` sums the teacher's probabilities onto student ids.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from potstill.errors import PotstillError

MatchKind = Literal["exact", "normalized", "mined"]
KINDS: tuple[str, ...] = ("none", "exact", "normalized", "mined")
"""Match kinds by code: ``VocabMap.kinds`` holds indices into this tuple."""
DEFAULT_KINDS: tuple[MatchKind, ...] = ("exact", "normalized", "mined")
LOG_FLOOR = -1e4
"""Log-probability given to student ids that receive no teacher mass: finite, so that
non-finite checks downstream do not trip, and ``exp(-1e4) == 0`` in every float dtype."""

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ------------------------------------------------------------------------ token strings


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-to-printable-character table of byte-level BPE (GPT-2): bytes that
    are printable Latin-1 stand for themselves, the other 68 are shifted to chr(256 + k)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _find(node: Any, kind: str) -> list[dict]:
    """Every component of type ``kind`` in a tokenizer.json subtree (Sequences included)."""
    found: list[dict] = []
    if isinstance(node, dict):
        if node.get("type") == kind:
            found.append(node)
        for value in node.values():
            found.extend(_find(value, kind))
    elif isinstance(node, list):
        for value in node:
            found.extend(_find(value, kind))
    return found


def _component(obj) -> Any:
    """A tokenizer component (normalizer, pre-tokenizer, decoder) as its JSON dict, or None."""
    return None if obj is None else json.loads(obj.__getstate__())


def _space_marker(spec: dict) -> str | None:
    """The character a SentencePiece-style tokenizer writes for a space ("▁"), or None."""
    for part in ("pre_tokenizer", "decoder"):
        for m in _find(spec.get(part), "Metaspace"):
            return m.get("replacement", "▁")
    for r in _find(spec.get("normalizer"), "Replace"):  # Gemma: normalizer replaces " " by "▁"
        if r.get("pattern", {}).get("String") == " ":
            return r.get("content")
    for r in _find(spec.get("decoder"), "Replace"):
        if r.get("content") == " ":
            return r.get("pattern", {}).get("String")
    return None


def _token_table(tokenizer) -> tuple[list[bytes | None], set[int]]:
    """``(bytes of every token id or None for special/unknown ids, ids of byte-fallback tokens)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PotstillError(
            f"{type(tokenizer).__name__} is a slow tokenizer; cross-tokenizer KD needs fast tokenizers "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    # The components alone: serializing the whole tokenizer (merges included) costs seconds.
    spec = {part: _component(getattr(backend, part, None)) for part in ("normalizer", "pre_tokenizer", "decoder")}
    byte_level = bool(_find(spec["pre_tokenizer"], "ByteLevel") or _find(spec["decoder"], "ByteLevel"))
    marker = None if byte_level else _space_marker(spec)
    fallback_on = bool(getattr(backend.model, "byte_fallback", False))
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    table: list[bytes | None] = [None] * size
    fallback: set[int] = set()
    decoder = _byte_decoder() if byte_level else {}
    for token, i in vocab.items():
        if i in special:
            continue
        if i in added:
            # Added tokens are matched on the raw text: their content is the text itself.
            a = added[i]
            table[i] = None if a.special else str(a.content).encode("utf-8")
            continue
        m = _BYTE_TOKEN.match(token) if fallback_on else None
        if m:
            table[i] = bytes([int(m.group(1), 16)])
            fallback.add(i)
        elif byte_level:
            if all(ch in decoder for ch in token):
                table[i] = bytes(decoder[ch] for ch in token)
            else:  # not byte-encoded (an odd entry): take it as text
                table[i] = token.encode("utf-8")
        else:
            table[i] = (token.replace(marker, " ") if marker else token).encode("utf-8")
    return table, fallback


def token_bytes(tokenizer) -> list[bytes | None]:
    """The text every token id stands for, as UTF-8 bytes, in one common form.

    Byte-level BPE ("Ġ" = space, "Ã©" = the two bytes of "é") is decoded through its byte
    table; SentencePiece-style tokens have their space marker ("▁") turned into a space and
    byte-fallback tokens ``<0xNN>`` become the byte ``NN``. Special / control tokens (and ids
    that name no token) are ``None``. Returns one entry per id in ``[0, max(len(tok), max id + 1))``.
    """
    return _token_table(tokenizer)[0]


def special_ids(tokenizer) -> set[int]:
    """Ids of control tokens (named specials and added tokens flagged special): never aligned."""
    out = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            out.add(int(i))
    return out


# --------------------------------------------------------------------- vocabulary map


@dataclass(eq=False)
class VocabMap:
    """Per teacher token id: a student id (``-1`` when unmapped) and a match kind.

    ``student_ids`` and ``kinds`` are ``LongTensor [V_t]``; ``kinds`` indexes :data:`KINDS`.
    ``student_vocab`` is the size of the student vocabulary the ids live in.
    """

    student_ids: Tensor
    kinds: Tensor
    student_vocab: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def teacher_vocab(self) -> int:
        return int(self.student_ids.shape[0])

    def counts(self) -> dict[str, int]:
        """Number of teacher tokens of each kind (``none`` included)."""
        c = torch.bincount(self.kinds, minlength=len(KINDS))
        return {k: int(c[i]) for i, k in enumerate(KINDS)}

    def pairs(self, kinds: Sequence[str], device) -> tuple[Tensor, Tensor]:
        """``(teacher ids [m], student ids [m])`` of the mapped tokens whose kind is in ``kinds``."""
        key = ("pairs", tuple(sorted(kinds)), str(device))
        if key not in self._cache:
            codes = torch.tensor([KINDS.index(k) for k in kinds], dtype=torch.long)
            keep = torch.isin(self.kinds, codes) & (self.student_ids >= 0)
            src = keep.nonzero().squeeze(1)
            self._cache[key] = (src.to(device), self.student_ids[src].to(device))
        return self._cache[key]

    def kind_codes(self, vocab: int, device) -> Tensor:
        """``kinds`` padded with ``none`` to ``vocab`` ids (a head may have padding rows), ``[vocab]``."""
        key = ("codes", vocab, str(device))
        if key not in self._cache:
            codes = torch.zeros(vocab, dtype=torch.long)
            n = min(vocab, self.teacher_vocab)
            codes[:n] = self.kinds[:n]
            self._cache[key] = codes.to(device)
        return self._cache[key]


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def build_vocab_map(teacher_tokenizer, student_tokenizer, *, student_vocab: int | None = None) -> VocabMap:
    """Map every teacher token to a student token (deterministic; seconds for 262k x 49k).

    Match kinds, tried in this order for each teacher token ``t`` (its bytes from :func:`token_bytes`):

    * ``exact``: a student token with the same bytes (so "▁Paris" = "ĠParis" = b" Paris").
    * ``normalized``: a student token whose text equals ``t``'s after Unicode NFKC ("ﬁ" = "fi",
      full-width letters, no-break space), else after NFKC + ``str.casefold`` ("▁THE" -> " the").
      Only for tokens that are valid UTF-8 on both sides.
    * ``mined``: the longest student token that is a strict byte prefix of ``t``. MinED (FuseLLM,
      Wan et al., ICLR 2024, arXiv:2401.10491) maps a token to the one at minimum edit distance
      over the whole vocabulary: 262k x 49k Levenshtein distances are out of reach in Python,
      so the candidates are restricted to prefixes, found by ``len(t)`` hash look-ups. Among prefixes the edit
      distance is ``len(t) - len(prefix)``, so the longest prefix is MinED's choice within the
      restriction; it is also the first student token of ``t`` when the student splits it, which
      is what the student would emit at this position.
    * none: special/control tokens and tokens without any candidate (``student_id = -1``).

    Ties among student candidates go to ordinary tokens over byte-fallback ``<0xNN>`` ones, then
    to the smallest id. ``student_vocab`` defaults to the student tokenizer's id range.
    """
    t_bytes, _ = _token_table(teacher_tokenizer)
    s_bytes, s_fallback = _token_table(student_tokenizer)
    order = sorted(range(len(s_bytes)), key=lambda i: (i in s_fallback, i))
    exact: dict[bytes, int] = {}
    by_nfkc: dict[str, int] = {}
    by_fold: dict[str, int] = {}
    for i in order:
        b = s_bytes[i]
        if not b:
            continue
        exact.setdefault(b, i)
        try:
            s = _nfkc(b.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        by_nfkc.setdefault(s, i)
        by_fold.setdefault(s.casefold(), i)
    ids = [-1] * len(t_bytes)
    kinds = [0] * len(t_bytes)
    exact_code, norm_code, mined_code = KINDS.index("exact"), KINDS.index("normalized"), KINDS.index("mined")
    for t, b in enumerate(t_bytes):
        if not b:
            continue
        j = exact.get(b)
        if j is not None:
            ids[t], kinds[t] = j, exact_code
            continue
        try:
            s = _nfkc(b.decode("utf-8"))
        except UnicodeDecodeError:
            s = None
        if s is not None:
            j = by_nfkc.get(s)
            if j is None:
                j = by_fold.get(s.casefold())
            if j is not None:
                ids[t], kinds[t] = j, norm_code
                continue
        for n in range(len(b) - 1, 0, -1):
            j = exact.get(b[:n])
            if j is not None:
                ids[t], kinds[t] = j, mined_code
                break
    v_s = student_vocab if student_vocab is not None else len(s_bytes)
    if v_s < len(s_bytes) and max(ids, default=-1) >= v_s:
        raise PotstillError(
            f"student_vocab={v_s} is smaller than the student tokenizer ({len(s_bytes)} ids); "
            "pass the student head's row count"
        )
    return VocabMap(torch.tensor(ids, dtype=torch.long), torch.tensor(kinds, dtype=torch.long), int(v_s))


def project_teacher(
    teacher_logprobs: Tensor,
    vmap: VocabMap,
    student_vocab: int | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> tuple[Tensor, Tensor]:
    """Teacher log-probabilities ``[n, V_t]`` -> student log-probabilities ``[n, V_s]`` and mapped mass ``[n]``.

    ``p_S(j) = sum_{t : map(t) = j} p_T(t) / M`` with ``M = sum_{t mapped} p_T(t)`` the teacher's mass on
    tokens whose kind is in ``kinds`` (the projection of GOLD / NeMo-RL cross-tokenizer KD).
    Renormalizing over the mapped mass makes the result the teacher's distribution *conditioned on
    its next token being mappable*: unmapped tokens (specials, excluded kinds) drop out instead of
    being charged to an arbitrary student id. ``M`` is returned so callers can weight or skip rows
    (``M = 0``: nothing mapped; all entries are then :data:`LOG_FLOOR`).

    Sums are log-sum-exp per student id, so a lone preimage keeps its log-probability exactly
    (``log p_S(j) = log p_T(t) - log M``) and small probabilities do not underflow. Student ids
    with no mass get :data:`LOG_FLOOR` (finite, never -inf or NaN). Teacher columns beyond the map
    (head padding rows) are unmapped. Computed in float32 (float64 stays float64).
    """
    v_s = int(student_vocab if student_vocab is not None else vmap.student_vocab)
    if teacher_logprobs.shape[-1] < vmap.teacher_vocab:
        raise PotstillError(
            f"teacher log-probs have {teacher_logprobs.shape[-1]} columns but the vocab map covers "
            f"{vmap.teacher_vocab} teacher ids; build the map from the teacher's tokenizer"
        )
    dtype = torch.float64 if teacher_logprobs.dtype == torch.float64 else torch.float32
    lp = teacher_logprobs.to(dtype)
    n = lp.shape[0]
    src, dst = vmap.pairs(kinds, lp.device)
    if dst.numel() and int(dst.max()) >= v_s:
        raise PotstillError(
            f"the vocab map points at student id {int(dst.max())} but student_vocab={v_s}; "
            "pass the student head's row count"
        )
    vals = lp.index_select(1, src)
    idx = dst.unsqueeze(0).expand(n, -1)
    ninf = torch.full((), float("-inf"), dtype=dtype, device=lp.device)
    peak = torch.full((n, v_s), float("-inf"), dtype=dtype, device=lp.device).scatter_reduce(
        1, idx, vals, reduce="amax", include_self=True
    )
    live = torch.isfinite(peak)
    base = torch.where(live, peak, torch.zeros((), dtype=dtype, device=lp.device))
    summed = torch.zeros((n, v_s), dtype=dtype, device=lp.device).scatter_add_(
        1, idx, torch.exp(vals - base.gather(1, idx))
    )
    out = torch.where(live, base + torch.log(summed.clamp_min(torch.finfo(dtype).tiny)), ninf)
    log_mass = torch.logsumexp(out, dim=-1)
    has_mass = torch.isfinite(log_mass)
    out = out - torch.where(has_mass, log_mass, torch.zeros((), dtype=dtype, device=lp.device)).unsqueeze(-1)
    out = torch.where(live & has_mass.unsqueeze(-1), out, torch.full((), LOG_FLOOR, dtype=dtype, device=lp.device))
    return out, torch.exp(log_mass)


def mass_by_kind(teacher_logprobs: Tensor, vmap: VocabMap) -> Tensor:
    """Teacher probability mass on tokens of each kind, ``[n, V_t] -> [n, len(KINDS)]`` (rows sum to 1)."""
    p = torch.exp(teacher_logprobs.float() if teacher_logprobs.dtype != torch.float64 else teacher_logprobs)
    codes = vmap.kind_codes(p.shape[-1], p.device)
    return torch.zeros((p.shape[0], len(KINDS)), dtype=p.dtype, device=p.device).index_add_(1, codes, p)


__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "LOG_FLOOR",
    "MatchKind",
    "VocabMap",
    "build_vocab_map",
    "mass_by_kind",
    "project_teacher",
    "special_ids",
    "token_bytes",
]
