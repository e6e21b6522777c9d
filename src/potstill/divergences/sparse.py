"""Divergences against a sparse teacher: k token ids per position and their log-probs.

**Top-k signals** (``weights is None``). The teacher's distribution is unknown outside the
ids, so both distributions are mapped onto a smaller outcome space (:func:`coarsen`) and
the ordinary divergence core (``dense.CORES``) is applied there. ``SparseSignal.tail``
picks the map:

* ``"bucket"``: outcomes are the k ids plus one *tail* outcome holding everything else.
  Teacher tail = ``tail_logprob`` when the signal has it (the coarsened teacher
  ``[lp, tail]`` is then renormalized to sum to one, undoing the rounding of quantized
  log-probs), else ``1 - sum_i p_i`` (as ``log1mexp(logsumexp(lp))``). Student tail = the
  student's own mass outside the ids, computed directly as a masked ``logsumexp`` over
  the vocabulary (exact, unlike ``1 - sum q_i`` which cancels when the ids carry almost
  all the mass). This is the exact divergence between two coarsenings of p and q, so by
  the data-processing inequality it never exceeds the dense f-divergence (forward/reverse
  KL, JSD, skew KL, TV). When the ids cover the whole vocabulary the bucket is empty on
  both sides and the result equals the dense divergence.
* ``"renormalize"``: the tail is dropped and both sides are renormalized over the ids
  (DistillKit's top-k). Biased: it ignores the mass outside the ids entirely.

Ids in a top-k row must be unique (padding slots excepted); duplicates raise ``ValueError``.
AKL on a top-k signal is AKL of the coarsened pair: its head set (``dense.akl_head_weight``,
the one implementation) ranks the tail bucket as a single outcome by its mass.

**Sampled signals** (``weights`` given; Anshumann et al. 2025, "Sparse Logit Sampling",
random-sampling KD). Every divergence here except AKL is a sum over outcomes of a term
``phi(p_v, q_v)``, so with ``sum_i w_i g(id_i)`` unbiased for ``sum_v p_v g(v)``::

    D_hat = sum_i w_i * phi(p_i, q_i) / p_i

is an unbiased estimate of ``D = sum_v phi(p_v, q_v)`` over the teacher's support (all of V
for a softmax teacher), and its gradient w.r.t. the student an unbiased estimate of the
dense gradient. ``q`` is the student's full softmax at the ids. Ids may repeat (each draw
its own slot). AKL needs the teacher's full ranking and is refused.

**BiLD** (``bild``) is no sum over outcomes and is not coarsened: see :func:`sparse_bild`.

Padding slots (``logprobs = -inf``, weight 0 when sampled) are outcomes that exist on
neither side: they contribute exactly 0, with finite gradients; in bucket mode the
student's mass at a padding slot's id stays in the tail.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PotstillError
from ..signals.types import SparseSignal
from .bild import bild, check_top_k, pair_kl
from .dense import CORES, Core, get_core, log_probs


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


def check_signal(signal: SparseSignal, n: int, vocab: int) -> None:
    """Raise ``ValueError`` unless ``signal`` is a well-formed sparse signal for ``n`` rows
    over a vocabulary of ``vocab``: shapes, ids of non-padding slots in ``[0, vocab)``,
    unique ids per top-k row, finite non-negative weights that are 0 on padding slots."""
    ids, lp = signal.ids, signal.logprobs
    if ids.shape != lp.shape or ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(
            f"sparse signal ids {tuple(ids.shape)} and logprobs {tuple(lp.shape)} must both be "
            f"[n, k] with n = {n} (student rows)"
        )
    if signal.tail_logprob is not None and tuple(signal.tail_logprob.shape) != (n,):
        raise ValueError(f"sparse signal tail_logprob {tuple(signal.tail_logprob.shape)} must be [n] = [{n}]")
    if signal.weights is None and signal.tail not in ("bucket", "renormalize"):
        raise ValueError(f"unknown tail mode {signal.tail!r}; choose 'bucket' or 'renormalize'")
    if not ids.numel():
        return
    pad = torch.isneginf(lp)
    ids_safe = torch.where(pad, torch.zeros_like(ids), ids)
    if bool(((ids_safe < 0) | (ids_safe >= vocab)).any()):
        raise ValueError(f"sparse signal ids must lie in [0, {vocab}) (the aligned vocabulary)")
    w = signal.weights
    if w is not None:
        if w.shape != ids.shape:
            raise ValueError(f"sampled signal weights {tuple(w.shape)} must match ids {tuple(ids.shape)}")
        if bool((~torch.isfinite(w) | (w < 0)).any()):
            raise ValueError("sampled signal weights must be finite and >= 0 (count / n * p / r)")
        if bool((pad & (w != 0)).any()):
            raise ValueError("sampled signal has a weight != 0 on a padding slot (logprobs = -inf); give it weight 0")
        return
    # Duplicates: sort each row with padding slots keyed to distinct negative numbers.
    slot = torch.arange(ids.shape[1], device=ids.device)
    key = torch.where(pad, -1 - slot, ids).sort(-1).values
    if bool((key[:, 1:] == key[:, :-1]).any()):
        raise ValueError("sparse signal has duplicate ids in a row; ids must be unique per position")


# The smallest tail mass a bucket holds when it holds any outcome: float32's epsilon. A teacher sure of its
# top ids leaves a tail below what its float32 log-probs resolve (1 - sum p rounds to 0, log -inf), yet a
# softmax never puts exactly 0 there; at -inf, reverse KL (q log q / p) of any student mass there is inf.
TAIL_FLOOR = -16.635532333438686  # log(2 ** -24)


def bucket_teacher(lp: Tensor, pad: Tensor, tail_logprob: Tensor | None, bucket_empty: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher side of the bucket map: ``lp [n, k]`` -> ``(lp [n, k], tail [n])`` (log-probs).

    ``tail`` is ``tail_logprob`` when given, and ``[lp, tail]`` is then renormalized to sum to
    one (padding stays ``-inf``); else ``log(1 - sum exp(lp))``, as is. Either is at least
    ``TAIL_FLOOR`` where the bucket holds outcomes, and ``-inf`` (no outcome) where
    ``bucket_empty`` (the ids cover the vocabulary).
    """
    ninf = torch.full((), float("-inf"), dtype=lp.dtype, device=lp.device)
    if tail_logprob is None:
        tail = _log1mexp(_safe_logsumexp(lp, pad.all(-1))).clamp_min(TAIL_FLOOR)
        # Rounding can leave a sliver of teacher mass when the ids cover every outcome;
        # the bucket holds no outcome then, so its mass is 0 on both sides.
        return lp, torch.where(bucket_empty, ninf, tail)
    tail = torch.where(bucket_empty, ninf, tail_logprob.to(lp.dtype).clamp_min(TAIL_FLOOR))
    full = torch.cat([lp, tail.unsqueeze(-1)], -1)
    absent = torch.isneginf(full).all(-1)
    norm = torch.where(absent, torch.zeros_like(tail), _safe_logsumexp(full, absent))
    return lp - norm.unsqueeze(-1), tail - norm


def coarsen(student_logits: Tensor, signal: SparseSignal, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Map student ``[n, V]`` and a top-k teacher ``signal`` onto the sparse outcome space.

    Returns ``(lq, lp)``, both ``[n, k + 1]`` for ``tail="bucket"`` (last column = tail)
    or ``[n, k]`` for ``tail="renormalize"``, in at least float32; padding slots are
    ``-inf`` on both sides.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [n, V], got {tuple(student_logits.shape)}")
    if signal.weights is not None:
        raise ValueError("coarsen maps a top-k signal; a sampled signal (weights given) goes to sparse_divergence")
    n, vocab = student_logits.shape
    check_signal(signal, n, vocab)
    ids, lp = signal.ids, signal.logprobs
    lq_full = log_probs(student_logits, temperature)
    lp = lp.to(torch.promote_types(lq_full.dtype, lp.dtype))
    lq_full = lq_full.to(lp.dtype)
    pad = torch.isneginf(lp)
    ninf = torch.full((), float("-inf"), dtype=lp.dtype, device=lp.device)
    ids_safe = torch.where(pad, torch.zeros_like(ids), ids)
    lq = torch.where(pad, ninf, lq_full.gather(-1, ids_safe))

    if signal.tail == "renormalize":
        empty = pad.all(-1)
        lp_r = lp - _safe_logsumexp(lp, empty).unsqueeze(-1)
        lq_r = lq - _safe_logsumexp(lq, empty).unsqueeze(-1)
        # A row without any id has nothing to compare: make both sides "absent" (-> 0).
        lp_r = torch.where(empty.unsqueeze(-1), ninf, lp_r)
        lq_r = torch.where(empty.unsqueeze(-1), ninf, lq_r)
        return lq_r, lp_r

    # Which vocabulary entries are listed (padding slots add 0, so a padding slot that
    # shares an id with a real one cannot unlist it).
    counts = torch.zeros((n, vocab), dtype=lq_full.dtype, device=lq_full.device)
    counts.scatter_add_(-1, ids_safe, (~pad).to(counts.dtype))
    listed = counts > 0
    bucket_empty = listed.all(-1)  # the ids cover the whole vocabulary
    q_tail = _safe_logsumexp(torch.where(listed, ninf, lq_full), bucket_empty)
    lp, p_tail = bucket_teacher(lp, pad, signal.tail_logprob, bucket_empty)
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
    ``(lq, lp, **params) -> [...]``; ``params`` go to the core. A top-k signal gives the
    divergence on the coarsened space (:func:`coarsen`); a sampled one the unbiased
    estimate ``sum_i w_i phi(p_i, q_i) / p_i`` (Anshumann et al. 2025), for which a custom
    core must be a sum over the last dim of per-outcome terms ``phi(p_v, q_v)``.
    """
    core = get_core(name_or_core) if isinstance(name_or_core, str) else name_or_core
    if core is CORES["bild"]:
        return sparse_bild(student_logits, signal, temperature=temperature, **params)
    if signal.weights is not None:
        return _sampled_estimate(core, student_logits, signal, temperature, params)
    lq, lp = coarsen(student_logits, signal, temperature=temperature)
    return core(lq, lp, **params)


def _sampled_estimate(
    core: Core, student_logits: Tensor, signal: SparseSignal, temperature: float, params: dict
) -> Tensor:
    """``sum_i w_i phi(p_i, q_i) / p_i`` per row, ``phi`` = the core on one outcome."""
    if core is CORES["adaptive_kl"]:
        raise ValueError(
            "adaptive_kl needs the teacher's full ranking, which a sampled signal lacks; use a top-k or dense signal"
        )
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [n, V], got {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    check_signal(signal, n, vocab)
    lq_full = log_probs(student_logits, temperature)
    lp = signal.logprobs.to(torch.promote_types(lq_full.dtype, signal.logprobs.dtype))
    lq_full = lq_full.to(lp.dtype)
    pad = torch.isneginf(lp)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    ids_safe = torch.where(pad, torch.zeros_like(signal.ids), signal.ids)
    lq = torch.where(pad, torch.full_like(zero, float("-inf")), lq_full.gather(-1, ids_safe))
    # The core on [..., k, 1]: one outcome each, so the sum over the last dim is phi itself;
    # padding slots are -inf on both sides, which every core maps to 0 with finite gradients.
    phi = core(lq.unsqueeze(-1), lp.unsqueeze(-1), **params)
    if phi.shape != lp.shape:
        raise ValueError(f"the divergence core must reduce the last dim; got {tuple(phi.shape)} for [n, k, 1]")
    # w / p as exp(log w - log p): w carries the factor p / r, so it stays finite for tiny p.
    assert signal.weights is not None  # only called for a sampled signal
    w = signal.weights.to(lp.dtype)
    coef = torch.where(pad, zero, torch.exp(torch.log(w) - torch.where(pad, zero, lp)))
    if not _student_part_finite(core, params):
        return (coef * phi).sum(-1)
    # phi(0, q), what an outcome adds where the teacher has no mass, is the student's alone: it is summed
    # exactly over the vocabulary, and the draws estimate only phi - phi(0, q), which vanishes with p. Still
    # unbiased (a control variate), but the 1/p weight no longer multiplies the student's own mass: for
    # ABKD, TV, JSD and skew reverse KL that term made the plain estimate's spread large.
    ninf = torch.full_like(lq_full, float("-inf")).unsqueeze(-1)
    psi_full = core(lq_full.unsqueeze(-1), ninf, **params)  # [n, V]
    psi = torch.where(pad, zero, psi_full.gather(-1, ids_safe))
    return psi_full.sum(-1) + (coef * (phi - psi)).sum(-1)


def _student_part_finite(core: Core, params: dict) -> bool:
    """Whether ``phi(0, q)`` is finite for this core (forward KL: 0; ABKD, TV, JSD: finite; reverse KL:
    infinite, so it keeps the plain estimate), probed at q = 1/2 and q = 1/1000."""
    lq = torch.log(torch.tensor([[[0.5]], [[1e-3]]], dtype=torch.float64))
    with torch.no_grad():
        out = core(lq, torch.full_like(lq, float("-inf")), **params)
    return bool(torch.isfinite(out).all()) and bool((out != 0).any())


def sparse_bild(
    student_logits: Tensor, signal: SparseSignal, *, temperature: float = 1.0, top_k: int = 8, student_led: bool = True
) -> Tensor:
    """BiLD (:mod:`potstill.divergences.bild`) against a top-k teacher, ``[n, V]`` and ``[n, k_c]`` -> ``[n]``.

    * **t-LD** needs only the teacher's top-``top_k`` logits, which a top-k cache holds when its width
      ``k_c >= top_k``. The cache stores log-probs at the distillation temperature; their differences
      are the differences of ``logits / T``, which is all BiLD uses (the tail mode and ``tail_logprob``
      play no part). The slots are ranked by the cached log-prob (a stable sort, so quantization ties
      keep the cache's order). A row with fewer than ``top_k`` listed ids (padding) uses the ids it has.
    * **s-LD** needs the teacher's logits at the *student's* top-k ids, which a cache lacks unless it
      lists the whole vocabulary. So ``student_led=True`` is refused (``PotstillError``) unless every
      row lists all ``V`` ids -- then the signal is the dense teacher and the result equals the dense
      BiLD. The check is whether the rows list every id, not whether this batch's student top-k happens
      to be cached, so a cache narrower than the vocabulary fails at the first chunk, never mid-run.
      Use ``student_led: false`` for t-LD alone.
    * **Sampled** signals are refused: sampled ids do not identify the teacher's top-k.
    """
    if signal.weights is not None:
        raise PotstillError(
            "bild needs the teacher's top-k logits, which a sampled signal does not identify; "
            "use a top-k cache (with student_led: false) or an online teacher"
        )
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [n, V], got {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    check_signal(signal, n, vocab)
    check_top_k(top_k, vocab)
    width = signal.ids.shape[1]
    if width < top_k:
        raise PotstillError(
            f"bild top_k {top_k} exceeds the top-k cache's width {width}; use top_k <= {width} or rebuild the "
            f"cache with k >= {top_k}"
        )
    lp = signal.logprobs
    dtype = torch.promote_types(torch.promote_types(lp.dtype, student_logits.dtype), torch.float32)
    pad = torch.isneginf(lp)
    ids_safe = torch.where(pad, torch.zeros_like(signal.ids), signal.ids)
    if student_led:
        dense_t = _dense_from_full_cache(ids_safe, lp, pad, vocab, dtype)
        # The teacher is known everywhere: the dense BiLD, its log-probs being logits / T up to a constant.
        zs = student_logits.to(dtype) / temperature
        return bild(zs, dense_t, temperature=1.0, top_k=top_k, student_led=True)
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices[:, :top_k]
    t = lp.gather(-1, order).to(dtype)  # padding sorts last and stays -inf: no pair holds it
    s = student_logits.gather(-1, ids_safe.gather(-1, order)).to(dtype) / temperature
    return pair_kl(t, s)


def _dense_from_full_cache(ids: Tensor, lp: Tensor, pad: Tensor, vocab: int, dtype: torch.dtype) -> Tensor:
    """The teacher's ``[n, V]`` log-probs from a sparse signal listing every id of every row, else ``PotstillError``."""
    # Padding slots add 0 (their safe id may equal a listed one), as in :func:`coarsen`.
    counts = torch.zeros(lp.shape[0], vocab, dtype=torch.int32, device=lp.device)
    counts.scatter_add_(-1, ids, (~pad).to(torch.int32))
    if lp.shape[0] and not bool((counts > 0).all()):
        raise PotstillError(
            "bild's student-led half (s-LD) needs the teacher's logits at the student's top-k ids, which a top-k "
            "cache lacks; set student_led: false for the teacher-led half t-LD alone, or use an online teacher"
        )
    full = torch.full((lp.shape[0], vocab), float("-inf"), dtype=dtype, device=lp.device)
    # amax: a padding slot (-inf) never overwrites the listed value at the same id.
    return full.scatter_reduce(-1, ids, lp.to(dtype), reduce="amax", include_self=True)
