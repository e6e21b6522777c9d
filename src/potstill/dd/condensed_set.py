"""The condensed set of :mod:`potstill.dd.condense`: a learnable synthetic classification set in
input-embedding space, its real-data counterpart, its start points, its projection back to
tokens and text, the latent regularizer that keeps it near the token embeddings, and save/load.

A :class:`CondensedSet` holds, for ``m`` synthetic examples: ``embeddings [m, L, H]`` (soft
token embeddings), ``label_logits [m, C]`` (soft labels), optional ``lr_log [N]`` (student
learning rates of trajectory matching), and ``attention_mask``/``learn_mask [m, L]``; see
:mod:`potstill.dd.condense` for the objectives that learn it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.classification import Example
from ..errors import PotstillError
from ..io import atomic_write_bytes, atomic_write_json

__all__ = [
    "REG_KINDS",
    "CondensedSet",
    "RealData",
    "TokenProjection",
    "init_condensed",
    "init_from_ids",
    "latent_regularizer",
    "load_condensed",
    "nearest_tokens",
    "save_condensed",
    "load_set",
    "save_set",
    "text_candidates",
]

REG_KINDS = ("cosine", "l2", "sq")
_TENSORS = ("embeddings", "attention_mask", "learn_mask", "token_ids", "classes", "label_logits")


# --------------------------------------------------------------------------- data


@dataclass
class RealData:
    """Real training examples as token ids: ``input_ids``/``attention_mask [N, L]`` (right-padded), ``labels [N]``.

    ``features [N, L, D]`` (optional): the frozen ``prefix``'s outputs for these rows, computed
    once (e.g. ``SplitLearner.features(...).hidden``); then real batches skip the prefix.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    features: Tensor | None = None

    @classmethod
    def from_examples(cls, examples: Sequence[Example], tokenizer, *, max_length: int) -> RealData:
        if not examples:
            raise PotstillError("no real examples given; pass a non-empty list of Example")
        enc = tokenizer(
            [e.text for e in examples], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return cls(enc["input_ids"], enc["attention_mask"], torch.tensor([e.label for e in examples]))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor, embedding_matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(inputs_embeds [b, l, H] or features [b, l, D], attention_mask [b, l], labels [b])``, trimmed
        to the longest row."""
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max())
        if self.features is not None:
            return self.features[idx, :width], mask[:, :width], self.labels[idx]
        return embedding_matrix[self.input_ids[idx, :width]], mask[:, :width], self.labels[idx]


class TokenProjection:
    """Reading a soft-token set back as tokens, for any set holding ``embeddings [m, L, H]``,
    ``attention_mask``, ``learn_mask`` and ``token_ids [m, L]`` (:class:`CondensedSet`,
    :class:`potstill.dd.condense_lm.SoftPromptSet`)."""

    embeddings: Tensor
    attention_mask: Tensor
    learn_mask: Tensor
    token_ids: Tensor

    def project(self, embedding_matrix: Tensor, *, metric: str = "cosine", candidates: Tensor | None = None) -> Tensor:
        """Token ids ``[m, L]``: learned positions -> nearest token row, fixed positions keep their token."""
        near = nearest_tokens(self.embeddings.detach(), embedding_matrix, metric=metric, candidates=candidates)
        return torch.where(self.learn_mask, near, self.token_ids)

    def token_rows(
        self, tokenizer, embedding_matrix: Tensor, *, metric: str = "cosine", candidates: Tensor | None = None
    ) -> list[list[int]]:
        """Per sequence, the :meth:`project` ids of its real positions (padding dropped); ``candidates`` default to
        :func:`text_candidates` of ``tokenizer``."""
        if candidates is None:
            candidates = text_candidates(tokenizer, embedding_matrix.shape[0])
        ids = self.project(embedding_matrix, metric=metric, candidates=candidates)
        return [ids[i][self.attention_mask[i].bool()].tolist() for i in range(ids.shape[0])]


@dataclass
class CondensedSet(TokenProjection):
    """A learnable synthetic set in input-embedding space (see the module docstring for shapes)."""

    embeddings: Tensor  # [m, L, H] float
    attention_mask: Tensor  # [m, L] long
    learn_mask: Tensor  # [m, L] bool: positions that are optimized
    token_ids: Tensor  # [m, L] long: the real tokens it was initialized from
    classes: Tensor  # [m] long: the class each synthetic example stands for
    label_logits: Tensor  # [m, C] float
    lr_log: Tensor | None = None  # [N] float, log learning rates of the student steps
    meta: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.label_logits.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def soft_labels(self) -> Tensor:
        """``softmax(label_logits)``, ``[m, C]``."""
        return torch.softmax(self.label_logits.detach().float(), dim=-1)

    def inputs(self) -> tuple[Tensor, Tensor]:
        """``(inputs_embeds [m, L, H], attention_mask [m, L])`` to feed a learner."""
        return self.embeddings.detach(), self.attention_mask

    def to_text(
        self, tokenizer, embedding_matrix: Tensor, *, metric: str = "cosine", candidates: Tensor | None = None
    ) -> list[Example]:
        """Text examples by nearest-token projection of every learned position.

        ``metric="cosine"`` (default; word-embedding norms vary with frequency, so the angle is
        the better notion of "which word") or ``"l2"``. Candidates default to
        :func:`text_candidates` (no special or ``[unusedN]`` tokens). Padding is dropped and
        special tokens are skipped when decoding. Row ``i`` has label ``classes[i]``; its soft
        label is ``soft_labels()[i]``. Re-tokenizing the text need not give the same ids
        (WordPiece may merge or split pieces differently).
        """
        rows = self.token_rows(tokenizer, embedding_matrix, metric=metric, candidates=candidates)
        return [
            Example(tokenizer.decode(row, skip_special_tokens=True).strip(), int(c))
            for row, c in zip(rows, self.classes)
        ]

    def save(self, path: str | Path) -> Path:
        return save_condensed(self, path)


def init_from_ids(
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    embedding_matrix: Tensor,
    *,
    num_classes: int,
    special_ids: Sequence[int] = (),
    label_confidence: float = 0.9,
) -> CondensedSet:
    """A condensed set initialized from real token ids ``[m, L]`` (the learnable copy of their embeddings).

    ``label_logits`` start at ``log(label_confidence)`` on the class and
    ``log((1 - label_confidence) / (C - 1))`` elsewhere, so ``softmax`` gives ``label_confidence``.
    """
    if not 0.0 < label_confidence < 1.0 or num_classes < 2:
        raise PotstillError(
            f"need 0 < label_confidence < 1 and num_classes >= 2, got {label_confidence}, {num_classes}"
        )
    mask = attention_mask.long()
    special = torch.zeros_like(mask, dtype=torch.bool)
    for s in special_ids:
        special |= input_ids == int(s)
    learn = mask.bool() & ~special
    off = math.log((1.0 - label_confidence) / (num_classes - 1))
    label_logits = torch.full((len(labels), num_classes), off)
    label_logits[torch.arange(len(labels)), labels.long()] = math.log(label_confidence)
    return CondensedSet(
        embeddings=embedding_matrix.detach()[input_ids].clone().float(),
        attention_mask=mask,
        learn_mask=learn,
        token_ids=input_ids.long().clone(),
        classes=labels.long().clone(),
        label_logits=label_logits,
    )


def init_condensed(
    examples: Sequence[Example],
    per_class: int,
    tokenizer,
    embedding_matrix: Tensor,
    *,
    max_length: int,
    seed: int = 0,
    num_classes: int | None = None,
    label_confidence: float = 0.9,
) -> CondensedSet:
    """``per_class`` random real examples of each class (seeded), tokenized and embedded as the start point."""
    from ..data.classification import per_class_sample

    chosen = per_class_sample(examples, per_class, seed=seed)
    real = RealData.from_examples(chosen, tokenizer, max_length=max_length)
    c = num_classes if num_classes is not None else int(max(e.label for e in examples)) + 1
    cs = init_from_ids(
        real.input_ids,
        real.attention_mask,
        real.labels,
        embedding_matrix,
        num_classes=c,
        special_ids=tokenizer.all_special_ids,
        label_confidence=label_confidence,
    )
    cs.meta.update({"init_texts": [e.text for e in chosen], "init_seed": seed, "per_class": per_class})
    return cs


# --------------------------------------------------------------------------- projection / regularizer


def text_candidates(tokenizer, vocab_rows: int) -> Tensor:
    """Token ids a projection may pick: not special, not a placeholder ``[unusedN]``/``<unusedN>``."""
    banned = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    pat = re.compile(r"^(\[unused\d+\]|<unused\d+>)$")
    banned |= {i for t, i in vocab.items() if pat.match(t)}
    return torch.tensor([i for i in range(vocab_rows) if i not in banned], dtype=torch.long)


def nearest_tokens(
    x: Tensor, embedding_matrix: Tensor, *, metric: str = "cosine", candidates: Tensor | None = None, chunk: int = 4096
) -> Tensor:
    """Index of the nearest embedding row for each vector of ``x [..., H]`` -> ``[...]`` (no grad).

    ``metric``: ``"cosine"`` (max cosine similarity) or ``"l2"`` (min Euclidean distance).
    ``candidates [K]`` restricts the rows searched; the result is still a row index of
    ``embedding_matrix``. Computed in chunks of ``chunk`` vectors (never a full ``N x V`` on big sets).
    """
    if metric not in ("cosine", "l2"):
        raise PotstillError(f"metric '{metric}' is not one of cosine, l2")
    E = embedding_matrix.detach().float()
    rows = candidates if candidates is not None else torch.arange(E.shape[0])
    E = E[rows]
    flat = x.detach().float().reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long)
    if metric == "cosine":
        En = F.normalize(E, dim=-1)
    else:
        sq = (E * E).sum(-1)
    for s in range(0, flat.shape[0], chunk):
        v = flat[s : s + chunk]
        if metric == "cosine":
            out[s : s + chunk] = (F.normalize(v, dim=-1) @ En.T).argmax(-1)
        else:  # |v - e|^2 = |v|^2 - 2 v.e + |e|^2; |v|^2 does not change the argmin
            out[s : s + chunk] = (sq[None, :] - 2.0 * v @ E.T).argmin(-1)
    return rows[out].reshape(x.shape[:-1])


def latent_regularizer(
    x: Tensor,
    embedding_matrix: Tensor,
    *,
    mask: Tensor | None = None,
    kind: str = "cosine",
    candidates: Tensor | None = None,
) -> Tensor:
    """Mean over (masked) positions of the distance from ``x [..., H]`` to its nearest token row (scalar).

    ``kind``: ``"cosine"`` -> ``1 - max_e cos(x, e)``; ``"l2"`` -> ``min_e |x - e|``;
    ``"sq"`` -> ``min_e |x - e|^2``. Zero iff every vector is (a positive multiple of, for
    cosine) a token row; grows with the distance. The nearest row is found without grad and
    the distance to it is differentiated, which is the (almost-everywhere) gradient of the min.
    ``mask [...]`` (bool) selects the positions that count; an empty mask gives 0.
    """
    if kind not in REG_KINDS:
        raise PotstillError(f"regularizer kind '{kind}' is not one of {', '.join(REG_KINDS)}")
    v = x.reshape(-1, x.shape[-1])
    if mask is not None:
        v = v[mask.reshape(-1).bool()]
    if v.shape[0] == 0:
        return x.sum() * 0.0
    metric = "cosine" if kind == "cosine" else "l2"
    idx = nearest_tokens(v, embedding_matrix, metric=metric, candidates=candidates)
    e = embedding_matrix.detach().to(v.dtype)[idx]
    if kind == "cosine":
        d = 1.0 - F.cosine_similarity(v, e, dim=-1, eps=1e-8)
    elif kind == "l2":
        d = (v - e).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    else:
        d = (v - e).pow(2).sum(-1)
    return d.mean()


# --------------------------------------------------------------------------- save / load


def save_set(path: str | Path, stem: str, tensors: dict[str, Tensor | None], record: dict) -> Path:
    """Write ``path/<stem>.safetensors`` (the tensors that are not None, on the CPU, booleans as
    uint8) and ``path/<stem>.json`` (``record``), each atomically; returns the directory. Shared by
    condensed sets and soft-prompt sets."""
    from safetensors.torch import save

    path = Path(path)
    out = {}
    for k, t in tensors.items():
        if t is not None:
            t = t.detach().contiguous().cpu()
            out[k] = t.to(torch.uint8) if t.dtype == torch.bool else t
    atomic_write_bytes(path / f"{stem}.safetensors", save(out))
    atomic_write_json(path / f"{stem}.json", _jsonable(record))
    return path


def load_set(
    path: str | Path, stem: str, required: Sequence[str], what: str, writer: str
) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, record)`` of a directory written by :func:`save_set` (``path/<stem>.safetensors`` and
    ``path/<stem>.json``), checked to hold the ``required`` tensors; ``what`` names the set and ``writer``
    the function that writes it, in the errors."""
    from safetensors.torch import load_file

    st, js = Path(path) / f"{stem}.safetensors", Path(path) / f"{stem}.json"
    if not st.is_file() or not js.is_file():
        raise PotstillError(f"'{path}' holds no {what} ({st.name} + {js.name}); save one first")
    t = load_file(str(st))
    rec = json.loads(js.read_text())
    missing = [k for k in required if k not in t]
    if missing:
        raise PotstillError(f"'{st}' lacks tensors {missing}; it was not written by {writer}")
    return t, rec


def save_condensed(cs: CondensedSet, path: str | Path) -> Path:
    """Write ``path/condensed.safetensors`` (all tensors) and ``path/condensed.json`` (meta, history,
    shapes), each atomically; returns the directory."""
    record = {
        "format": "potstill.condensed/1",
        "num_examples": len(cs),
        "num_classes": cs.num_classes,
        "shape": list(cs.embeddings.shape),
        "meta": cs.meta,
        "history": cs.history,
    }
    return save_set(path, "condensed", {**{k: getattr(cs, k) for k in _TENSORS}, "lr_log": cs.lr_log}, record)


def load_condensed(path: str | Path) -> CondensedSet:
    """Read a directory written by :func:`save_condensed`."""
    t, rec = load_set(path, "condensed", _TENSORS, "condensed set", "save_condensed")
    return CondensedSet(
        embeddings=t["embeddings"],
        attention_mask=t["attention_mask"],
        learn_mask=t["learn_mask"].bool(),
        token_ids=t["token_ids"],
        classes=t["classes"],
        label_logits=t["label_logits"],
        lr_log=t.get("lr_log"),
        meta=rec.get("meta", {}),
        history=rec.get("history", {}),
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Tensor):
        return obj.tolist()
    return obj
