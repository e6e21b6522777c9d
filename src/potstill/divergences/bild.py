"""BiLD: the Bi-directional Logits Difference loss (Li, Zhou & Song 2024, "BiLD: Bi-directional Logits
Difference Loss for Large Language Model Distillation", arXiv:2406.13555, COLING 2025).

What is computed per position -- the paper's Sec. 3 (method). Equation numbers: the stored copies of the
paper reachable while this was written held only its abstract and summaries, which state
``L_BiLD = L_t-LD + L_s-LD``; the numbered equations (top-k clipping, logits differences, their softmax at
temperature T, t-LD, s-LD, their sum) could not be read there, so the step-by-step definition below was
checked against the authors' released code instead (``fpcsong/BiLD``: ``distil_losses/BILD.py``, and the
sum of the two halves in ``trainers/custom_trainer.py``)::

    teacher-led (t-LD):  I = the teacher's top-k vocabulary indices, in the teacher's rank order
                         d_T = [ (z_T[I_a] - z_T[I_b]) / T  for a < b ]        k(k-1)/2 differences
                         d_S = [ (z_S[I_a] - z_S[I_b]) / T  for a < b ]        same indices, same order
                         t-LD = KL( softmax(d_T) || softmax(d_S) )
    student-led (s-LD):  the same with I = the student's top-k indices, in the student's rank order
                         (still KL(teacher pairs || student pairs))
    BiLD = t-LD + s-LD                                                         (equal weights, no T^2)

Choices (where the paper leaves room):

* ``student_led=False`` gives t-LD alone (the reference code computes each half behind a ``student_led``
  flag); ``True`` (default) is BiLD. A top-k cache can give t-LD only (see ``sparse_bild``).
* The pair order follows the leading model's ranking (``a < b`` in its top-k order), as the reference code
  does (``torch.topk`` is sorted, then ``triu_indices``); the softmax over differences is not invariant
  to flipping a pair, so the order is part of the definition. Equal leading logits (common in bf16) are
  ranked by the lower vocabulary index first, on every device; which of several logits equal to the
  k-th largest gets selected is ``torch.topk``'s choice.
* The temperature divides the logits before the differences (reference code: ``logits / T``); the authors
  trained with ``T = 3`` and added t-LD + s-LD to the loss without ``T^2``: use ``temperature: 3`` and
  ``scale_t2: false`` to reproduce them.
* Gradients: the student gets gradients through both halves at the selected indices (the selection
  itself is piecewise constant). The teacher's values are not detached here (no divergence in this
  package detaches), so a teacher that needs no gradient must come in without one -- the reducer's do.
* ``-inf`` logits mark outcomes that do not exist (a masked vocabulary entry, a padding slot of a sparse
  signal). A selected index whose logit is ``-inf`` for either model takes no part: every pair holding it
  is left out on both sides (so ``-inf - -inf`` never becomes NaN); a position with no pair left (k = 1,
  or fewer than two existing outcomes) gives 0.

Invariances (tested): adding a constant to either model's logits at a position changes nothing (only
differences enter), so the function is the same on logits and on log-probabilities at temperature T;
``top_k`` 1 and 2 are identically 0 (no pair; one pair, whose softmax is 1 on both sides), so the parameter
checks refuse them; identical logits give 0.

Cost: the top-k over V per half, then ``[..., k(k-1)/2]`` temporaries: 28 pairs at k = 8, 2016 at k = 64;
k = 512 gives 130,816 pairs per position, about the width of a large vocabulary.

Top-k cached teachers: see :func:`potstill.divergences.sparse.sparse_bild`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_top_k(top_k, vocab: int) -> None:
    """``ValueError`` (one line) unless ``top_k`` is an int in ``[1, vocab]``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"bild top_k must be an integer, got {top_k!r}; give an integer such as 8 (the paper's)")
    if top_k < 1:
        raise ValueError(f"bild top_k must be >= 1, got {top_k}; use top_k 8 (the paper's)")
    if top_k > vocab:
        raise ValueError(f"bild top_k {top_k} exceeds the vocabulary size {vocab}; use a top_k <= {vocab}")


def pair_kl(t: Tensor, s: Tensor) -> Tensor:
    """KL between the softmaxes of the pairwise differences of ``t`` and of ``s``: ``[..., k] -> [...]``.

    ``t`` holds the teacher's selected (already tempered) logits and ``s`` the student's, at the same k
    indices in the *leading* model's rank order: ``KL(softmax(t_a - t_b) || softmax(s_a - s_b))`` over
    the pairs ``a < b``. Slots that are ``-inf`` on either side take part in no pair (see the module
    docstring); a position with no pair left gives 0.
    """
    k = t.shape[-1]
    a, b = torch.triu_indices(k, k, offset=1, device=t.device)
    ok = torch.isfinite(t) & torch.isfinite(s)
    pair_ok = ok[..., a] & ok[..., b]
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    # Values of absent slots are replaced by 0 before any arithmetic, so no NaN reaches a gradient.
    t, s = torch.where(ok, t, zero), torch.where(ok, s, zero)
    keep = pair_ok | ~pair_ok.any(-1, keepdim=True)  # a row without pairs computes on zeros, then gives 0
    ninf = torch.full((), float("-inf"), dtype=t.dtype, device=t.device)
    lp = torch.log_softmax(torch.where(keep, t[..., a] - t[..., b], ninf), dim=-1)
    lq = torch.log_softmax(torch.where(keep, s[..., a] - s[..., b], ninf), dim=-1)
    lp, lq = torch.where(keep, lp, zero), torch.where(keep, lq, zero)
    return torch.where(pair_ok, torch.exp(lp) * (lp - lq), zero).sum(-1)


def _select(leader: Tensor, other: Tensor, top_k: int, temperature: float, dtype: torch.dtype):
    """``(leader[I] / T, other[I] / T)`` at the leader's top-k indices ``I`` in its rank order, ``[..., k]`` each.

    ``leader``/``other`` are raw ``[..., V]`` logits; the ranking is taken on them (dividing by T > 0
    keeps it), so only the k selected values are cast and tempered, not ``[..., V]``."""
    with torch.no_grad():
        idx = torch.topk(leader.detach(), top_k, dim=-1, sorted=False).indices
        # Rank order with ties broken by the lower vocabulary index: sort the ids, then stable-sort by
        # value. Ties are common in bf16 logits, and topk's order among them differs between devices.
        idx = idx.sort(dim=-1).values
        idx = idx.gather(-1, leader.detach().gather(-1, idx).sort(dim=-1, descending=True, stable=True).indices)
    x_lead, x_other = leader.gather(-1, idx).to(dtype), other.gather(-1, idx).to(dtype)
    if temperature != 1.0:
        x_lead, x_other = x_lead / temperature, x_other / temperature
    return x_lead, x_other


def _check(student_logits: Tensor, teacher_logits: Tensor, temperature: float, top_k: int) -> torch.dtype:
    """``ValueError`` on mismatched shapes, ``T <= 0`` or a bad ``top_k``; the compute dtype."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_top_k(top_k, student_logits.shape[-1])
    return _compute_dtype(student_logits, teacher_logits)


def teacher_led(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, top_k: int = 8) -> Tensor:
    """t-LD per position, ``[..., V], [..., V] -> [...]``: the pairs of the teacher's top-k."""
    dtype = _check(student_logits, teacher_logits, temperature, top_k)
    t, s = _select(teacher_logits, student_logits, top_k, temperature, dtype)
    return pair_kl(t, s)


def student_led_ld(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, top_k: int = 8
) -> Tensor:
    """s-LD per position, ``[..., V], [..., V] -> [...]``: the pairs of the student's top-k."""
    dtype = _check(student_logits, teacher_logits, temperature, top_k)
    s, t = _select(student_logits, teacher_logits, top_k, temperature, dtype)
    # KL(teacher || student) here too: the teacher's pair distribution is the target in both halves.
    return pair_kl(t, s)


def bild(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 8,
    student_led: bool = True,
) -> Tensor:
    """BiLD per position, ``[..., V], [..., V] -> [...]``: ``t-LD + s-LD`` (``student_led=False``: t-LD).

    See the module docstring for the definition and the choices made. The inputs may be logits or
    log-probabilities at any per-position offset (only differences enter); the result is float32 for
    float32/fp16/bf16 inputs and float64 for float64 ones.
    """
    out = teacher_led(student_logits, teacher_logits, temperature=temperature, top_k=top_k)
    if student_led:
        out = out + student_led_ld(student_logits, teacher_logits, temperature=temperature, top_k=top_k)
    return out


def bild_core(lq: Tensor, lp: Tensor, top_k: int = 8, student_led: bool = True) -> Tensor:
    """BiLD on log-probabilities at the distillation temperature, ``(lq [..., V], lp [..., V]) -> [...]``.

    The same value as :func:`bild` on the logits (log-probabilities differ from ``logits / T`` by a
    constant per position, which BiLD ignores). Registered in ``dense.CORES`` so that parameter checks
    and the sparse path find BiLD like every other divergence; the sparse path does not coarsen for it
    (:func:`potstill.divergences.sparse.sparse_bild`).
    """
    return bild(lq, lp, temperature=1.0, top_k=top_k, student_led=student_led)
