"""The chunked reducer: CE + distillation loss over the lm_head without ``[n, V]`` logits.

This is the one place where masking (``labels == -100``) and normalization live, and
the one loop that walks rows in chunks. For each chunk of rows it projects the
student's hidden states through the head, gets the teacher's logits for the same rows,
computes the chunk's loss and, right away, the gradients w.r.t. the hidden chunk and
the head's weight/bias; the chunk's logits are then dropped. The gradients are stored
and handed out in ``backward`` scaled by the incoming gradient (the fused-linear
pattern of Liger-Kernel, written for arbitrary teacher signals and divergences).

Loss (Hinton et al. 2015, eq. 1 with GKD/DistiLLM divergences in place of KL)::

    loss = (alpha * sum_i CE_i + (1 - alpha) * s * sum_i D_i) / normalizer,   s = T^2 if scale_t2 else 1

summed over rows with ``labels != -100``. ``normalizer`` is the *global* number of valid
tokens across gradient-accumulation micro-batches and processes, so that accumulated
gradients equal those of one big batch (TRL #4719).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import full_tensor
from ..errors import PotstillError
from ..signals.types import DenseSignal, Head, SparseSignal, apply_head
from .dense import DIVERGENCES, akl_head_weight, get_divergence
from .sparse import bucket_teacher, check_signal, sparse_divergence

IGNORE_INDEX = -100


@dataclass
class _Plan:
    """Everything the chunk loop needs besides the differentiable tensors."""

    labels: Tensor
    teacher: DenseSignal | SparseSignal | None
    divergence: str
    divergence_kwargs: dict
    alpha: float
    temperature: float
    kd_scale: float
    vocab: int
    logit_scale: float | None
    softcap: float | None
    chunk_size: int
    kd_weights: Tensor | None = None
    row_kwargs: dict | None = None  # per-row divergence parameters, each [n]


def _row_params(plan: _Plan, start: int, end: int, rows: Tensor | None) -> dict:
    """The divergence's parameters for rows ``start:end`` (then ``rows``): per-row ones as ``[m, 1]``."""
    if not plan.row_kwargs:
        return plan.divergence_kwargs
    out = dict(plan.divergence_kwargs)
    for k, v in plan.row_kwargs.items():
        v = v[start:end] if rows is None else v[start:end][rows]
        out[k] = v.unsqueeze(-1)
    return out


def _validate(
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    teacher: DenseSignal | SparseSignal | None,
    divergence: str,
    alpha: float,
    temperature: float,
    normalizer: float | Tensor,
    chunk_size: int,
    vocab_size: int | None,
) -> int:
    """Raise ``ValueError`` on inconsistent inputs; return the aligned vocabulary size."""
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be [n, H] (valid rows only), got {tuple(student_hidden.shape)}")
    n, hidden = student_hidden.shape
    if student_head.weight.dim() != 2 or student_head.weight.shape[1] != hidden:
        raise ValueError(f"student head weight {tuple(student_head.weight.shape)} does not match hidden size {hidden}")
    if labels.shape != (n,):
        raise ValueError(f"labels must be [n] = [{n}], got {tuple(labels.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the CE weight) must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not isinstance(normalizer, Tensor) and normalizer < 0:
        raise ValueError(f"normalizer must be >= 0 (the global count of valid tokens), got {normalizer}")
    vocab = student_head.vocab if vocab_size is None else vocab_size
    if vocab > student_head.weight.shape[0]:
        raise ValueError(f"vocab_size {vocab} exceeds the student head's {student_head.weight.shape[0]} rows")
    if n and bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"labels must be -100 or lie in [0, {vocab})")
    if alpha == 1.0:
        return vocab
    if teacher is None:
        raise ValueError("a teacher signal is required when alpha < 1 (alpha=1 is plain cross-entropy)")
    get_divergence(divergence)
    if teacher.num_rows != n:
        raise ValueError(f"teacher has {teacher.num_rows} rows but the student has {n}; rows must align")
    if isinstance(teacher, DenseSignal):
        tv = teacher.logits.shape[-1] if teacher.logits is not None else teacher.head.weight.shape[0]
        if tv < vocab or (vocab_size is None and teacher.vocab != vocab):
            raise ValueError(
                f"teacher vocabulary ({teacher.vocab}) and student vocabulary ({vocab}) differ; "
                "pass vocab_size= to align vocabularies that differ only by padding rows"
            )
    elif teacher.ids.shape != teacher.logprobs.shape or teacher.ids.dim() != 2:
        raise ValueError(
            f"sparse teacher ids {tuple(teacher.ids.shape)} and logprobs "
            f"{tuple(teacher.logprobs.shape)} must both be [n, k]"
        )
    elif teacher.weights is not None and teacher.weights.shape != teacher.ids.shape:
        raise ValueError(
            f"sampled teacher weights {tuple(teacher.weights.shape)} must match ids {tuple(teacher.ids.shape)}"
        )
    elif teacher.tail_logprob is not None and tuple(teacher.tail_logprob.shape) != (n,):
        raise ValueError(f"sparse teacher tail_logprob {tuple(teacher.tail_logprob.shape)} must be [n] = [{n}]")
    return vocab


def _teacher_chunk(plan: _Plan, start: int, end: int, rows: Tensor | None):
    """The teacher for rows ``start:end`` (then ``rows`` within them); non-finite check."""
    teacher = plan.teacher
    if isinstance(teacher, DenseSignal):
        t = teacher.chunk_logits(start, end, plan.vocab)
        if rows is not None:
            t = t[rows]
        # A row's max and min are non-finite exactly when one of its entries is (NaN propagates
        # through both): two reductions instead of a [chunk, V] boolean tensor.
        bad = ~(torch.isfinite(t.amax(-1)) & torch.isfinite(t.amin(-1)))
    else:
        t = teacher.chunk(start, end)
        if rows is not None:
            t = t.rows(rows)
        bad = _sparse_bad(t)
    return t, bad


def _sparse_bad(t: SparseSignal) -> Tensor:
    """Rows ``[n]`` whose log-probs (or tail log-prob) are NaN or +inf."""
    bad = torch.isnan(t.logprobs).any(-1) | torch.isposinf(t.logprobs).any(-1)
    if t.tail_logprob is not None:
        bad = bad | torch.isnan(t.tail_logprob) | torch.isposinf(t.tail_logprob)
    return bad


def _raise_nonfinite(start: int, bad: Tensor, rows: Tensor | None) -> None:
    first = int(bad.nonzero()[0, 0])
    row = start + (int(rows[first]) if rows is not None else first)
    raise PotstillError(f"teacher logits contain NaN/inf at row {row}; check the teacher model/dtype (try float32)")


def _chunk_loss(
    plan: _Plan,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    teacher,
    w: Tensor | None = None,
    params: dict | None = None,
):
    """Sum of CE and of the (``w``-weighted) divergence over the chunk's rows (all valid), float32."""
    params = plan.divergence_kwargs if params is None else params
    logits = apply_head(hidden, weight, bias, plan.logit_scale, plan.softcap)
    # CE is always reported; it only enters the graph when it has weight.
    with nullcontext() if plan.alpha > 0.0 else torch.no_grad():
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
    kd = torch.zeros((), dtype=torch.float32, device=logits.device)
    if plan.alpha < 1.0:
        if isinstance(teacher, Tensor):
            div = DIVERGENCES[plan.divergence](logits, teacher, temperature=plan.temperature, **params)
        else:
            div = sparse_divergence(plan.divergence, logits, teacher, temperature=plan.temperature, **params)
        kd = div.float().sum() if w is None else (div.float() * w).sum()
    total = plan.alpha * ce + (1.0 - plan.alpha) * plan.kd_scale * kd
    return total, ce, kd


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
def _closed_form_chunk(
    plan: _Plan,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    teacher: Tensor | SparseSignal | None,
    grad_h: Tensor | None,
    grad_w: Tensor | None,
    grad_b: Tensor | None,
    start: int,
    end: int,
    rows: Tensor | None,
    w: Tensor | None = None,
):
    """CE + a :data:`CLOSED_FORM` divergence (dense teacher) or a :data:`SPARSE_CLOSED_FORM`
    one (sparse teacher) for one chunk, with its gradient written out.

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
    g = None
    folded = False  # the CE softmax already added into g
    if plan.alpha < 1.0 and isinstance(teacher, SparseSignal):
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
        kd = values.sum()
    elif plan.alpha < 1.0:
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
    else:
        kd = torch.zeros((), dtype=torch.float32, device=h.device)
    if folded:
        g[c, y] -= plan.alpha
    elif plan.alpha > 0:
        sm = ls1.exp_()  # the divergence is done with the log-probs: reuse their memory
        if g is None:
            g = sm if plan.alpha == 1.0 else sm.mul_(plan.alpha)
        else:
            g.add_(sm, alpha=plan.alpha)
        g[c, y] -= plan.alpha
    del ls, ls1
    total = plan.alpha * ce + (1.0 - plan.alpha) * plan.kd_scale * kd
    g = g.to(weight.dtype)
    if grad_h is not None:
        gh = g @ weight
        if rows is None:
            grad_h[start:end] = gh
        else:
            grad_h[start:end].index_copy_(0, rows, gh)
    if grad_w is not None:
        grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype))
    if grad_b is not None:
        grad_b += g.sum(0).to(grad_b.dtype)
    return total, ce, kd


def _exact_rows(
    plan: _Plan,
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


def _accumulator(t: Tensor) -> Tensor:
    return torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)


def _run_chunks(plan: _Plan, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool]):
    """Walk the rows; return sums (total, ce, kd, n_tokens) and the unnormalized gradients."""
    n = hidden.shape[0]
    device = hidden.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    total_sum, ce_sum, kd_sum, n_tokens = zero, zero, zero, zero
    need_h, need_w, need_b = need
    any_grad = need_h or need_w or need_b
    grad_h = torch.zeros_like(hidden) if need_h else None
    # Head gradients are summed over chunks in (at least) float32 so that bf16 rounding
    # does not pile up; backward casts them to the head's dtype.
    grad_w = _accumulator(weight) if need_w else None
    grad_b = _accumulator(bias) if (need_b and bias is not None) else None
    w_leaf = weight.detach().requires_grad_(need_w)
    b_leaf = None if bias is None else bias.detach().requires_grad_(need_b)
    use_teacher = plan.alpha < 1.0
    # The most common case gets its gradient in closed form instead of through autograd.
    plain_head = plan.softcap is None and plan.logit_scale in (None, 1.0)
    sparse = isinstance(plan.teacher, SparseSignal)
    fast = (
        any_grad
        and plain_head
        and not plan.row_kwargs
        and (
            plan.alpha == 1.0
            or (plan.divergence in CLOSED_FORM and isinstance(plan.teacher, DenseSignal))
            or (plan.divergence in SPARSE_CLOSED_FORM and sparse)
        )
    )
    if fast and use_teacher and sparse:
        # The closed form skips coarsen's checks: run them once on the rows that count.
        keep = (plan.labels != IGNORE_INDEX).nonzero().squeeze(-1)
        check_signal(plan.teacher.rows(keep), keep.numel(), plan.vocab)
    bad_chunks: list[tuple[int, Tensor, Tensor | None]] = []

    for start in range(0, n, plan.chunk_size):
        end = min(start + plan.chunk_size, n)
        labels = plan.labels[start:end]
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        if count == 0:
            continue
        rows = None if count == end - start else valid.nonzero().squeeze(-1)
        h = hidden[start:end] if rows is None else hidden[start:end][rows]
        y = labels if rows is None else labels[rows]
        teacher = None
        w = None
        if use_teacher:
            teacher, bad = _teacher_chunk(plan, start, end, rows)
            bad_chunks.append((start, bad, rows))
            if plan.kd_weights is not None:
                w = plan.kd_weights[start:end] if rows is None else plan.kd_weights[start:end][rows]
        if fast:
            total, ce, kd = _closed_form_chunk(
                plan, h, weight, bias, y, teacher, grad_h, grad_w, grad_b, start, end, rows, w
            )
            total_sum = total_sum + total
            ce_sum = ce_sum + ce
            kd_sum = kd_sum + kd
            n_tokens = n_tokens + count
            continue
        h_leaf = h.detach().requires_grad_(need_h)
        with torch.enable_grad() if any_grad else torch.no_grad():
            params = _row_params(plan, start, end, rows) if use_teacher else None
            total, ce, kd = _chunk_loss(plan, h_leaf, w_leaf, b_leaf, y, teacher, w, params)
            if any_grad and total.requires_grad:
                inputs = [t for t, want in ((h_leaf, need_h), (w_leaf, need_w), (b_leaf, need_b)) if want]
                grads = list(torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True))
                if need_h:
                    g = grads.pop(0)
                    if rows is None:
                        grad_h[start:end] = g
                    else:
                        grad_h[start:end].index_copy_(0, rows, g)
                if need_w:
                    grad_w += grads.pop(0)
                if need_b and bias is not None:
                    grad_b += grads.pop(0)
        total_sum = total_sum + total.detach()
        ce_sum = ce_sum + ce.detach()
        kd_sum = kd_sum + kd.detach()
        n_tokens = n_tokens + count

    if bad_chunks:
        flags = torch.stack([bad.any() for _, bad, _ in bad_chunks])
        if bool(flags.any()):
            start, bad, rows = bad_chunks[int(flags.nonzero()[0, 0])]
            _raise_nonfinite(start, bad, rows)
    return total_sum, ce_sum, kd_sum, n_tokens, (grad_h, grad_w, grad_b)


class _ChunkedKDFunction(torch.autograd.Function):
    """Forward walks the chunks and computes the gradients; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, norm, plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        total, ce, kd, n_tok, (gh, gw, gb) = _run_chunks(plan, hidden, weight, bias, need)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (gh, gw, gb)), norm)
        ctx.has = tuple(g is not None for g in (gh, gw, gb))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(ce, kd, n_tok)
        return total / norm, ce, kd, n_tok

    @staticmethod
    def backward(ctx, grad_loss, *_):
        gh, gw, gb, norm = ctx.saved_tensors
        # Scale in float32, then return each gradient in its input's dtype.
        scale = grad_loss.float() / norm
        out = [
            (g.float() * scale).to(dtype) if has else None for g, has, dtype in zip((gh, gw, gb), ctx.has, ctx.dtypes)
        ]
        return out[0], out[1], out[2], None, None


def _check_weights(w: Tensor | None, n: int) -> Tensor | None:
    if w is None:
        return None
    if w.shape != (n,):
        raise ValueError(f"kd_weights must be [n] = [{n}] (one per row), got {tuple(w.shape)}")
    w = w.detach().float()
    if n and not bool(torch.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("kd_weights must be finite and >= 0")
    return w


def _check_row_kwargs(row_kwargs: dict | None, n: int, teacher) -> dict | None:
    if not row_kwargs:
        return None
    if not isinstance(teacher, DenseSignal):
        raise ValueError("row_divergence_kwargs need a dense teacher (the sparse divergences take scalars)")
    out = {}
    for k, v in row_kwargs.items():
        if v.shape != (n,):
            raise ValueError(f"row_divergence_kwargs['{k}'] must be [n] = [{n}] (one per row), got {tuple(v.shape)}")
        v = v.detach().float()
        if n and not bool(torch.isfinite(v).all()):
            raise ValueError(f"row_divergence_kwargs['{k}'] must be finite")
        out[k] = v
    return out


def full_head(head: Head) -> Head:
    """``head`` with its weight and bias whole on every rank (a collective when they are sharded).

    Under FSDP2 (``fully_shard``) a parameter is a sharded ``DTensor`` whenever its unit is not
    all-gathered: always for a frozen teacher whose head was read at construction (``OnlineTeacher``),
    and for a student whose lm_head unit reshards after forward (``reshard_after_forward=True`` given
    explicitly on the root, as accelerate does, or lm_head as a unit of its own). Only a root left at
    FSDP2's default keeps its parameters unsharded after forward; then the head is a plain tensor here
    and FSDP's own reduce-scatter handles its gradient. The reducer runs *after* the model's forward,
    on hidden states, so it cannot rely on FSDP's forward-time unshard. Gathering explicitly (rather
    than calling the owning unit's ``unshard()`` / ``reshard()``) needs no knowledge of which unit
    holds the head, works the same for the teacher under ``no_grad``, and is released with the step. Gathering the ``[V, H]`` head once per call (here, before the chunk
    loop, on every rank) is the one collective the reducer needs: per-chunk gathers would deadlock when
    ranks have different numbers of chunks, and both models' ``[tokens, V]`` logits are still never
    built. The student's gradient flows back to its shard (:func:`potstill.distributed.full_tensor`);
    the teacher's gather keeps no graph. Plain tensors pass through: the same ``Head`` object is returned.
    """
    weight = full_tensor(head.weight)
    bias = None if head.bias is None else full_tensor(head.bias)
    if weight is head.weight and bias is head.bias:
        return head
    return replace(head, weight=weight, bias=bias)


def full_teacher(teacher, alpha: float):
    """A dense teacher given as hidden states + head, with its head gathered (see :func:`full_head`)."""
    if alpha >= 1.0 or not isinstance(teacher, DenseSignal) or teacher.head is None:
        return teacher
    head = full_head(teacher.head)
    return teacher if head is teacher.head else DenseSignal(hidden=teacher.hidden, head=head)


def _prepare(student_head: Head, vocab: int, normalizer, device):
    weight, bias = student_head.with_vocab(vocab).sliced()
    norm = torch.as_tensor(normalizer, dtype=torch.float32, device=device).detach()
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return weight, bias, norm


def chunked_kd_loss(
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    teacher: DenseSignal | SparseSignal | None,
    *,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    scale_t2: bool = False,
    normalizer: float | Tensor,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    kd_weights: Tensor | None = None,
    row_divergence_kwargs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE + distillation loss over the student's head, chunk by chunk.

    Args:
        student_hidden: ``[n, H]`` final hidden states of the valid token positions.
        student_head: the student's :class:`Head` (trainable, tied, or frozen); a head sharded by
            FSDP2 (``DTensor``), and a dense teacher's, is gathered once per call (:func:`full_head`).
        labels: ``[n]`` target ids; rows with ``-100`` contribute nothing.
        teacher: same ``n`` rows (``DenseSignal`` logits or hidden+head, or ``SparseSignal``);
            ``None`` only with ``alpha=1`` (pure cross-entropy / SFT).
        divergence: a name of ``DIVERGENCES``; ``divergence_kwargs`` its parameters.
        alpha: CE weight; ``1 - alpha`` weighs the divergence. ``alpha=1`` never touches the teacher.
        temperature: distillation temperature for both sides (a sparse teacher's log-probs are
            taken as already at it); CE is always at T=1.
        scale_t2: multiply the divergence term by ``T^2`` (Hinton et al. 2015).
        normalizer: the global number of valid tokens (0 is treated as 1).
        chunk_size: rows per chunk; peak memory is O(chunk_size * V).
        vocab_size: aligned vocabulary; slices the student head and the teacher to it.
        kd_weights: optional ``[n]`` non-negative per-row weights of the divergence (token
            weighting: uncertainty-aware, selective or cross-tokenizer-aligned KD); detached,
            CE is never weighted. ``None`` is weight 1 everywhere.
        row_divergence_kwargs: optional divergence parameters given per row, each ``[n]``
            (e.g. DistiLLM-2's per-sequence skew ``alpha``), detached; they override
            ``divergence_kwargs``, reach the divergence as ``[m, 1]`` per chunk, and take the
            autograd path. Dense teachers only.

    Returns:
        ``(loss, stats)``: ``loss`` is a float32 scalar; ``stats`` holds detached float32
        ``ce_sum``, ``kd_sum`` (sum of the divergence, weighted by ``kd_weights`` if given) and ``n_tokens``.
    """
    student_head = full_head(student_head)
    teacher = full_teacher(teacher, alpha)
    vocab = _validate(
        student_hidden,
        student_head,
        labels,
        teacher,
        divergence,
        alpha,
        temperature,
        normalizer,
        chunk_size,
        vocab_size,
    )
    weight, bias, norm = _prepare(student_head, vocab, normalizer, student_hidden.device)
    kd_weights = _check_weights(kd_weights, labels.shape[0])
    row_kwargs = _check_row_kwargs(row_divergence_kwargs, labels.shape[0], teacher) if alpha < 1.0 else None
    plan = _Plan(
        labels=labels,
        teacher=teacher,
        divergence=divergence,
        divergence_kwargs=dict(divergence_kwargs or {}),
        alpha=float(alpha),
        temperature=float(temperature),
        kd_scale=float(temperature) ** 2 if scale_t2 else 1.0,
        vocab=vocab,
        logit_scale=student_head.logit_scale,
        softcap=student_head.softcap,
        chunk_size=int(chunk_size),
        kd_weights=kd_weights,
        row_kwargs=row_kwargs,
    )
    loss, ce, kd, n_tok = _ChunkedKDFunction.apply(student_hidden, weight, bias, norm, plan)
    return loss, {"ce_sum": ce, "kd_sum": kd, "n_tokens": n_tok}


def unchunked_kd_loss(
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    teacher: DenseSignal | SparseSignal | None,
    *,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    scale_t2: bool = False,
    normalizer: float | Tensor,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    kd_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The same loss as :func:`chunked_kd_loss` with full ``[n, V]`` logits and plain autograd.

    For tests and the benchmark's naive arm; ``chunk_size`` is accepted and ignored.
    """
    student_head = full_head(student_head)
    teacher = full_teacher(teacher, alpha)
    vocab = _validate(
        student_hidden,
        student_head,
        labels,
        teacher,
        divergence,
        alpha,
        temperature,
        normalizer,
        chunk_size,
        vocab_size,
    )
    weight, bias, norm = _prepare(student_head, vocab, normalizer, student_hidden.device)
    valid = labels != IGNORE_INDEX
    rows = valid.nonzero().squeeze(-1)
    logits = apply_head(student_hidden[rows], weight, bias, student_head.logit_scale, student_head.softcap)
    y = labels[rows]
    ce = F.cross_entropy(logits.float(), y, reduction="sum")
    kd = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    if alpha < 1.0:
        if isinstance(teacher, DenseSignal):
            t = teacher.chunk_logits(0, teacher.num_rows, vocab)[rows]
            bad = ~torch.isfinite(t).all(-1)
            if bool(bad.any()):
                _raise_nonfinite(0, bad, rows)
            div = DIVERGENCES[divergence](logits, t, temperature=temperature, **(divergence_kwargs or {}))
        else:
            t = teacher.rows(rows)
            bad = _sparse_bad(t)
            if bool(bad.any()):
                _raise_nonfinite(0, bad, rows)
            div = sparse_divergence(divergence, logits, t, temperature=temperature, **(divergence_kwargs or {}))
        kd_weights = _check_weights(kd_weights, labels.shape[0])
        kd = div.float().sum() if kd_weights is None else (div.float() * kd_weights[rows]).sum()
    kd_scale = float(temperature) ** 2 if scale_t2 else 1.0
    total = alpha * ce + (1.0 - alpha) * kd_scale * kd
    stats = {"ce_sum": ce.detach(), "kd_sum": kd.detach(), "n_tokens": valid.sum().float()}
    return total / norm, stats
