"""Gradient-matching condensation for causal LMs into a few soft-prompt sequences (experimental).

A :class:`SoftPromptSet` holds ``m`` synthetic sequences of length ``L`` as learnable input
embeddings ``S [m, L, H]`` (soft prompts as in Lester, Al-Rfou & Constant 2021, "The Power of
Scale for Parameter-Efficient Prompt Tuning", EMNLP), fed to a model as ``inputs_embeds``.
Their targets are soft labels at every position: by default the teacher's next-token
distribution ``p_T(. | S_{i,<=t})``, recomputed from the current ``S`` before every use (the
teacher reads the same embeddings; its weights are frozen, but the matching loss is
differentiated through it w.r.t. ``S``: with the labels held fixed in the gradient, a step on
``S`` moved them unseen and the matching distance grew), or with ``labels="learned"`` free
logits ``Y [m, L, V]`` initialized from the teacher's.

The KD loss of student parameters ``theta`` on inputs ``X`` with mask ``M`` is the forward KL
(Hinton et al. 2015) averaged over the positions that count::

    L(theta; X) = sum_{i,t} M_it KL(p_T(. | X_{i,<=t}) || q_theta(. | X_{i,<=t})) / sum_{i,t} M_it

:func:`condense_lm` is Zhao, Mopuri & Bilen 2021 ("Dataset Condensation with Gradient
Matching", ICLR), Alg. 1, with this loss in place of cross-entropy::

    min_S  E_{theta_0} sum_t D(grad_theta L(theta_t; S), grad_theta L(theta_t; B_t)) + lambda R(S)
    theta_{t+1} = theta_t - eta grad_theta L(theta_t; S)

``B_t`` cycles through the real batches, ``D`` is their layer-wise distance (eq. 10,
:func:`~potstill.dd.condense.gradient_distance`), ``R`` is
:func:`~potstill.dd.condense.latent_regularizer` (distance to the nearest token embedding, so
that :meth:`SoftPromptSet.to_text` loses little), ``theta_0`` a fresh student init per outer
step (or one of ``n_inits`` cycled ones). Gradients are w.r.t. a parameter subset
(:func:`~potstill.dd.condense.select_params`; default: all but the input embedding, which soft
prompts bypass). The loss is a plain masked mean, not the chunked reducer, whose custom
backward has no double backward (``D`` needs one).

Why experimental: Maekawa et al. 2024 ("DiLM: Distilling Dataset into Language Model for
Text-level Dataset Distillation", NAACL Findings) note that embedding-level synthetic sets are
tied to the embedding layer they were made in, do not transfer to other models and do not
read back as text; for LMs a few soft prompts must also stand for many next-token contexts.
Teacher and student must share the tokenizer and the embedding width; ``S`` lives in the
student's input space, so the teacher's labels mean most when the two share input embeddings.
Shown so far (tiny random Llamas only): the matching loss falls and training on a set lowers
held-out KL; condensing was *not* shown to beat its own start or a random real subset of equal size.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..divergences import forward_kl
from ..errors import PotstillError, VocabMismatchError
from ..models.head import output_head, unwrap_model
from .condense import (
    fresh_init,
    frozen,
    gradient_distance,
    latent_regularizer,
    save_set,
    select_params,
)
from .condensed_set import TokenProjection, load_set

__all__ = [
    "SoftPromptSet",
    "check_pair",
    "condense_lm",
    "evaluate_lm_set",
    "init_soft_prompts",
    "kd_loss",
    "lm_forward_kl",
    "lm_gradient_distance",
    "load_soft_prompts",
    "random_soft_prompts",
]

Labels = Literal["teacher", "learned"]
Batch = tuple[Tensor, Tensor]  # (input_ids [b, T], attention_mask [b, T])
_TENSORS = ("embeddings", "attention_mask", "learn_mask", "token_ids")


@dataclass
class SoftPromptSet(TokenProjection):
    """``m`` learnable soft-prompt sequences with next-token soft labels (module docstring)."""

    embeddings: Tensor  # [m, L, H] float
    attention_mask: Tensor  # [m, L] long
    learn_mask: Tensor  # [m, L] bool: optimized positions (special tokens and padding stay fixed)
    token_ids: Tensor  # [m, L] long: the tokens it was initialized from
    labels: Labels = "teacher"
    label_logits: Tensor | None = None  # [m, L, V] when labels == "learned"
    meta: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def target_logits(self, teacher: nn.Module) -> Tensor:
        """``[m, L, V]``: the teacher's logits on the current embeddings, or the learned logits."""
        if self.labels == "learned":
            return self.label_logits.detach()
        with frozen(teacher), torch.no_grad():
            return _lm_logits(teacher, self.embeddings.detach(), self.attention_mask).float()

    def soft_labels(self, teacher: nn.Module) -> Tensor:
        """``softmax(target_logits)``, ``[m, L, V]``."""
        return torch.softmax(self.target_logits(teacher).float(), dim=-1)

    def to_text(
        self, tokenizer, embedding_matrix: Tensor, *, metric: str = "cosine", candidates: Tensor | None = None
    ) -> list[str]:
        """One string per sequence by nearest-token projection (candidates default to
        :func:`~potstill.dd.condense.text_candidates`); padding dropped, fixed special tokens kept."""
        rows = self.token_rows(tokenizer, embedding_matrix, metric=metric, candidates=candidates)
        return [tokenizer.decode(row) for row in rows]

    def save(self, path: str | Path) -> Path:
        """Write ``path/soft_prompts.safetensors`` and ``path/soft_prompts.json`` (meta, history), each atomically."""
        record = {
            "format": "potstill.soft_prompts/1",
            "labels": self.labels,
            "shape": list(self.embeddings.shape),
            "meta": self.meta,
            "history": self.history,
        }
        return save_set(
            path, "soft_prompts", {**{k: getattr(self, k) for k in _TENSORS}, "label_logits": self.label_logits}, record
        )


def load_soft_prompts(path: str | Path) -> SoftPromptSet:
    """Read a directory written by :meth:`SoftPromptSet.save`."""
    t, rec = load_set(path, "soft_prompts", _TENSORS, "soft-prompt set", "SoftPromptSet.save")
    return SoftPromptSet(
        embeddings=t["embeddings"],
        attention_mask=t["attention_mask"],
        learn_mask=t["learn_mask"].bool(),
        token_ids=t["token_ids"],
        labels=rec["labels"],
        label_logits=t.get("label_logits"),
        meta=rec.get("meta", {}),
        history=rec.get("history", {}),
    )


def init_soft_prompts(
    input_ids: Tensor,
    attention_mask: Tensor,
    embedding_matrix: Tensor,
    *,
    special_ids: Sequence[int] = (),
    labels: Labels = "teacher",
    teacher: nn.Module | None = None,
) -> SoftPromptSet:
    """A set initialized from real token ids ``[m, L]`` (a learnable copy of ``embedding_matrix[ids]``).

    Positions holding one of ``special_ids`` (e.g. chat-template markers) or padding are not
    learned. ``labels="learned"`` needs the ``teacher``: its logits are the starting labels.
    """
    if labels not in ("teacher", "learned"):
        raise PotstillError(f"labels '{labels}' is not one of teacher, learned")
    mask = attention_mask.long()
    special = torch.isin(input_ids, torch.tensor(list(special_ids), dtype=input_ids.dtype))
    sp = SoftPromptSet(
        embeddings=embedding_matrix.detach()[input_ids].clone().float(),
        attention_mask=mask,
        learn_mask=mask.bool() & ~special,
        token_ids=input_ids.long().clone(),
    )
    if labels == "learned":
        if teacher is None:
            raise PotstillError("labels='learned' starts from the teacher's logits; pass teacher=")
        sp.label_logits, sp.labels = sp.target_logits(teacher).clone(), "learned"
    return sp


def random_soft_prompts(
    m: int,
    length: int,
    embedding_matrix: Tensor,
    *,
    candidates: Tensor | None = None,
    seed: int = 0,
    labels: Labels = "teacher",
    teacher: nn.Module | None = None,
) -> SoftPromptSet:
    """``m`` sequences of ``length`` random rows of ``embedding_matrix`` (drawn from ``candidates``), seeded."""
    rows = candidates if candidates is not None else torch.arange(embedding_matrix.shape[0])
    ids = rows[torch.randint(len(rows), (m, length), generator=torch.Generator().manual_seed(seed))]
    return init_soft_prompts(
        ids, torch.ones(m, length, dtype=torch.long), embedding_matrix, labels=labels, teacher=teacher
    )


# --------------------------------------------------------------------------- plumbing


def _input_embeddings(model: nn.Module) -> Tensor:
    return unwrap_model(model).get_input_embeddings().weight


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Raise unless student and teacher share the vocabulary and the input-embedding width."""
    hs, ht = _input_embeddings(student).shape[1], _input_embeddings(teacher).shape[1]
    vs, vt = output_head(student).weight.shape[0], output_head(teacher).weight.shape[0]
    if hs != ht:
        raise PotstillError(
            f"student embedding width {hs} != teacher's {ht}, and both read the same soft prompts; "
            "use a student with the teacher's hidden size (e.g. layers pruned from the teacher)"
        )
    if vs != vt:
        raise VocabMismatchError(
            f"student has {vs} vocab rows and teacher {vt}; soft labels need one vocabulary: "
            "give the student the teacher's tokenizer and vocab size"
        )


def _lm_logits(
    model: nn.Module,
    embeds: Tensor | None,
    mask: Tensor,
    params: dict[str, Tensor] | None = None,
    ids: Tensor | None = None,
) -> Tensor:
    kw = {
        "attention_mask": mask,
        "use_cache": False,
        **({"input_ids": ids} if ids is not None else {"inputs_embeds": embeds}),
    }
    out = model(**kw) if params is None else functional_call(model, params, args=(), kwargs=kw, strict=False)
    return out.logits


def kd_loss(student_logits: Tensor, target_logits: Tensor, mask: Tensor) -> Tensor:
    """Forward KL ``KL(softmax(target) || softmax(student))`` averaged over positions with ``mask [B, T] == 1``."""
    m = mask.float()
    return (forward_kl(student_logits, target_logits) * m).sum() / m.sum().clamp_min(1.0)


def _batches(data) -> list[Batch]:
    """One batch (a dict with input_ids/attention_mask, or a pair) or a sequence of them -> list of pairs."""
    if isinstance(data, dict) or (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor)):
        data = [data]
    out = [(b["input_ids"], b["attention_mask"]) if isinstance(b, dict) else tuple(b) for b in data]
    if not out:
        raise PotstillError("no real batches given; pass (input_ids, attention_mask) pairs or tokenizer outputs")
    return [(i.long(), a.long()) for i, a in out]


def _param_names(student: nn.Module, params: Sequence[str] | None) -> list[str]:
    emb = _input_embeddings(student)
    tied = {n for n, p in student.named_parameters() if p is emb}
    names = select_params(student, params)
    if params is not None and tied & set(names):
        raise PotstillError(f"{sorted(tied)} is the input embedding, which soft prompts bypass; leave it out of params")
    return [n for n in names if n not in tied]


@contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    # D differentiates gradients, and SDPA's fused CPU kernel has no double backward.
    base = unwrap_model(model)
    impl = getattr(base.config, "_attn_implementation", None)
    switch = impl not in (None, "eager") and hasattr(base, "set_attn_implementation")
    if switch:
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            base.set_attn_implementation(impl)


def lm_gradient_distance(
    student: nn.Module,
    theta: dict[str, Tensor],
    teacher: nn.Module,
    real: Batch,
    embeds: Tensor,
    mask: Tensor,
    target_logits: Tensor | None = None,
    *,
    create_graph: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """``D(grad_theta L(theta; S), grad_theta L(theta; B))`` (Zhao et al. 2021, eq. 10) for one real batch.

    ``embeds [m, L, H]``/``mask [m, L]`` is the synthetic side, ``target_logits [m, L, V]`` its
    labels (default: the frozen teacher on ``embeds``, differentiable w.r.t. ``embeds``, so that a
    step on the embeddings sees how it moves their labels too); differentiable w.r.t. both when
    ``create_graph``. Call it with student and teacher frozen (as :func:`condense_lm` does).
    """
    ids, rmask = real
    with torch.no_grad():
        t_real = _lm_logits(teacher, None, rmask, ids=ids)
    if target_logits is None:
        with torch.set_grad_enabled(create_graph):
            target_logits = _lm_logits(teacher, embeds if create_graph else embeds.detach(), mask)
    tensors = list(theta.values())
    g_real = torch.autograd.grad(kd_loss(_lm_logits(student, None, rmask, theta, ids=ids), t_real, rmask), tensors)
    g_syn = torch.autograd.grad(
        kd_loss(_lm_logits(student, embeds, mask, theta), target_logits, mask), tensors, create_graph=create_graph
    )
    return gradient_distance(g_syn, [g.detach() for g in g_real], eps=eps)


# --------------------------------------------------------------------------- condensation


def condense_lm(
    student: nn.Module,
    teacher: nn.Module,
    real_batches,
    syn: SoftPromptSet,
    *,
    outer_steps: int = 100,
    inner_steps: int = 1,
    net_steps: int = 1,
    lr_embed: float = 1e-3,
    lr_label: float = 1e-2,
    lr_net: float = 1e-2,
    params: Sequence[str] | None = None,
    init_fn: Callable[[int], dict[str, Tensor]] | None = None,
    n_inits: int | None = None,
    reg_weight: float = 0.0,
    reg_kind: str = "cosine",
    candidates: Tensor | None = None,
    embedding_matrix: Tensor | None = None,
    eps: float = 1e-12,
    seed: int = 0,
    callback: Callable[[int, dict], None] | None = None,
) -> SoftPromptSet:
    """Gradient matching (Zhao et al. 2021, Alg. 1) of the KD loss into ``syn``; returns a new set.

    Per outer step: ``theta = init_fn(seed_k)`` on ``params`` (default
    :func:`~potstill.dd.condense.fresh_init`; fresh per step, or cycling through ``n_inits``);
    then ``inner_steps`` times: ``D`` (:func:`lm_gradient_distance`) on the next real batch
    (``real_batches`` cycled) plus ``reg_weight * latent_regularizer(kind=reg_kind)`` toward
    ``embedding_matrix`` (default: the student's input embeddings); one Adam step on the
    embeddings (``lr_embed``, learned positions only) and learned labels (``lr_label``); then
    ``net_steps`` SGD steps (``lr_net``) of theta on the set (not after the last inner step).
    ``history``: ``match``/``reg`` (means per outer step), ``time_s`` (since the start).
    Match under the init distribution of the student to be trained (e.g. HF's normal(0, 0.02)).

    ``eps`` guards the cosine in ``D``. Zhao et al.'s 1e-6 is too large here: an lm_head row's
    gradient shrinks with the vocabulary, and on a 400-token vocab the guard, not the angle, made
    about half of each row's term (``D`` of a set with itself was 17 at 1e-6, 1e-5 at 1e-12).
    """
    check_pair(student, teacher)
    batches = _batches(real_batches)
    names = _param_names(student, params)
    E = (embedding_matrix if embedding_matrix is not None else _input_embeddings(student)).detach()
    _warn_if_embeddings_differ(student, teacher)
    init_fn = init_fn or fresh_init(student)
    x, y, opt = _prompt_leaves(syn, lr_embed, lr_label)
    mask, learn = syn.attention_mask, syn.learn_mask
    hist: dict[str, list[float]] = {"match": [], "reg": [], "time_s": []}
    t0, step = time.perf_counter(), 0
    with frozen(student, teacher), _eager(student), _eager(teacher):
        for k in range(outer_steps):
            init_seed = seed * 100_003 + (k % n_inits if n_inits else k)
            theta = {n: v.detach().clone().requires_grad_(True) for n, v in init_fn(init_seed).items() if n in names}
            ds, rs = [], []
            for t in range(inner_steps):
                match = lm_gradient_distance(student, theta, teacher, batches[step % len(batches)], x, mask, y, eps=eps)
                step += 1
                reg = _regularizer(x, E, learn, reg_weight, reg_kind, candidates)
                opt.zero_grad(set_to_none=True)
                (match + reg).backward()
                x.grad.mul_(learn[..., None])
                opt.step()
                ds.append(float(match.detach()))
                rs.append(float(reg.detach()))
                if t == inner_steps - 1:
                    break
                theta = _train_on_prompts(student, teacher, theta, x, y, mask, net_steps, lr_net)
            _log_outer(hist, k, t0, callback, ds, rs)
    settings = locals()
    meta = {"method": "gradient_matching_lm", "params": names, **{key: settings[key] for key in _LM_META}}
    return replace(
        syn,
        embeddings=x.detach().clone(),
        label_logits=None if y is None else y.detach().clone(),
        meta={**syn.meta, **meta, "real_batches": len(batches)},
        history=hist,
    )


_LM_META = (
    "outer_steps",
    "inner_steps",
    "net_steps",
    "lr_embed",
    "lr_label",
    "lr_net",
    "n_inits",
    "reg_weight",
    "reg_kind",
    "eps",
    "seed",
)
"""The settings :func:`condense_lm` records in ``meta`` (after ``method`` and ``params``, before ``real_batches``)."""


def _log_outer(
    hist: dict[str, list[float]],
    k: int,
    t0: float,
    callback: Callable[[int, dict], None] | None,
    ds: list[float],
    rs: list[float],
) -> None:
    """Record outer step ``k``: mean match and regularizer of its inner steps, time since ``t0``."""
    hist["match"].append(sum(ds) / len(ds))
    hist["reg"].append(sum(rs) / len(rs))
    hist["time_s"].append(time.perf_counter() - t0)
    if callback is not None:
        callback(k, {key: v[-1] for key, v in hist.items()})


def _regularizer(x: Tensor, E: Tensor, learn: Tensor, weight: float, kind: str, candidates: Tensor | None) -> Tensor:
    """``weight * latent_regularizer`` of the learned positions (a zero scalar when ``weight <= 0``)."""
    if weight <= 0:
        return x.new_zeros(())
    return weight * latent_regularizer(x, E, mask=learn, kind=kind, candidates=candidates)


def _warn_if_embeddings_differ(student: nn.Module, teacher: nn.Module) -> None:
    if not torch.equal(_input_embeddings(student), _input_embeddings(teacher)):
        warnings.warn(
            "student and teacher input embeddings differ; the teacher labels the soft prompts as read "
            "in the student's embedding space",
            stacklevel=3,
        )


def _prompt_leaves(
    syn: SoftPromptSet, lr_embed: float, lr_label: float
) -> tuple[Tensor, Tensor | None, torch.optim.Optimizer]:
    """The learnable copies of the embeddings and (``labels="learned"``) label logits, and their Adam."""
    learned = syn.labels == "learned"
    x = syn.embeddings.detach().clone().requires_grad_(True)
    y = syn.label_logits.detach().clone().requires_grad_(True) if learned else None
    opt = torch.optim.Adam([{"params": [x], "lr": lr_embed}] + ([{"params": [y], "lr": lr_label}] if learned else []))
    return x, y, opt


def _train_on_prompts(
    student: nn.Module,
    teacher: nn.Module,
    theta: dict[str, Tensor],
    x: Tensor,
    y: Tensor | None,
    mask: Tensor,
    net_steps: int,
    lr_net: float,
) -> dict[str, Tensor]:
    """``net_steps`` SGD steps (``lr_net``) of ``theta`` on the set: KD toward the learned labels, or the
    teacher's logits on the prompts (no graph kept)."""
    with torch.no_grad():
        xs = x.detach()
        ts = y.detach() if y is not None else _lm_logits(teacher, xs, mask)
    for _ in range(net_steps):
        loss = kd_loss(_lm_logits(student, xs, mask, theta), ts, mask)
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {n: (theta[n] - lr_net * g).detach().requires_grad_(True) for n, g in zip(theta, grads)}
    return theta


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def lm_forward_kl(student: nn.Module, teacher: nn.Module, batches) -> float:
    """Forward KL(teacher || student) per token, averaged over every non-padding token of ``batches``."""
    total, count = 0.0, 0.0
    with frozen(student, teacher):
        for ids, mask in _batches(batches):
            kl = forward_kl(_lm_logits(student, None, mask, ids=ids), _lm_logits(teacher, None, mask, ids=ids))
            total, count = total + float((kl * mask).sum()), count + float(mask.sum())
    return total / max(count, 1.0)


def evaluate_lm_set(
    student_init: nn.Module,
    teacher: nn.Module,
    train_set,
    eval_batches,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int | None = None,
    params: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train a copy of ``student_init`` on ``train_set``; return its held-out forward KL to the teacher.

    ``train_set``: a :class:`SoftPromptSet` (its soft labels) or real ``(input_ids,
    attention_mask)`` (the teacher's logits on them), so that a condensed set and a random real
    subset of the same size get the same training: ``steps`` Adam steps (``lr``) on the KD loss,
    full batch or seeded minibatches of ``batch_size``, on ``params`` (default: all but the input
    embedding, which soft prompts cannot train). Returns ``forward_kl`` (after training),
    ``forward_kl_init`` (before) and ``time_s``.
    """
    check_pair(student_init, teacher)
    model = copy.deepcopy(student_init)
    if isinstance(train_set, SoftPromptSet):
        ids, (embeds, mask) = None, (train_set.embeddings.detach(), train_set.attention_mask)
        targets = train_set.target_logits(teacher)
    else:
        (ids, mask), embeds = _batches(train_set)[0], None
        with frozen(teacher), torch.no_grad():
            targets = _lm_logits(teacher, None, mask, ids=ids).float()
    names = set(_param_names(model, params))
    before, t0 = lm_forward_kl(model, teacher, eval_batches), time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    with frozen(model):
        trained = [p.requires_grad_(True) for n, p in model.named_parameters() if n in names]
        opt = torch.optim.Adam(trained, lr=lr)
        for _ in range(steps):
            idx = torch.randperm(mask.shape[0], generator=gen)[:batch_size] if batch_size else slice(None)
            logits = _lm_logits(
                model, None if embeds is None else embeds[idx], mask[idx], ids=None if ids is None else ids[idx]
            )
            opt.zero_grad(set_to_none=True)
            kd_loss(logits, targets[idx], mask[idx]).backward()
            opt.step()
    return {
        "forward_kl": lm_forward_kl(model, teacher, eval_batches),
        "forward_kl_init": before,
        "time_s": time.perf_counter() - t0,
    }
