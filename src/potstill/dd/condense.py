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

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import PotstillError
from .condensed_set import (  # the set, its projection, regularizer and files; re-exported (see __all__)
    CondensedSet,
    RealData,
    init_condensed,
    init_from_ids,
    latent_regularizer,
    load_condensed,
    nearest_tokens,
    save_condensed,
    save_set,
    text_candidates,
)

__all__ = [
    "CondensedSet",
    "RealData",
    "fresh_init",
    "frozen",
    "gradient_distance",
    "gradient_matching",
    "init_condensed",
    "init_from_ids",
    "latent_regularizer",
    "load_condensed",
    "nearest_tokens",
    "save_condensed",
    "save_set",
    "select_params",
    "soft_cross_entropy",
    "text_candidates",
    "train_experts",
    "trajectory_matching",
]


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


class frozen:
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


_frozen = frozen  # old name, removed once dd/pipeline.py imports the public one


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


def _set_step(opt: torch.optim.Optimizer, x: Tensor, syn: CondensedSet, loss: Tensor) -> None:
    """One optimizer step on the synthetic leaves; only the learned positions of ``x`` move."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    x.grad.mul_(syn.learn_mask[..., None])
    opt.step()


def _log(hist: dict[str, list[float]], k: int, t0: float, callback: Callable[[int, dict], None] | None, **vals) -> None:
    """Append outer iteration ``k``'s values and the elapsed time to ``hist``; report them to ``callback``."""
    for key, v in vals.items():
        hist[key].append(v)
    hist["time_s"].append(time.perf_counter() - t0)
    if callback is not None:
        callback(k, {key: v[-1] for key, v in hist.items()})


def _meta(method: str, names: list[str], settings: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``{"method", "params", then settings[k] for k in keys}``: what a condensed set records of its run."""
    return {"method": method, "params": names, **{k: settings[k] for k in keys}}


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
    real_by_class, syn_by_class = _class_rows(real, syn)
    gen = torch.Generator().manual_seed(seed)
    x, y, opt = _syn_leaves(syn, learn_labels, lr_embed, lr_label)
    E = embedding_matrix.detach()
    hist: dict[str, list[float]] = {"match": [], "reg": [], "time_s": []}
    t0 = time.perf_counter()
    with frozen(learner, prefix):
        for k in range(iterations):
            init_seed = seed * 100_003 + (k % n_inits if n_inits else k)
            theta = {n: v.detach().clone().requires_grad_(True) for n, v in init_fn(init_seed).items() if n in names}
            ds, rs = [], []
            for t in range(inner_steps):
                h = _prefixed(x, syn.attention_mask, prefix)
                match = x.new_zeros(())
                for c, si in syn_by_class.items():
                    pool = real_by_class[c]
                    pick = pool[torch.randperm(len(pool), generator=gen)[:real_batch]]
                    g_real = _real_gradient(learner, theta, real, pick, E, prefix)
                    loss_s = soft_cross_entropy(
                        _logits(learner, theta, h[si], syn.attention_mask[si]), torch.softmax(y[si], -1)
                    )
                    g_syn = torch.autograd.grad(loss_s, list(theta.values()), create_graph=True)
                    match = match + gradient_distance(g_syn, [g.detach() for g in g_real])
                reg = _reg(x, syn, E, reg_weight, reg_kind, candidates)
                _set_step(opt, x, syn, match + reg)
                ds.append(float(match.detach()))
                rs.append(float(reg.detach()))
                if t == inner_steps - 1:
                    break
                theta = _train_on_set(learner, theta, x, y, syn, prefix, net_steps, lr_net)
            _log(hist, k, t0, callback, match=sum(ds) / len(ds), reg=sum(rs) / len(rs))
    meta = _meta("gradient_matching", names, locals(), _GM_META)
    return _finish(syn, x, y, syn.lr_log, hist, meta)


_GM_META = (
    "iterations",
    "inner_steps",
    "net_steps",
    "real_batch",
    "lr_embed",
    "lr_label",
    "lr_net",
    "learn_labels",
    "n_inits",
    "reg_weight",
    "reg_kind",
    "seed",
)


def _class_rows(real: RealData, syn: CondensedSet) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Row indices of each synthetic class, in the real and in the synthetic set (classes in order)."""
    classes = sorted(int(c) for c in syn.classes.unique())
    real_by_class = {c: torch.nonzero(real.labels == c).flatten() for c in classes}
    for c, idx in real_by_class.items():
        if len(idx) == 0:
            raise PotstillError(f"class {c} has synthetic examples but no real ones; give real data of every class")
    return real_by_class, {c: torch.nonzero(syn.classes == c).flatten() for c in classes}


def _real_gradient(
    learner: nn.Module, theta: dict[str, Tensor], real: RealData, idx: Tensor, E: Tensor, prefix: nn.Module | None
) -> tuple[Tensor, ...]:
    """Gradient of the hard-label CE on real rows ``idx`` with respect to ``theta`` (first order)."""
    re_, rm, rl = _real_batch(real, idx, E, prefix)
    return torch.autograd.grad(F.cross_entropy(_logits(learner, theta, re_, rm).float(), rl), list(theta.values()))


def _train_on_set(
    learner: nn.Module,
    theta: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    syn: CondensedSet,
    prefix: nn.Module | None,
    net_steps: int,
    lr_net: float,
) -> dict[str, Tensor]:
    """``net_steps`` plain SGD steps (``lr_net``) of ``theta`` on the whole synthetic set (no graph kept)."""
    with torch.no_grad():
        hs = _prefixed(x, syn.attention_mask, prefix)
    hs, ps = hs.detach(), torch.softmax(y.detach(), -1)
    for _ in range(net_steps):
        loss = soft_cross_entropy(_logits(learner, theta, hs, syn.attention_mask), ps)
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {n: (v - lr_net * g).detach().requires_grad_(True) for (n, v), g in zip(theta.items(), grads)}
    return theta


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
    with frozen(learner, prefix):
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
    names, max_start = _check_experts(experts, expert_span, max_start)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lr_log = _initial_lr_log(syn, syn_steps if per_step_lr else 1, syn_lr).requires_grad_(learn_lr)
    x, y, opt = _syn_leaves(syn, learn_labels, lr_embed, lr_label, [(lr_log, lr_lr)] if learn_lr else [])
    E = embedding_matrix.detach()
    m = len(syn)
    hist: dict[str, list[float]] = {"match": [], "reg": [], "time_s": [], "lr": []}
    t0 = time.perf_counter()
    with frozen(learner, prefix):
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
            _set_step(opt, x, syn, match + reg)
            lr = float(lr_log.detach().exp().mean())
            _log(hist, k, t0, callback, match=float(match.detach()), reg=float(reg.detach()), lr=lr)
    meta = {**_meta("trajectory_matching", names, locals(), _TM_META), "n_experts": len(experts)}
    return _finish(syn, x, y, lr_log, hist, meta)


_TM_META = (
    "iterations",
    "syn_steps",
    "expert_span",
    "max_start",
    "syn_lr",
    "learn_lr",
    "per_step_lr",
    "lr_embed",
    "lr_label",
    "lr_lr",
    "learn_labels",
    "syn_batch",
    "reg_weight",
    "reg_kind",
    "seed",
)


def _check_experts(
    experts: Sequence[Sequence[dict[str, Tensor]]], expert_span: int, max_start: int | None
) -> tuple[list[str], int]:
    """The matched parameter names and the last start snapshot every expert can match from."""
    if not experts or any(len(e) < expert_span + 1 for e in experts):
        raise PotstillError(f"every expert needs at least expert_span + 1 = {expert_span + 1} snapshots")
    names = list(experts[0][0].keys())
    last = min(len(e) for e in experts) - 1 - expert_span
    max_start = last if max_start is None else min(max_start, last)
    if max_start < 0:
        raise PotstillError(f"max_start={max_start} < 0; use shorter expert_span or longer experts")
    return names, max_start


def _initial_lr_log(syn: CondensedSet, n_lr: int, syn_lr: float) -> Tensor:
    """``n_lr`` log learning rates: the set's own when it has that many, else ``log(syn_lr)`` each."""
    if syn.lr_log is not None and syn.lr_log.numel() == n_lr:
        return syn.lr_log.detach().clone()
    return torch.full((n_lr,), math.log(syn_lr))
