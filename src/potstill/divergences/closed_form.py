"""Closed-form gradients of the chunk loss: the fast path of the chunked reducer.

For the divergences in :data:`CLOSED_FORM` (dense teacher) and :data:`SPARSE_CLOSED_FORM`
(sparse teacher), the gradient of a chunk's loss w.r.t. the student's logits has a short
closed form. :func:`closed_form_chunk` computes it and pushes it through a plain linear
head by hand (the three matmuls autograd would do), skipping autograd's saved
intermediates; :mod:`.chunked` takes this path when it applies and autograd otherwise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..signals.types import SparseSignal
from .dense import akl_head_weight
from .sparse import bucket_teacher, sparse_divergence

if TYPE_CHECKING:
    from .chunked import ChunkPlan


def _fkl_closed(ls: Tensor, lt: Tensor, q: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p || q): per-row values ``[n]`` and ``d/du`` with ``u = z / T``: ``q - p``."""
    return (torch.xlogy(p, p) - p * ls).sum(-1), q.sub_(p)


def _rkl_closed(ls: Tensor, lt: Tensor, q: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """KL(q || p): per-row values and ``d/du_j = q_j (log q_j - log p_j - KL)`` (per row)."""
    d = ls - lt
    row = (q * d).sum(-1, keepdim=True)
    return row.squeeze(-1), q.mul_(d.sub_(row))


def _skl_closed(ls: Tensor, lt: Tensor, q: Tensor, p: Tensor, alpha: float = 0.1) -> tuple[Tensor, Tensor]:
    """DistiLLM's KL(p || m), m = alpha p + (1 - alpha) q: ``d/du = -(1 - alpha) (r - q sum(r))``, r = p q / m."""
    if alpha == 0.0:
        return _fkl_closed(ls, lt, q, p)
    lm = torch.logaddexp(lt + math.log(alpha), ls + math.log1p(-alpha))
    value = (torch.xlogy(p, p) - p * lm).sum(-1)
    r = (lt + ls - lm).exp_()
    g = r.sub_(q * r.sum(-1, keepdim=True)).mul_(-(1.0 - alpha))
    return value, g


def _akl_closed(ls: Tensor, lt: Tensor, q: Tensor, p: Tensor, mu: float = 0.5) -> tuple[Tensor, Tensor]:
    """Wu et al.'s AKL with detached per-row weights w: per-row ``w FKL + (1 - w) RKL`` and its gradient."""
    w = akl_head_weight(ls, lt, mu).unsqueeze(-1)
    d = ls - lt
    rkl = (q * d).sum(-1, keepdim=True)
    fkl = (torch.xlogy(p, p) - p * ls).sum(-1, keepdim=True)
    value = (w * fkl + (1.0 - w) * rkl).squeeze(-1)
    g = q * d.sub_(rkl)  # d RKL / du
    g.mul_(1.0 - w).add_(w * (q - p))
    return value, g


# Divergences whose gradient w.r.t. the student's logits has a short closed form.
CLOSED_FORM = {
    "forward_kl": _fkl_closed,
    "reverse_kl": _rkl_closed,
    "skew_forward_kl": _skl_closed,
    "adaptive_kl": _akl_closed,
}
# ... and those that have one against a sparse teacher.
SPARSE_CLOSED_FORM = ("forward_kl",)


def _sparse_fkl_closed(ls: Tensor, sig: SparseSignal, scale: float, extra: float):
    """Forward KL against a sparse teacher (as :func:`~.sparse.sparse_divergence` defines it).

    ``ls = log_softmax(u) [n, V]``, ``u = z / T``. Returns the per-row values ``[n]``,
    ``g = scale * dD/du + extra * q`` (``q = softmax(u)``) written into ``ls``'s memory, and
    the rows whose student tail underflowed (bucket only; ``None`` otherwise). With S the
    ids of a row:

    * sampled (Anshumann et al. 2025): ``D = sum_i w_i (lp_i - lq_i)``,
      ``dD/du_j = q_j sum_i w_i - sum_{i: id_i = j} w_i``;
    * bucket: ``D = sum_S p_i (lp_i - lq_i) + p_t (log p_t - log q_t)``, ``q_t = sum_{j not in S} q_j``;
      ``dD/du_j = P q_j - p_j`` on S and ``q_j (P - p_t / q_t)`` off S, ``P = sum_S p_i + p_t``
      (1 unless the teacher's rounding left it off);
    * renormalize: ``p~, q~`` renormalized over S; ``dD/du_j = q~_j - p~_j`` on S, 0 off S.
    """
    lp = sig.logprobs.to(ls.dtype)
    pad = torch.isneginf(lp)
    ids = torch.where(pad, torch.zeros_like(sig.ids), sig.ids)
    lq = ls.gather(-1, ids)
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    if sig.weights is not None:
        w = torch.where(pad, zero, sig.weights.to(ls.dtype))
        value = (w * torch.where(pad, zero, lp - lq)).sum(-1)
        g = ls.exp_().mul_((scale * w.sum(-1) + extra).unsqueeze(-1))
        return value, g.scatter_add_(-1, ids, w.mul_(-scale)), None
    if sig.tail == "renormalize":
        lp_r = torch.log_softmax(lp, -1)  # rows without ids give NaN here, masked below
        lq_r = torch.log_softmax(torch.where(pad, lp, lq), -1)
        value = torch.where(pad, zero, lp_r.exp() * (lp_r - lq_r)).sum(-1)
        d = torch.where(pad, zero, lq_r.exp() - lp_r.exp()).mul_(scale)
        g = ls.exp_().mul_(extra) if extra else ls.zero_()
        return value, g.scatter_add_(-1, ids, d), None
    # bucket; ids are unique (checked), so they cover the vocabulary iff there are V of them.
    lp, lp_t = bucket_teacher(lp, pad, sig.tail_logprob, (~pad).sum(-1) == ls.shape[-1])
    p, p_t = lp.exp(), lp_t.exp()
    q = ls.exp_()
    q_s = torch.where(pad, zero, q.gather(-1, ids))
    q.scatter_add_(-1, ids, q_s.neg())  # exactly 0 on S; padding slots add 0
    q_t = q.sum(-1)  # the student's tail, summed directly (1 - sum q_S would cancel)
    live = p_t > 0
    ratio = torch.where(live, p_t / q_t, zero)
    value = torch.where(pad, zero, p * (lp - lq)).sum(-1) + torch.where(live, p_t * (lp_t - q_t.log()), zero)
    big_p = p.sum(-1) + p_t
    g = q.mul_((scale * (big_p - ratio) + extra).unsqueeze(-1))
    g.scatter_add_(-1, ids, torch.where(pad, zero, (scale * big_p + extra).unsqueeze(-1) * q_s - scale * p))
    # Below this the summed tail has lost its relative precision (or is 0): redo those rows exactly.
    fi = torch.finfo(ls.dtype)
    return value, g, live & (q_t < fi.tiny / fi.eps)


@torch.no_grad()
def closed_form_chunk(
    plan: ChunkPlan,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    teacher: Tensor | SparseSignal | None,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    span: tuple[int, int, Tensor | None],
    w: Tensor | None = None,
):
    """CE + a :data:`CLOSED_FORM` divergence (dense teacher) or a :data:`SPARSE_CLOSED_FORM`
    one (sparse teacher) for one chunk, with its gradient written out into ``grads``
    (``grad_h, grad_w, grad_b``, each ``None`` when not needed; see :func:`write_rows` for ``span``).

    With ``z`` the student logits, ``u = z / T`` and ``D`` the divergence summed over rows,
    ``dL/dz = alpha (softmax(z) - onehot(y)) + (1 - alpha) s dD/du / T``, then pushed through
    the linear head by hand (the same three matmuls autograd would do). Skipping autograd
    skips its saved intermediates: fewer passes over the ``[chunk, V]`` tensors, which is
    what a CPU step is bound by. Plain linear heads only (no softcap / logit scale);
    everything else takes the autograd path, and the tests hold both to the same reference.
    """
    T = plan.temperature
    z = F.linear(h, weight, bias).float()
    ls = torch.log_softmax(z / T if T != 1.0 else z, dim=-1)
    c = torch.arange(z.shape[0], device=z.device)
    ls1 = ls if T == 1.0 else torch.log_softmax(z, dim=-1)
    ce = -ls1[c, y].sum()
    del z
    g: Tensor | None = None
    folded = False  # the CE softmax already added into g
    if plan.alpha < 1.0 and isinstance(teacher, SparseSignal):
        kd, g, folded = _sparse_kd_grad(plan, h, weight, bias, teacher, ls, ls1, w)
    elif plan.alpha < 1.0:
        assert isinstance(teacher, Tensor)  # the reducer passes the chunk's teacher logits whenever alpha < 1
        kd, g = _dense_kd_grad(plan, teacher, ls, ls1, w)
    else:
        kd = torch.zeros((), dtype=torch.float32, device=h.device)
    if plan.alpha > 0 and not folded:  # (folded implies alpha > 0)
        sm = ls1.exp_()  # the divergence is done with the log-probs: reuse their memory
        if g is None:
            g = sm if plan.alpha == 1.0 else sm.mul_(plan.alpha)
        else:
            g.add_(sm, alpha=plan.alpha)
    # Set by the divergence when alpha < 1 and by the CE softmax when alpha == 1.
    assert g is not None
    if plan.alpha > 0:
        g[c, y] -= plan.alpha
    del ls, ls1
    total = plan.alpha * ce + (1.0 - plan.alpha) * plan.kd_scale * kd
    _head_grads(g.to(weight.dtype), h, weight, grads, span)
    return total, ce, kd


def _sparse_kd_grad(
    plan: ChunkPlan,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: SparseSignal,
    ls: Tensor,
    ls1: Tensor,
    w: Tensor | None,
) -> tuple[Tensor, Tensor, bool]:
    """The sparse forward KL's summed value, its scaled gradient ``g`` (written into ``ls``'s
    memory) and whether the CE softmax is already folded into ``g``."""
    T = plan.temperature
    scale = (1.0 - plan.alpha) * plan.kd_scale / T
    # At T = 1 the CE softmax is q itself: add it in the same pass (ls1 is ls, consumed here).
    folded = T == 1.0 and plan.alpha > 0
    extra = plan.alpha if folded else 0.0
    src = ls
    if w is not None:  # per-row weights on the divergence only: add the CE softmax below instead
        folded, extra = False, 0.0
        if ls1 is ls and plan.alpha > 0:
            src = ls.clone()  # the closed form writes into its input; CE still needs ls1
    values, g, redo = _sparse_fkl_closed(src, teacher, scale, extra, **plan.divergence_kwargs)
    if redo is not None and bool(redo.any()):
        _exact_rows(plan, redo.nonzero().squeeze(-1), h, weight, bias, teacher, scale, extra, values, g)
    if w is not None:
        values = values * w
        g.mul_(w.unsqueeze(-1))
    return values.sum(), g, folded


def _dense_kd_grad(
    plan: ChunkPlan, teacher: Tensor, ls: Tensor, ls1: Tensor, w: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A :data:`CLOSED_FORM` divergence's summed value and its gradient w.r.t. ``z``, scaled by
    ``(1 - alpha) s / T`` (``ls``'s memory is reused when nothing reads it later)."""
    T = plan.temperature
    tl = teacher.float()
    lt = torch.log_softmax(tl / T if T != 1.0 else tl, dim=-1)
    del tl
    p = lt.exp()
    if plan.divergence == "forward_kl":
        # KL(p || q) = sum p (log p - log q) as one batched dot per row, and d/du = q - p with
        # q written over ls when nothing reads ls later: two [chunk, V] passes fewer.
        values = torch.bmm(p.unsqueeze(1), lt.sub_(ls).unsqueeze(2)).view(-1)
        g = (ls.exp() if plan.alpha > 0 and ls1 is ls else ls.exp_()).sub_(p)
    else:
        values, g = CLOSED_FORM[plan.divergence](ls, lt, ls.exp(), p, **plan.divergence_kwargs)
    del lt, p
    if w is not None:
        values = values * w
        g.mul_(w.unsqueeze(-1))
    kd = values.sum()
    factor = (1.0 - plan.alpha) * plan.kd_scale / T
    if factor != 1.0:
        g.mul_(factor)
    return kd, g


def write_rows(dst: Tensor, span: tuple[int, int, Tensor | None], src: Tensor) -> None:
    """Write a chunk's per-row ``src`` into ``dst``'s rows ``start:end`` (then ``rows`` within them,
    when only some rows of the chunk count); ``span = (start, end, rows)``."""
    start, end, rows = span
    if rows is None:
        dst[start:end] = src
    else:
        dst[start:end].index_copy_(0, rows, src)


def _head_grads(
    g: Tensor, h: Tensor, weight: Tensor, grads: tuple[Tensor | None, Tensor | None, Tensor | None], span
) -> None:
    """Push ``g = dL/dz`` through the linear head: into ``grad_h`` (the chunk's rows, :func:`write_rows`),
    and added into ``grad_w`` and ``grad_b``."""
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        write_rows(grad_h, span, g @ weight)
    if grad_w is not None:
        grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))
    if grad_b is not None:
        grad_b += g.sum(0).to(grad_b.dtype)


def _exact_rows(
    plan: ChunkPlan,
    r: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher: SparseSignal,
    scale: float,
    extra: float,
    values: Tensor,
    g: Tensor,
) -> None:
    """Rows ``r`` of :func:`_sparse_fkl_closed`'s output through the log-space autograd path
    (a student tail below float range: rare, so the common rows keep the fast path)."""
    T = plan.temperature
    z = F.linear(h[r], weight, bias).float()
    with torch.enable_grad():
        u = z.detach().requires_grad_(True)
        d = sparse_divergence(plan.divergence, u, teacher.rows(r), temperature=T, **plan.divergence_kwargs)
        (gz,) = torch.autograd.grad(d.sum(), [u])
    rows = gz.mul_(scale * T)  # dD/du = T dD/dz
    if extra:
        rows.add_(torch.softmax(z, -1), alpha=extra)  # extra is only used at T = 1
    g[r] = rows
    values[r] = d.detach()
