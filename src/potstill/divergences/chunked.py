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

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import full_tensor
from ..errors import PotstillError
from ..signals.types import DenseSignal, Head, SparseSignal, apply_head
from .closed_form import CLOSED_FORM, SPARSE_CLOSED_FORM, closed_form_chunk, write_rows
from .dense import get_divergence
from .sparse import check_signal, sparse_divergence

IGNORE_INDEX = -100


@dataclass
class ChunkPlan:
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


def _row_params(plan: ChunkPlan, start: int, end: int, rows: Tensor | None) -> dict:
    """The divergence's parameters for rows ``start:end`` (then ``rows``): per-row ones as ``[m, 1]``."""
    if not plan.row_kwargs:
        return plan.divergence_kwargs
    out = dict(plan.divergence_kwargs)
    for k, v in plan.row_kwargs.items():
        v = v[start:end] if rows is None else v[start:end][rows]
        out[k] = v.unsqueeze(-1)
    return out


def check_mixing(alpha: float, temperature: float, chunk_size: int) -> None:
    """``ValueError`` unless ``alpha`` (the CE weight) is in [0, 1], ``temperature > 0`` and ``chunk_size >= 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the CE weight) must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def loss_normalizer(normalizer: float | Tensor, device) -> Tensor:
    """``normalizer`` as a detached float32 scalar on ``device``, 0 taken as 1."""
    norm = torch.as_tensor(normalizer, dtype=torch.float32, device=device).detach()
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def _validate_student(
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    alpha: float,
    temperature: float,
    normalizer: float | Tensor,
    chunk_size: int,
    vocab_size: int | None,
) -> int:
    """Raise ``ValueError`` on inconsistent student inputs or loss settings; return the aligned vocabulary size."""
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be [n, H] (valid rows only), got {tuple(student_hidden.shape)}")
    n, hidden = student_hidden.shape
    if student_head.weight.dim() != 2 or student_head.weight.shape[1] != hidden:
        raise ValueError(f"student head weight {tuple(student_head.weight.shape)} does not match hidden size {hidden}")
    if labels.shape != (n,):
        raise ValueError(f"labels must be [n] = [{n}], got {tuple(labels.shape)}")
    check_mixing(alpha, temperature, chunk_size)
    if not isinstance(normalizer, Tensor) and normalizer < 0:
        raise ValueError(f"normalizer must be >= 0 (the global count of valid tokens), got {normalizer}")
    vocab = student_head.vocab if vocab_size is None else vocab_size
    if vocab > student_head.weight.shape[0]:
        raise ValueError(f"vocab_size {vocab} exceeds the student head's {student_head.weight.shape[0]} rows")
    if n and bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"labels must be -100 or lie in [0, {vocab})")
    return vocab


def _validate_teacher(
    teacher: DenseSignal | SparseSignal | None, divergence: str, n: int, vocab: int, vocab_size: int | None
) -> None:
    """Raise ``ValueError`` unless ``teacher`` fits the student's ``n`` rows and ``vocab`` (when ``alpha < 1``)."""
    if teacher is None:
        raise ValueError("a teacher signal is required when alpha < 1 (alpha=1 is plain cross-entropy)")
    get_divergence(divergence)
    if teacher.num_rows != n:
        raise ValueError(f"teacher has {teacher.num_rows} rows but the student has {n}; rows must align")
    if isinstance(teacher, DenseSignal):
        if teacher.logits is not None:
            tv = teacher.logits.shape[-1]
        else:
            assert teacher.head is not None  # DenseSignal(hidden=...) always carries its head
            tv = teacher.head.weight.shape[0]
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


def _teacher_chunk(plan: ChunkPlan, start: int, end: int, rows: Tensor | None) -> tuple[Tensor | SparseSignal, Tensor]:
    """The teacher for rows ``start:end`` (then ``rows`` within them); non-finite check."""
    teacher = plan.teacher
    if isinstance(teacher, DenseSignal):
        t = teacher.chunk_logits(start, end, plan.vocab)
        if rows is not None:
            t = t[rows]
        # A row's max and min are non-finite exactly when one of its entries is (NaN propagates
        # through both): two reductions instead of a [chunk, V] boolean tensor.
        bad = ~(torch.isfinite(t.amax(-1)) & torch.isfinite(t.amin(-1)))
        return t, bad
    assert teacher is not None  # only called when alpha < 1, where _validate_teacher requires one
    s = teacher.chunk(start, end)
    if rows is not None:
        s = s.rows(rows)
    return s, _sparse_bad(s)


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
    plan: ChunkPlan,
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
            div = get_divergence(plan.divergence)(logits, teacher, temperature=plan.temperature, **params)
        else:
            div = sparse_divergence(plan.divergence, logits, teacher, temperature=plan.temperature, **params)
        kd = div.float().sum() if w is None else (div.float() * w).sum()
    total = plan.alpha * ce + (1.0 - plan.alpha) * plan.kd_scale * kd
    return total, ce, kd


def _accumulator(t: Tensor) -> Tensor:
    return torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)


def _closed_form_applies(plan: ChunkPlan, any_grad: bool) -> bool:
    """Whether the chunks take :func:`~.closed_form.closed_form_chunk` instead of autograd (the most
    common case: plain head, no per-row parameters, a divergence with a closed-form gradient)."""
    plain_head = plan.softcap is None and plan.logit_scale in (None, 1.0)
    sparse = isinstance(plan.teacher, SparseSignal)
    return (
        any_grad
        and plain_head
        and not plan.row_kwargs
        and (
            plan.alpha == 1.0
            or (plan.divergence in CLOSED_FORM and isinstance(plan.teacher, DenseSignal))
            or (plan.divergence in SPARSE_CLOSED_FORM and sparse)
        )
    )


def _autograd_chunk(plan: ChunkPlan, h, y, teacher, w, leaves, need, grads, span):
    """One chunk through :func:`_chunk_loss` and autograd; its gradients go into ``grads``
    (``grad_h`` at the chunk's rows, see :func:`~.closed_form.write_rows`; ``grad_w``, ``grad_b``
    added). Returns ``(total, ce, kd)``, detached."""
    w_leaf, b_leaf = leaves
    need_h, need_w, need_b = need
    grad_h, grad_w, grad_b = grads
    start, end, rows = span
    any_grad = need_h or need_w or need_b
    h_leaf = h.detach().requires_grad_(need_h)
    with torch.enable_grad() if any_grad else torch.no_grad():
        params = _row_params(plan, start, end, rows) if plan.alpha < 1.0 else None
        total, ce, kd = _chunk_loss(plan, h_leaf, w_leaf, b_leaf, y, teacher, w, params)
        if any_grad and total.requires_grad:
            inputs = [t for t, want in ((h_leaf, need_h), (w_leaf, need_w), (b_leaf, need_b)) if want]
            out = list(torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True))
            if need_h:
                write_rows(grad_h, span, out.pop(0))
            if need_w:
                grad_w += out.pop(0)
            if need_b and b_leaf is not None:
                grad_b += out.pop(0)
    return total.detach(), ce.detach(), kd.detach()


def _check_bad_chunks(bad_chunks: list[tuple[int, Tensor, Tensor | None]]) -> None:
    """Raise on the first chunk whose teacher rows are non-finite (one sync for all chunks)."""
    if bad_chunks:
        flags = torch.stack([bad.any() for _, bad, _ in bad_chunks])
        if bool(flags.any()):
            start, bad, rows = bad_chunks[int(flags.nonzero()[0, 0])]
            _raise_nonfinite(start, bad, rows)


def _run_chunks(plan: ChunkPlan, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool]):
    """Walk the rows; return sums (total, ce, kd, n_tokens) and the unnormalized gradients."""
    n = hidden.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    total_sum, ce_sum, kd_sum, n_tokens = zero, zero, zero, zero
    need_h, need_w, need_b = need
    any_grad = need_h or need_w or need_b
    grad_h = torch.zeros_like(hidden) if need_h else None
    # Head gradients are summed over chunks in (at least) float32 so that bf16 rounding
    # does not pile up; backward casts them to the head's dtype.
    grad_w = _accumulator(weight) if need_w else None
    grad_b = _accumulator(bias) if (need_b and bias is not None) else None
    leaves = (weight.detach().requires_grad_(need_w), None if bias is None else bias.detach().requires_grad_(need_b))
    use_teacher = plan.alpha < 1.0
    # The most common case gets its gradient in closed form instead of through autograd.
    fast = _closed_form_applies(plan, any_grad)
    if fast and use_teacher and isinstance(plan.teacher, SparseSignal):
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
        grads, span = (grad_h, grad_w, grad_b), (start, end, rows)
        if fast:
            total, ce, kd = closed_form_chunk(plan, h, weight, bias, y, teacher, grads, span, w)
        else:
            total, ce, kd = _autograd_chunk(plan, h, y, teacher, w, leaves, need, grads, span)
        total_sum = total_sum + total
        ce_sum = ce_sum + ce
        kd_sum = kd_sum + kd
        n_tokens = n_tokens + count

    _check_bad_chunks(bad_chunks)
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


def _prepare(
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
):
    """Gather sharded heads, validate (``ValueError`` on inconsistent inputs), slice the student head
    to the aligned vocabulary.

    Returns ``(student_head, teacher, vocab, weight, bias, norm)``: the gathered head and teacher,
    the vocabulary size, the sliced head's weight and bias, and the normalizer (0 taken as 1).
    """
    student_head = full_head(student_head)
    teacher = full_teacher(teacher, alpha)
    vocab = _validate_student(
        student_hidden, student_head, labels, alpha, temperature, normalizer, chunk_size, vocab_size
    )
    if alpha != 1.0:
        _validate_teacher(teacher, divergence, student_hidden.shape[0], vocab, vocab_size)
    weight, bias = student_head.with_vocab(vocab).sliced()
    norm = loss_normalizer(normalizer, student_hidden.device)
    return student_head, teacher, vocab, weight, bias, norm


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
    student_head, teacher, vocab, weight, bias, norm = _prepare(
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
    kd_weights = _check_weights(kd_weights, labels.shape[0])
    row_kwargs = _check_row_kwargs(row_divergence_kwargs, labels.shape[0], teacher) if alpha < 1.0 else None
    plan = ChunkPlan(
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
    student_head, teacher, vocab, weight, bias, norm = _prepare(
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
            div = get_divergence(divergence)(logits, t, temperature=temperature, **(divergence_kwargs or {}))
        else:
            s = teacher.rows(rows)
            bad = _sparse_bad(s)
            if bool(bad.any()):
                _raise_nonfinite(0, bad, rows)
            div = sparse_divergence(divergence, logits, s, temperature=temperature, **(divergence_kwargs or {}))
        kd_weights = _check_weights(kd_weights, labels.shape[0])
        kd = div.float().sum() if kd_weights is None else (div.float() * kd_weights[rows]).sum()
    kd_scale = float(temperature) ** 2 if scale_t2 else 1.0
    total = alpha * ce + (1.0 - alpha) * kd_scale * kd
    stats = {"ce_sum": ce.detach(), "kd_sum": kd.detach(), "n_tokens": valid.sum().float()}
    return total / norm, stats
