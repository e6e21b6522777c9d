"""Per-position divergences between a teacher distribution p and a student distribution q.

Every divergence comes in two layers:

* a *core* on log-probabilities, ``core(lq [..., K], lp [..., K], **params) -> [...]``,
  which sums over the last dim and is reused by the sparse path (``sparse.py``) on a
  coarsened outcome space (k ids plus a tail bucket);
* a thin *dense* wrapper with the signature shared by all divergences::

      f(student_logits [..., V], teacher_logits [..., V], *, temperature=1.0, **params) -> [...]

  with ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``.
  No masking and no reduction over positions: that lives in exactly one place, the
  chunked reducer (``chunked.py``).

Numerics, shared by all cores:

* everything is computed from log-probabilities (``log_softmax``; mixtures as
  ``logaddexp(log w + lp, log(1 - w) + lq)``), so logits of magnitude 1e4 are fine;
* fp16/bf16 inputs are computed in float32 and the result is float32 (float64 stays
  float64, which the tests use);
* an outcome with probability 0 contributes ``0 * log 0 = 0``, and an outcome that is
  impossible on *both* sides (``lp = lq = -inf``, e.g. a padding slot of a sparse
  signal) contributes nothing to any divergence -- values and gradients stay finite.
  Where the divergence is truly infinite (p > 0 where q = 0 for forward KL) the value
  is ``inf``, as the mathematics says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypeVar, cast

import torch
from torch import Tensor

from .bild import bild, bild_core

DivergenceName = Literal[
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
    "alpha_beta_divergence",
    "adaptive_kl",
    "bild",
]

Core = Callable[..., Tensor]


# --------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_probs(logits: Tensor, temperature: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
    """``log_softmax(logits / T)`` over the last dim, in at least float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = dtype or _compute_dtype(logits)
    x = logits.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def _pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    dtype = _compute_dtype(student_logits, teacher_logits)
    return log_probs(student_logits, temperature, dtype), log_probs(teacher_logits, temperature, dtype)


def _zero_where(mask: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """Replace entries under ``mask`` by 0 so that a branch later discarded by
    ``torch.where`` computes nothing infinite (its gradient would otherwise be NaN)."""
    return tuple(torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x) for x in xs)


def _kl_terms(la: Tensor, lb: Tensor) -> Tensor:
    """Elementwise ``a * (log a - log b)`` with ``0 * log 0 = 0`` (no reduction)."""
    a_zero = torch.isneginf(la)
    la_s, lb_s = _zero_where(a_zero, la, lb)
    terms = torch.exp(la_s) * (la_s - lb_s)
    return torch.where(a_zero, torch.zeros((), dtype=terms.dtype, device=terms.device), terms)


def _kl(la: Tensor, lb: Tensor) -> Tensor:
    """KL(a || b) = sum_i a_i (log a_i - log b_i) over the last dim."""
    return _kl_terms(la, lb).sum(-1)


def _log_mix(la: Tensor, lb: Tensor, w: float | Tensor) -> Tensor:
    """``log(w * a + (1 - w) * b)``, exact at ``w in {0, 1}``; ``w`` a float or per-row ``[..., 1]``."""
    if not isinstance(w, Tensor):
        if w == 0.0:
            return lb
        if w == 1.0:
            return la
    # logaddexp(-inf, -inf) has a NaN gradient: compute on zeros there, then put -inf back.
    both = torch.isneginf(la) & torch.isneginf(lb)
    la_s, lb_s = _zero_where(both, la, lb)
    if isinstance(w, Tensor):
        w = w.to(la.dtype)
        out = torch.logaddexp(la_s + torch.log(w), lb_s + torch.log1p(-w))
    else:
        out = torch.logaddexp(la_s + math.log(w), lb_s + math.log1p(-w))
    return torch.where(both, torch.full((), float("-inf"), dtype=out.dtype, device=out.device), out)


def _check_unit(name: str, value: float | Tensor) -> None:
    if isinstance(value, Tensor):
        if value.numel() and not bool(((value >= 0.0) & (value <= 1.0)).all()):
            raise ValueError(f"{name} must be in [0, 1] in every row, got {value.min().item()}..{value.max().item()}")
        return
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------- cores


def _fkl(lq: Tensor, lp: Tensor) -> Tensor:
    """Forward KL(p || q) = sum_v p_v (log p_v - log q_v) (Hinton et al. 2015)."""
    return _kl(lp, lq)


def _rkl(lq: Tensor, lp: Tensor) -> Tensor:
    """Reverse KL(q || p) = sum_v q_v (log q_v - log p_v) (MiniLLM, Gu et al. 2024)."""
    return _kl(lq, lp)


def _gjsd(lq: Tensor, lp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD (GKD, Agarwal et al. 2024, eq. 4 without the 1/beta factor):

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``.

    Exactly this formula, so it is 0 at ``beta = 0`` and ``beta = 1`` (m equals one of the
    two distributions and the other term has weight 0); ``beta = 0.5`` is the symmetric JSD.
    TRL and Liger alias those two ends to forward / reverse KL, the limits of ``JSD / beta``
    and ``JSD / (1 - beta)``; here they are left as the formula says and a recipe that asks
    for them is refused by :func:`~.params.check_divergence_params`.
    """
    _check_unit("beta", beta)
    lm = _log_mix(lp, lq, beta)
    out: Tensor | None = None
    if beta > 0.0:
        out = beta * _kl(lp, lm)
    if beta < 1.0:
        term = (1.0 - beta) * _kl(lq, lm)
        out = term if out is None else out + term
    assert out is not None  # beta is in [0, 1] (checked above): at least one term was added
    return out


def _skew_fkl(lq: Tensor, lp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024, eq. 3): ``KL(p || alpha p + (1 - alpha) q)``."""
    _check_unit("alpha", alpha)
    return _kl(lp, _log_mix(lp, lq, alpha))


def _skew_rkl(lq: Tensor, lp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024, eq. 4): ``KL(q || alpha q + (1 - alpha) p)``."""
    _check_unit("alpha", alpha)
    return _kl(lq, _log_mix(lq, lp, alpha))


def _tv(lq: Tensor, lp: Tensor) -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_v - q_v|``, in [0, 1]."""
    return 0.5 * (torch.exp(lp) - torch.exp(lq)).abs().sum(-1)


_AB_NEAR = 0.05
"""Within this distance of a limit line (alpha, beta or alpha + beta = 0) :func:`_ab` computes in float64."""


def _ab(lq: Tensor, lp: Tensor, alpha: float = 0.5, beta: float = 0.5) -> Tensor:
    """Alpha-beta divergence D_AB^(alpha, beta)(p || q) (ABKD, Wang et al. 2025, eq. 6;
    Cichocki, Cruces & Amari 2011, eq. 4 with its limit cases eq. 5-9):

    * alpha, beta, alpha+beta != 0:
      ``-1/(alpha beta) sum(p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b))``
    * alpha != 0, beta = 0: ``1/alpha^2 sum(p^a log(p^a / q^a) - p^a + q^a)``
      (alpha = 1, beta = 0 is forward KL)
    * alpha = 0, beta != 0: ``1/beta^2 sum(q^b log(q^b / p^b) - q^b + p^b)``
      (alpha = 0, beta = 1 is reverse KL)
    * alpha = -beta != 0: ``1/alpha^2 sum(log(q^a / p^a) + (q^a / p^a)^-1 - 1)``
    * alpha = beta = 0: ``1/2 sum (log p - log q)^2``

    The limit cases carry ``1/alpha^2`` (``1/beta^2``), as the equations do; ABKD's reference
    code divides by ``alpha`` there, which is off by a factor ``alpha`` except at alpha = 1.
    Outcomes impossible on both sides are skipped. Every formula cancels catastrophically
    as the nonzero ones among alpha, beta, alpha+beta approach 0 (float32 keeps about
    ``1e-7 / alpha`` relative precision, ``1e-7 / alpha^2`` near alpha = beta = 0: 40% lost
    at 1e-4), so within ``_AB_NEAR`` of a limit line the terms are computed in float64 (twice
    the memory of the ``[..., V]`` temporaries) and the result cast back: the values then run
    continuously into the limits, which are used only at exactly 0. Which (alpha, beta) a
    recipe may use (no negative powers, alpha + beta <= 5) is
    :func:`~.params.check_divergence_params`'s.
    """
    a, b = float(alpha), float(beta)
    s = a + b
    out_dtype = lp.dtype
    if any(0.0 < abs(x) < _AB_NEAR for x in (a, b, s)):
        lp, lq = lp.double(), lq.double()
    absent = torch.isneginf(lp) & torch.isneginf(lq)
    lp_s, lq_s = _zero_where(absent, lp, lq)
    if a != 0.0 and b != 0.0 and s != 0.0:
        terms = (torch.exp(a * lp_s + b * lq_s) - (a / s) * torch.exp(s * lp_s) - (b / s) * torch.exp(s * lq_s)) * (
            -1.0 / (a * b)
        )
    elif a != 0.0 and b == 0.0:
        terms = (_kl_terms(a * lp_s, a * lq_s) - torch.exp(a * lp_s) + torch.exp(a * lq_s)) / (a * a)
    elif a == 0.0 and b != 0.0:
        terms = (_kl_terms(b * lq_s, b * lp_s) - torch.exp(b * lq_s) + torch.exp(b * lp_s)) / (b * b)
    elif a != 0.0:  # alpha = -beta != 0
        x = a * (lp_s - lq_s)
        terms = (torch.expm1(x) - x) / (a * a)
    else:  # alpha = beta = 0
        terms = 0.5 * (lp_s - lq_s) ** 2
    out = torch.where(absent, torch.zeros((), dtype=terms.dtype, device=terms.device), terms).sum(-1)
    return out.to(out_dtype)


def _akl(lq: Tensor, lp: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (AKL; Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge
    Distillation for Large Language Models", arXiv:2404.02657, Sec. 5, eq. 10-12).

    ``AKL = g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL`` with
    ``g_head = sum_head |p - q|``, ``g_tail = sum_tail |p - q|``; the head is the paper's mask
    (see :func:`akl_head_weight`). The two weights are detached (treated as constants, no
    gradient through the split), and are 1/2 each when ``p == q`` (then both KLs are 0).
    ``mu = 1`` puts every outcome with ``p > 0`` into the head: AKL is then forward KL.
    """
    w = akl_head_weight(lq, lp, mu)
    return w * _fkl(lq, lp) + (1.0 - w) * _rkl(lq, lp)


@torch.no_grad()
def akl_head_weight(lq: Tensor, lp: Tensor, mu: float | Tensor = 0.5) -> Tensor:
    """AKL's detached weight of the forward KL per position, ``g_head / (g_head + g_tail)``, ``[...]``.

    The head follows the paper's mask (Wu et al. 2024, Sec. 5): the *fewest* outcomes whose
    teacher mass reaches ``mu`` -- the top outcomes of ``p`` up to and including the one whose
    mass carries the running sum to ``mu`` (the first author restating the paper's mask in
    songmzhang/DSKD issue #1, translated: "select the fewest elements whose sum exceeds the
    threshold mu"; his worked examples count a sum equal to mu as reaching it). So an outcome is in
    the head iff the teacher mass ranked strictly above it is ``< mu``, and for ``mu > 0`` the
    head holds at least the top outcome.

    The authors' released ``AKL.py`` (``get_ratio``) differs: its head is the longest prefix whose
    running sum stays ``<= mu`` (plus the top outcome), i.e. it leaves out the outcome that
    crosses ``mu``. On an unpeaked teacher the two weights differ; on a peaked one (top ``p >= mu``)
    they agree. We follow the paper.

    Numerics: sorting ascending and summing from the smallest outcome up gives each outcome's
    mass at or below it accurately (small terms first), and the test "mass above < mu" is made
    as "mass at or below > (1 - mu) * total" against the row's own total, so ``mu = 1`` keeps
    every outcome with ``p > 0`` in the head even where float32 rounds the mass above a tail
    outcome of a peaked teacher to 1. ``mu`` is a float or per-row ``[..., 1]``.
    """
    _check_unit("mu", mu)
    p, q = torch.exp(lp), torch.exp(lq)
    p_asc, order = torch.sort(p, dim=-1)
    at_or_below = torch.cumsum(p_asc, dim=-1)
    total = at_or_below[..., -1:]
    if isinstance(mu, Tensor):
        mu = mu.to(p.dtype)
    head_asc = at_or_below > (1.0 - mu) * total
    # mu > 0: the top outcome always reaches into the head ((1 - mu) rounds to 1 for mu < 6e-8).
    top = torch.zeros_like(head_asc)
    top[..., -1] = True
    head_asc = head_asc | (top & (torch.as_tensor(mu, device=p.device) > 0))
    head = torch.zeros_like(head_asc).scatter(-1, order, head_asc)
    gap = (p - q).abs()
    g_head = torch.where(head, gap, torch.zeros((), dtype=gap.dtype, device=gap.device)).sum(-1)
    g_total = gap.sum(-1)
    return torch.where(g_total > 0, g_head / g_total.clamp_min(torch.finfo(gap.dtype).tiny), 0.5)


CORES: dict[DivergenceName, Core] = {
    "forward_kl": _fkl,
    "reverse_kl": _rkl,
    "generalized_jsd": _gjsd,
    "skew_forward_kl": _skew_fkl,
    "skew_reverse_kl": _skew_rkl,
    "total_variation": _tv,
    "alpha_beta_divergence": _ab,
    "adaptive_kl": _akl,
    "bild": bild_core,
}
"""Divergence cores on log-probabilities ``(lq, lp, **params) -> [...]``."""


# --------------------------------------------------------------------- dense wrappers


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p || q) per position: ``[..., V], [..., V] -> [...]`` (mode-covering)."""
    return _fkl(*_pair(student_logits, teacher_logits, temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(q || p) per position: ``[..., V], [..., V] -> [...]`` (mode-seeking)."""
    return _rkl(*_pair(student_logits, teacher_logits, temperature))


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """GKD's generalized JSD per position, ``[..., V] -> [...]``; see :func:`_gjsd`."""
    return _gjsd(*_pair(student_logits, teacher_logits, temperature), beta=beta)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew KL ``KL(p || alpha p + (1 - alpha) q)`` per position, ``[..., V] -> [...]``."""
    return _skew_fkl(*_pair(student_logits, teacher_logits, temperature), alpha=alpha)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew reverse KL ``KL(q || alpha q + (1 - alpha) p)`` per position, ``[..., V] -> [...]``."""
    return _skew_rkl(*_pair(student_logits, teacher_logits, temperature), alpha=alpha)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``0.5 * sum |p - q|`` per position, ``[..., V] -> [...]``."""
    return _tv(*_pair(student_logits, teacher_logits, temperature))


def alpha_beta_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.5,
) -> Tensor:
    """ABKD's D_AB^(alpha, beta)(p || q) per position, ``[..., V] -> [...]``; see :func:`_ab`."""
    return _ab(*_pair(student_logits, teacher_logits, temperature), alpha=alpha, beta=beta)


def adaptive_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mu: float = 0.5) -> Tensor:
    """AKL per position, ``[..., V] -> [...]``; see :func:`_akl`."""
    return _akl(*_pair(student_logits, teacher_logits, temperature), mu=mu)


DIVERGENCES: dict[DivergenceName, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "alpha_beta_divergence": alpha_beta_divergence,
    "adaptive_kl": adaptive_kl,
    "bild": bild,
}


_Entry = TypeVar("_Entry")


def _lookup(table: dict[DivergenceName, _Entry], name: str) -> _Entry:
    try:
        # An unknown name is refused below (KeyError -> ValueError).
        return table[cast(DivergenceName, name)]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(table)}") from None


def get_divergence(name: DivergenceName | str) -> Callable[..., Tensor]:
    """The dense divergence called ``name``."""
    return _lookup(DIVERGENCES, name)


def get_core(name: DivergenceName | str) -> Core:
    """The log-probability core of the divergence called ``name``."""
    return _lookup(CORES, name)
