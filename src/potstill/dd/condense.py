"""Optimization-based dataset condensation for text classifiers, in input-embedding space.

Text is discrete, so the synthetic set is learned where the encoder's input is continuous:
each synthetic example is a sequence of *soft token embeddings* ``[L, H]`` fed to the
learner as ``inputs_embeds`` (the word-embedding space; the model adds its own position
embeddings). A :class:`CondensedSet` holds, for ``m`` synthetic examples:

* ``embeddings [m, L, H]``: learnable, initialized from real examples' token embeddings,
  ``per_class`` examples of each class (Zhao et al. 2021 initialize from real images too);
* ``label_logits [m, C]``: learnable soft labels, initialized one-hot-ish (``label_confidence``
  on the example's class), read as ``softmax(label_logits)``;
* ``lr_log [N]``: optional learnable per-step learning rates (log scale) of the student in
  trajectory matching (Cazenavette et al. 2022 learn one lr; one per step is the finer variant);
* ``attention_mask``/``learn_mask [m, L]``: which positions exist, and which are learned
  (special tokens such as ``[CLS]``/``[SEP]`` and padding stay fixed at their real embedding).

Two objectives, each returning a new set whose ``history`` records the matching loss per
outer iteration (``history["match"]``), the latent regularizer (``history["reg"]``) and time:

* :func:`gradient_matching`, Zhao, Mopuri & Bilen 2021 ("Dataset Condensation with Gradient
  Matching", ICLR), Alg. 1 with their layer-wise distance (eq. 10):
  ``d(A, B) = sum_i (1 - <A_i, B_i> / (|A_i| |B_i|))`` over output rows ``i`` of each weight,
  summed over layers, per class, between the learner's gradient on a real batch of the class
  and on the class's synthetic examples. Learner inits are fresh per outer iteration (or cycle
  through ``n_inits`` fixed ones); the inner loop trains the learner on the synthetic set.
* :func:`trajectory_matching`, Cazenavette et al. 2022 ("Dataset Distillation by Matching
  Training Trajectories", CVPR), eq. 2: a student starts at expert snapshot ``t``, takes
  ``N`` differentiable SGD steps on the synthetic set (``torch.func.functional_call``), and
  the loss is ``|theta_N - theta*_{t+M}|^2 / |theta*_t - theta*_{t+M}|^2``. Experts come from
  :func:`train_experts` (plain SGD on real data, snapshots every ``save_every`` steps).

Both match only a **parameter subset** ``params`` (names or dotted prefixes, e.g.
``["head", "encoder.encoder.layer.5"]``); every other parameter is frozen at the learner's
value. On CPU this is what keeps a pretrained encoder affordable: gradients and second-order
terms are only formed for the subset (the backward still runs through the whole encoder to
reach the input embeddings). The learner is any ``nn.Module`` with
``forward(inputs_embeds=[B, L, H], attention_mask=[B, L]) -> logits [B, C]`` (or an output
with ``.logits``). Encoders must use an attention implementation with a double backward
(HF ``attn_implementation="eager"``; SDPA's fused CPU kernel has none).

:func:`latent_regularizer` keeps the soft embeddings near the token-embedding manifold,
so that :meth:`CondensedSet.to_text` (nearest-token projection) loses little. Distilling text
in embedding space and reading words back by nearest neighbour follows Sucholutsky & Schonlau
2021 ("Soft-Label Dataset Distillation and Text Dataset Distillation") and Maekawa et al. 2023
("Dataset Distillation with Attention Labels for Fine-tuning BERT", ACL); the penalty on the
distance to the nearest token row is the simple form of latent-space regularization named in
the DD surveys (e.g. Yu, Liu & Wang 2023, "Dataset Distillation: A Comprehensive Review").
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..data.classification import Example
from ..errors import PotstillError
from ..io import atomic_write_bytes, atomic_write_json

__all__ = [
    "CondensedSet",
    "RealData",
    "fresh_init",
    "gradient_distance",
    "gradient_matching",
    "init_condensed",
    "init_from_ids",
    "latent_regularizer",
    "load_condensed",
    "nearest_tokens",
    "save_condensed",
    "select_params",
    "soft_cross_entropy",
    "text_candidates",
    "train_experts",
    "trajectory_matching",
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


@dataclass
class CondensedSet:
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

    def project(self, embedding_matrix: Tensor, *, metric: str = "cosine", candidates: Tensor | None = None) -> Tensor:
        """Token ids ``[m, L]``: learned positions -> nearest token row, fixed positions keep their token."""
        near = nearest_tokens(self.embeddings.detach(), embedding_matrix, metric=metric, candidates=candidates)
        return torch.where(self.learn_mask, near, self.token_ids)

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
        if candidates is None:
            candidates = text_candidates(tokenizer, embedding_matrix.shape[0])
        ids = self.project(embedding_matrix, metric=metric, candidates=candidates)
        out = []
        for i in range(len(self)):
            row = ids[i][self.attention_mask[i].bool()].tolist()
            out.append(Example(tokenizer.decode(row, skip_special_tokens=True).strip(), int(self.classes[i])))
        return out

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


# --------------------------------------------------------------------------- learner plumbing


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_b -sum_c targets[b, c] log softmax(logits)[b, c]``; one-hot targets give plain CE."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def _logits(learner: nn.Module, params: dict[str, Tensor], embeds: Tensor, mask: Tensor) -> Tensor:
    out = functional_call(
        learner, params, args=(), kwargs={"inputs_embeds": embeds, "attention_mask": mask}, strict=False
    )
    return out.logits if hasattr(out, "logits") else out


def _prefixed(x: Tensor, mask: Tensor, prefix: nn.Module | None) -> Tensor:
    # The prefix is frozen and deterministic (eval mode), so one pass per objective evaluation
    # serves every class / student step that reads the synthetic set.
    return prefix(attention_mask=mask, inputs_embeds=x) if prefix is not None else x


def _real_batch(real: RealData, idx: Tensor, E: Tensor, prefix: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
    x, m, y = real.batch(idx, E)
    if prefix is not None and real.features is None:
        with torch.no_grad():
            x = prefix(attention_mask=m, inputs_embeds=x)
    return x, m, y


def select_params(learner: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters matched/trained: exact names or dotted prefixes; ``None`` = all."""
    names = [n for n, _ in learner.named_parameters()]
    if params is None:
        return names
    out = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in params)]
    if not out:
        raise PotstillError(f"no parameter of the learner matches {list(params)}; use names from named_parameters()")
    return out


def fresh_init(learner: nn.Module, reinit: Sequence[str] = ("",)) -> Callable[[int], dict[str, Tensor]]:
    """``init_fn(seed) -> {name: tensor}``: every submodule under a prefix in ``reinit`` that has
    ``reset_parameters`` is re-drawn with ``torch.manual_seed(seed)``; the rest keep their values
    (a pretrained encoder with a fresh head: ``reinit=("head",)``). The learner is left unchanged."""

    def init_fn(seed: int) -> dict[str, Tensor]:
        saved = {n: p.detach().clone() for n, p in learner.named_parameters()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, mod in learner.named_modules():
                if any(name == r or name.startswith(r + ".") or r == "" for r in reinit) and hasattr(
                    mod, "reset_parameters"
                ):
                    mod.reset_parameters()
        new = {n: p.detach().clone() for n, p in learner.named_parameters()}
        with torch.no_grad():
            for n, p in learner.named_parameters():
                p.copy_(saved[n])
        return new

    return init_fn


class _frozen:
    """Context: every parameter of the modules ``requires_grad=False`` (functional calls pass the
    matched ones explicitly) and eval mode (no dropout: the objective is deterministic in its inputs)."""

    def __init__(self, *modules: nn.Module | None):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for m in self.modules for p in m.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.modes = [(m, m.training) for m in self.modules]
        for m in self.modules:
            m.eval()
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.train(mode)


def gradient_distance(gs: Sequence[Tensor], gr: Sequence[Tensor], eps: float = 1e-6) -> Tensor:
    """Zhao et al. 2021 eq. 10 summed over layers: ``sum_l sum_i (1 - cos(gs_l[i], gr_l[i]))``.

    Each gradient is reshaped to ``[out, -1]`` and compared row by row (one row per output
    node). A 1-D tensor (bias, norm weight) is compared as one vector: the paper's per-node
    cosine of scalars would be only their sign, and their code drops such tensors.
    """
    total = gs[0].new_zeros(())
    for a, b in zip(gs, gr):
        a2 = a.reshape(1, -1) if a.dim() <= 1 else a.reshape(a.shape[0], -1)
        b2 = b.reshape(1, -1) if b.dim() <= 1 else b.reshape(b.shape[0], -1)
        dot = (a2 * b2).sum(-1)
        total = total + (1.0 - dot / (a2.norm(dim=-1) * b2.norm(dim=-1) + eps)).sum()
    return total


def _syn_leaves(
    syn: CondensedSet, learn_labels: bool, lr_embed: float, lr_label: float, extra: list[tuple[Tensor, float]] = ()
) -> tuple[Tensor, Tensor, torch.optim.Optimizer]:
    x = syn.embeddings.detach().clone().requires_grad_(True)
    y = syn.label_logits.detach().clone().requires_grad_(learn_labels)
    groups = [{"params": [x], "lr": lr_embed}]
    if learn_labels:
        groups.append({"params": [y], "lr": lr_label})
    groups += [{"params": [t], "lr": lr} for t, lr in extra]
    return x, y, torch.optim.Adam(groups)


def _reg(
    x: Tensor, syn: CondensedSet, embedding_matrix: Tensor, weight: float, kind: str, candidates: Tensor | None
) -> Tensor:
    if weight <= 0:
        return x.new_zeros(())
    return weight * latent_regularizer(x, embedding_matrix, mask=syn.learn_mask, kind=kind, candidates=candidates)


def _finish(syn: CondensedSet, x: Tensor, y: Tensor, lr_log: Tensor | None, history: dict, meta: dict) -> CondensedSet:
    return replace(
        syn,
        embeddings=x.detach().clone(),
        label_logits=y.detach().clone(),
        lr_log=None if lr_log is None else lr_log.detach().clone(),
        meta={**syn.meta, **meta},
        history=history,
    )


# --------------------------------------------------------------------------- gradient matching


def gradient_matching(
    learner: nn.Module,
    real: RealData,
    syn: CondensedSet,
    embedding_matrix: Tensor,
    *,
    params: Sequence[str] | None = None,
    init_fn: Callable[[int], dict[str, Tensor]] | None = None,
    iterations: int = 100,
    inner_steps: int = 1,
    net_steps: int = 1,
    real_batch: int = 32,
    lr_embed: float = 1e-3,
    lr_label: float = 1e-2,
    lr_net: float = 1e-2,
    learn_labels: bool = True,
    n_inits: int | None = None,
    reg_weight: float = 0.0,
    reg_kind: str = "cosine",
    candidates: Tensor | None = None,
    seed: int = 0,
    prefix: nn.Module | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> CondensedSet:
    """Dataset condensation with gradient matching (Zhao et al. 2021, Alg. 1) in embedding space.

    For each of ``iterations`` outer steps: take learner params ``theta = init_fn(seed_k)``
    (fresh per step, or cycling through ``n_inits`` fixed seeds); then ``inner_steps`` times:
    ``D = sum_c d(grad_theta L(S_c), grad_theta L(B_c))`` with ``B_c`` a real batch of
    ``real_batch`` examples of class ``c`` and ``S_c`` the synthetic examples of class ``c``
    (soft-label CE), plus ``reg_weight * latent_regularizer``; one Adam step on the synthetic
    embeddings (``lr_embed``, learned positions only) and soft labels (``lr_label``); then
    ``net_steps`` SGD steps (``lr_net``) of theta on the whole synthetic set (not after the last
    inner step). ``theta`` covers only ``params`` (see :func:`select_params`); the rest stay
    frozen. ``history["match"][k]`` is the mean ``D`` of outer step ``k``.

    ``prefix`` (optional, frozen, differentiable): ``prefix(attention_mask=, inputs_embeds=) ->
    hidden``; the learner then reads ``hidden`` instead of word embeddings (a learner split as
    :class:`potstill.dd.protocol.SplitLearner`), and ``real.features`` may hold the real rows'
    prefix outputs so that real gradients cost only the learner's part.
    """
    names = select_params(learner, params)
    init_fn = init_fn or fresh_init(learner)
    classes = sorted(int(c) for c in syn.classes.unique())
    real_by_class = {c: torch.nonzero(real.labels == c).flatten() for c in classes}
    for c, idx in real_by_class.items():
        if len(idx) == 0:
            raise PotstillError(f"class {c} has synthetic examples but no real ones; give real data of every class")
    syn_by_class = {c: torch.nonzero(syn.classes == c).flatten() for c in classes}
    gen = torch.Generator().manual_seed(seed)
    x, y, opt = _syn_leaves(syn, learn_labels, lr_embed, lr_label)
    E = embedding_matrix.detach()
    hist: dict[str, list[float]] = {"match": [], "reg": [], "time_s": []}
    t0 = time.perf_counter()
    with _frozen(learner, prefix):
        for k in range(iterations):
            init_seed = seed * 100_003 + (k % n_inits if n_inits else k)
            theta = {n: v.detach().clone().requires_grad_(True) for n, v in init_fn(init_seed).items() if n in names}
            ds, rs = [], []
            for t in range(inner_steps):
                match = x.new_zeros(())
                h = _prefixed(x, syn.attention_mask, prefix)
                for c in classes:
                    pool = real_by_class[c]
                    pick = pool[torch.randperm(len(pool), generator=gen)[:real_batch]]
                    re_, rm, rl = _real_batch(real, pick, E, prefix)
                    g_real = torch.autograd.grad(
                        F.cross_entropy(_logits(learner, theta, re_, rm).float(), rl), list(theta.values())
                    )
                    si = syn_by_class[c]
                    loss_s = soft_cross_entropy(
                        _logits(learner, theta, h[si], syn.attention_mask[si]), torch.softmax(y[si], -1)
                    )
                    g_syn = torch.autograd.grad(loss_s, list(theta.values()), create_graph=True)
                    match = match + gradient_distance(g_syn, [g.detach() for g in g_real])
                reg = _reg(x, syn, E, reg_weight, reg_kind, candidates)
                opt.zero_grad(set_to_none=True)
                (match + reg).backward()
                x.grad.mul_(syn.learn_mask[..., None])
                opt.step()
                ds.append(float(match.detach()))
                rs.append(float(reg.detach()))
                if t == inner_steps - 1:
                    break
                with torch.no_grad():
                    hs = _prefixed(x, syn.attention_mask, prefix)
                hs, ps = hs.detach(), torch.softmax(y.detach(), -1)
                for _ in range(net_steps):
                    loss = soft_cross_entropy(_logits(learner, theta, hs, syn.attention_mask), ps)
                    grads = torch.autograd.grad(loss, list(theta.values()))
                    theta = {
                        n: (v - lr_net * g).detach().requires_grad_(True) for (n, v), g in zip(theta.items(), grads)
                    }
            hist["match"].append(sum(ds) / len(ds))
            hist["reg"].append(sum(rs) / len(rs))
            hist["time_s"].append(time.perf_counter() - t0)
            if callback is not None:
                callback(k, {key: v[-1] for key, v in hist.items()})
    meta = {
        "method": "gradient_matching",
        "params": names,
        "iterations": iterations,
        "inner_steps": inner_steps,
        "net_steps": net_steps,
        "real_batch": real_batch,
        "lr_embed": lr_embed,
        "lr_label": lr_label,
        "lr_net": lr_net,
        "learn_labels": learn_labels,
        "n_inits": n_inits,
        "reg_weight": reg_weight,
        "reg_kind": reg_kind,
        "seed": seed,
    }
    return _finish(syn, x, y, syn.lr_log, hist, meta)


# --------------------------------------------------------------------------- trajectory matching


def train_experts(
    learner: nn.Module,
    real: RealData,
    embedding_matrix: Tensor,
    *,
    params: Sequence[str] | None = None,
    init_fn: Callable[[int], dict[str, Tensor]] | None = None,
    n_experts: int = 2,
    steps: int = 100,
    save_every: int = 10,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
    prefix: nn.Module | None = None,
) -> list[list[dict[str, Tensor]]]:
    """Expert trajectories for MTT (Cazenavette et al. 2022, Sec. 3): plain SGD on real data.

    Returns ``n_experts`` lists of snapshots ``{name: tensor}`` of the ``params`` subset, taken
    at steps ``0, save_every, 2 * save_every, ..., steps`` (so ``steps // save_every + 1`` each).
    Expert ``e`` starts from ``init_fn(seed * 1000 + e)`` and draws its own batches.
    ``prefix`` as in :func:`gradient_matching` (``real.features`` skip it).
    """
    if save_every < 1 or steps < save_every:
        raise PotstillError(f"need 1 <= save_every <= steps, got save_every={save_every}, steps={steps}")
    names = select_params(learner, params)
    init_fn = init_fn or fresh_init(learner)
    E = embedding_matrix.detach()
    experts = []
    with _frozen(learner, prefix):
        for e in range(n_experts):
            gen = torch.Generator().manual_seed(seed * 1000 + e)
            theta = {n: v.detach().clone() for n, v in init_fn(seed * 1000 + e).items() if n in names}
            snaps = [{n: v.clone() for n, v in theta.items()}]
            order = torch.randperm(len(real), generator=gen)
            pos = 0
            for step in range(1, steps + 1):
                if pos + batch_size > len(order):
                    order, pos = torch.randperm(len(real), generator=gen), 0
                idx = order[pos : pos + batch_size]
                pos += batch_size
                xe, xm, xl = _real_batch(real, idx, E, prefix)
                th = {n: v.requires_grad_(True) for n, v in theta.items()}
                grads = torch.autograd.grad(
                    F.cross_entropy(_logits(learner, th, xe, xm).float(), xl), list(th.values())
                )
                theta = {n: (v - lr * g).detach() for (n, v), g in zip(th.items(), grads)}
                if step % save_every == 0:
                    snaps.append({n: v.clone() for n, v in theta.items()})
            experts.append(snaps)
    return experts


def trajectory_matching(
    learner: nn.Module,
    experts: Sequence[Sequence[dict[str, Tensor]]],
    syn: CondensedSet,
    embedding_matrix: Tensor,
    *,
    iterations: int = 100,
    syn_steps: int = 10,
    expert_span: int = 2,
    max_start: int | None = None,
    syn_lr: float = 1e-2,
    learn_lr: bool = True,
    per_step_lr: bool = False,
    lr_embed: float = 1e-3,
    lr_label: float = 1e-2,
    lr_lr: float = 1e-2,
    learn_labels: bool = True,
    syn_batch: int | None = None,
    reg_weight: float = 0.0,
    reg_kind: str = "cosine",
    candidates: Tensor | None = None,
    seed: int = 0,
    prefix: nn.Module | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> CondensedSet:
    """Matching training trajectories (Cazenavette et al. 2022, eq. 2) in embedding space.

    Each iteration picks an expert and a start snapshot ``t <= max_start`` (default: the last
    start with ``t + expert_span`` in range), sets ``theta_0 = theta*_t`` (the snapshot's
    parameter subset; the learner's other parameters stay fixed), takes ``syn_steps``
    differentiable SGD steps ``theta_{n+1} = theta_n - lr_n grad L(S_n; theta_n)`` on the
    synthetic set (soft-label CE; ``syn_batch`` examples a step, default all), and minimizes
    ``|theta_N - theta*_{t+M}|^2 / |theta*_t - theta*_{t+M}|^2`` (``M = expert_span`` snapshots)
    plus ``reg_weight * latent_regularizer`` over the embeddings, soft labels and, with
    ``learn_lr``, the student learning rates (Adam on ``log lr``, ``lr_lr``; one per step with
    ``per_step_lr``, else one shared, initialized at ``syn_lr``). ``history["match"]`` is the
    normalized distance of each iteration. ``prefix`` as in :func:`gradient_matching`.
    """
    if not experts or any(len(e) < expert_span + 1 for e in experts):
        raise PotstillError(f"every expert needs at least expert_span + 1 = {expert_span + 1} snapshots")
    names = list(experts[0][0].keys())
    last = min(len(e) for e in experts) - 1 - expert_span
    max_start = last if max_start is None else min(max_start, last)
    if max_start < 0:
        raise PotstillError(f"max_start={max_start} < 0; use shorter expert_span or longer experts")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_lr = syn_steps if per_step_lr else 1
    if syn.lr_log is not None and syn.lr_log.numel() == n_lr:
        lr0 = syn.lr_log.detach().clone()
    else:
        lr0 = torch.full((n_lr,), math.log(syn_lr))
    lr_log = lr0.requires_grad_(learn_lr)
    x, y, opt = _syn_leaves(syn, learn_labels, lr_embed, lr_label, [(lr_log, lr_lr)] if learn_lr else [])
    E = embedding_matrix.detach()
    m = len(syn)
    hist: dict[str, list[float]] = {"match": [], "reg": [], "time_s": [], "lr": []}
    t0 = time.perf_counter()
    with _frozen(learner, prefix):
        for k in range(iterations):
            traj = experts[rng.randrange(len(experts))]
            t = rng.randint(0, max_start)
            start, target = traj[t], traj[t + expert_span]
            theta = {n: start[n].detach().clone().requires_grad_(True) for n in names}
            h = _prefixed(x, syn.attention_mask, prefix)
            for n_step in range(syn_steps):
                idx = torch.randperm(m, generator=gen)[:syn_batch] if syn_batch else torch.arange(m)
                loss = soft_cross_entropy(
                    _logits(learner, theta, h[idx], syn.attention_mask[idx]), torch.softmax(y[idx], -1)
                )
                grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
                step_lr = lr_log[n_step if per_step_lr else 0].exp()
                theta = {n: v - step_lr * g for (n, v), g in zip(theta.items(), grads)}
            num = sum(((theta[n] - target[n]) ** 2).sum() for n in names)
            den = sum(((start[n] - target[n]) ** 2).sum() for n in names)
            match = num / den.clamp_min(1e-12)
            reg = _reg(x, syn, E, reg_weight, reg_kind, candidates)
            opt.zero_grad(set_to_none=True)
            (match + reg).backward()
            x.grad.mul_(syn.learn_mask[..., None])
            opt.step()
            hist["match"].append(float(match.detach()))
            hist["reg"].append(float(reg.detach()))
            hist["lr"].append(float(lr_log.detach().exp().mean()))
            hist["time_s"].append(time.perf_counter() - t0)
            if callback is not None:
                callback(k, {key: v[-1] for key, v in hist.items()})
    meta = {
        "method": "trajectory_matching",
        "params": names,
        "iterations": iterations,
        "syn_steps": syn_steps,
        "expert_span": expert_span,
        "max_start": max_start,
        "syn_lr": syn_lr,
        "learn_lr": learn_lr,
        "per_step_lr": per_step_lr,
        "lr_embed": lr_embed,
        "lr_label": lr_label,
        "lr_lr": lr_lr,
        "learn_labels": learn_labels,
        "syn_batch": syn_batch,
        "reg_weight": reg_weight,
        "reg_kind": reg_kind,
        "seed": seed,
        "n_experts": len(experts),
    }
    return _finish(syn, x, y, lr_log, hist, meta)


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
    from safetensors.torch import load_file

    path = Path(path)
    st, js = path / "condensed.safetensors", path / "condensed.json"
    if not st.is_file() or not js.is_file():
        raise PotstillError(f"'{path}' holds no condensed set (condensed.safetensors + condensed.json); save one first")
    t = load_file(str(st))
    rec = json.loads(js.read_text())
    missing = [k for k in _TENSORS if k not in t]
    if missing:
        raise PotstillError(f"'{st}' lacks tensors {missing}; it was not written by save_condensed")
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
