"""Divergences against a sparse teacher: k token ids per position and their log-probs.

The teacher's full distribution is unknown outside the ids, so both distributions are
mapped onto a smaller outcome space and the ordinary divergence core (``dense.CORES``)
is applied there. ``SparseSignal.tail`` picks the map:

* ``"bucket"``: outcomes are the k ids plus one *tail* outcome holding everything else.
  Teacher tail = ``1 - sum_i p_i`` (as ``log1mexp(logsumexp(lp))``); student tail = the
  student's own mass outside the ids, computed directly as a masked ``logsumexp`` over
  the vocabulary (exact, unlike ``1 - sum q_i`` which cancels when the ids carry almost
  all the mass). This is the exact divergence between two coarsenings of p and q, so by
  the data-processing inequality it never exceeds the dense f-divergence (forward/reverse
  KL, JSD, skew KL, TV). When the ids cover the whole vocabulary the bucket is empty on
  both sides and the result equals the dense divergence.
* ``"renormalize"``: the tail is dropped and both sides are renormalized over the ids
  (DistillKit's top-k). Biased: it ignores the mass outside the ids entirely.

Padding slots (``logprobs = -inf``) are outcomes that exist on neither side: the
student's mass at a padding slot's id is not counted there (it stays in the tail).
Ids in a row must be unique (padding slots excepted); duplicates raise ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..signals.types import SparseSignal
from .dense import Core, get_core, log_probs


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` (Maechler 2012): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))``
    further away; ``x >= 0`` (no mass left, up to rounding) gives ``-inf`` and a zero gradient."""
    inside = x < 0
    xs = torch.where(inside, x, torch.full_like(x, -1.0))
    near = xs > -0.6931471805599453
    out = torch.where(near, torch.log(-torch.expm1(xs)), torch.log1p(-torch.exp(xs)))
    return torch.where(inside, out, torch.full_like(out, float("-inf")))


def _safe_logsumexp(x: Tensor, empty: Tensor) -> Tensor:
    """``logsumexp(x, -1)``, with rows flagged ``empty`` (all ``-inf``) giving ``-inf``
    and a zero (not NaN) gradient."""
    xs = torch.where(empty.unsqueeze(-1), torch.zeros_like(x), x)
    out = torch.logsumexp(xs, dim=-1)
    return torch.where(empty, torch.full_like(out, float("-inf")), out)


def coarsen(
    student_logits: Tensor, signal: SparseSignal, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Map student ``[n, V]`` and teacher ``signal`` onto the sparse outcome space.

    Returns ``(lq, lp)``, both ``[n, k + 1]`` for ``tail="bucket"`` (last column = tail)
    or ``[n, k]`` for ``tail="renormalize"``, in at least float32; padding slots are
    ``-inf`` on both sides.
    """
    ids, lp = signal.ids, signal.logprobs
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [n, V], got {tuple(student_logits.shape)}")
    if ids.shape != lp.shape or ids.dim() != 2 or ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"sparse signal ids {tuple(ids.shape)} and logprobs {tuple(lp.shape)} must both be "
            f"[n, k] with n = {student_logits.shape[0]} (student rows)"
        )
    if signal.tail not in ("bucket", "renormalize"):
        raise ValueError(f"unknown tail mode {signal.tail!r}; choose 'bucket' or 'renormalize'")
    n, vocab = student_logits.shape
    lq_full = log_probs(student_logits, temperature)
    lp = lp.to(torch.promote_types(lq_full.dtype, lp.dtype))
    lq_full = lq_full.to(lp.dtype)
    pad = torch.isneginf(lp)
    ninf = torch.full((), float("-inf"), dtype=lp.dtype, device=lp.device)

    ids_safe = torch.where(pad, torch.zeros_like(ids), ids)
    if ids.numel() and bool(((ids_safe < 0) | (ids_safe >= vocab)).any()):
        raise ValueError(f"sparse signal ids must lie in [0, {vocab}) (the aligned vocabulary)")
    lq = torch.where(pad, ninf, lq_full.gather(-1, ids_safe))

    if signal.tail == "renormalize":
        empty = pad.all(-1)
        lp_r = lp - _safe_logsumexp(lp, empty).unsqueeze(-1)
        lq_r = lq - _safe_logsumexp(lq, empty).unsqueeze(-1)
        # A row without any id has nothing to compare: make both sides "absent" (-> 0).
        lp_r = torch.where(empty.unsqueeze(-1), ninf, lp_r)
        lq_r = torch.where(empty.unsqueeze(-1), ninf, lq_r)
        return lq_r, lp_r

    # Count how often each vocabulary entry is listed (padding slots add 0).
    counts = torch.zeros((n, vocab), dtype=lq_full.dtype, device=lq_full.device)
    counts.scatter_add_(-1, ids_safe, (~pad).to(counts.dtype))
    if counts.numel() and bool((counts > 1).any()):
        raise ValueError("sparse signal has duplicate ids in a row; ids must be unique per position")
    listed = counts > 0
    bucket_empty = listed.all(-1)  # the ids cover the whole vocabulary
    q_tail = _safe_logsumexp(torch.where(listed, ninf, lq_full), bucket_empty)
    p_tail = _log1mexp(_safe_logsumexp(lp, pad.all(-1)))
    # Rounding can leave a sliver of teacher mass when the ids cover every outcome;
    # the bucket holds no outcome then, so its mass is 0 on both sides.
    p_tail = torch.where(bucket_empty, ninf, p_tail)
    return torch.cat([lq, q_tail.unsqueeze(-1)], -1), torch.cat([lp, p_tail.unsqueeze(-1)], -1)


def sparse_divergence(
    name_or_core: str | Core,
    student_logits: Tensor,
    signal: SparseSignal,
    *,
    temperature: float = 1.0,
    **params,
) -> Tensor:
    """A divergence between a sparse teacher and the student, per position.

    ``student_logits [n, V]`` (aligned vocabulary), ``signal`` with ``ids/logprobs [n, k]``
    -> ``[n]``. The student is taken at ``temperature``; ``signal.logprobs`` are taken as
    already at that temperature. ``name_or_core`` is a name of ``DIVERGENCES`` or a core
    ``(lq, lp, **params) -> [...]``; ``params`` go to the core.
    """
    if signal.weights is not None:
        raise NotImplementedError("sampled signals arrive with the cache (issue 3)")
    core = get_core(name_or_core) if isinstance(name_or_core, str) else name_or_core
    lq, lp = coarsen(student_logits, signal, temperature=temperature)
    return core(lq, lp, **params)
