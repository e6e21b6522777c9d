"""Which parameter values a divergence accepts: degenerate or undefined end points are refused.

The divergences themselves stay pure and compute what their formulas say (GKD's JSD at
``beta = 0`` is exactly 0 with zero gradient, by its formula). These checks are for the places
that take parameters from a user -- the recipe schema at load time and the trainers' configs --
so that a recipe ported from TRL (where JSD's ``beta = 0`` *means* forward KL) is refused with
the fix instead of training on a zero loss. Every refusal is a one-line ``ValueError``:
``"<problem>; <fix>"``.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from .dense import get_core

TEMPERATURE_FLOOR = 0.01
"""Smallest distillation temperature accepted (see :func:`check_temperature`)."""

AB_SUM_CAP = 5.0
"""Largest ``alpha + beta`` of the alpha-beta divergence: ``p^(alpha+beta)`` stays in float32's
normal range (``> e^-87.3``) for ``p > e^(-87.3 / 5) = 2.6e-8``, so even a teacher spread flat
over a 150k vocabulary (``p = 7e-6``) gives a representable loss; at ``alpha + beta = 10`` the
powers underflow below ``p = 1.6e-4`` and such a teacher gives a loss and gradient of ~1e-44
(subnormal, or 0). This bounds float32's range, not the loss's usefulness: on flat teachers
large exponents make the divergence tiny by its own formula."""

AB_ZERO_BAND = 1e-6
"""``0 < alpha, beta < AB_ZERO_BAND`` is refused: even computed in float64 the formulas, which
divide by ``alpha^2`` (``alpha * beta``), lose their digits there, and the value equals the
limit at 0 to within ~1e-5 relative."""

_FLOAT32_LOG_MAX = 88.72  # log of float32's largest finite value


def _values(name: str, key: str, value) -> list[float]:
    """The parameter as floats (a per-row tensor gives its distinct values); refuses non-numbers."""
    if isinstance(value, torch.Tensor) and not value.dtype.is_complex and value.dtype != torch.bool:
        return [float(v) for v in value.detach().flatten().unique().tolist()]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} {key} must be a real number, got {value!r}; give a number such as 0.5")
    return [float(value)]


def _finite(name: str, key: str, v: float) -> None:
    if not math.isfinite(v):
        raise ValueError(f"{name} {key} must be finite, got {v}; give a finite number")


def _jsd(beta: float) -> None:
    name = "generalized_jsd"
    _finite(name, "beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"{name} beta must lie in [0, 1] (the teacher's weight in the mixture m), got {beta}; "
            "use a beta in (0, 1) (GKD uses 0.5)"
        )
    if beta == 0.0:
        raise ValueError(
            f"{name} with beta 0 is identically 0 (m equals the student, and the teacher's term has "
            "weight 0); use divergence forward_kl, which is what TRL's beta=0 means"
        )
    if beta == 1.0:
        raise ValueError(
            f"{name} with beta 1 is identically 0 (m equals the teacher, and the student's term has "
            "weight 0); use divergence reverse_kl, which is what TRL's beta=1 means"
        )


def _skew(name: str, alpha: float) -> None:
    _finite(name, "alpha", alpha)
    plain, side = (
        ("forward_kl", "teacher: KL(p || p)") if name == "skew_forward_kl" else ("reverse_kl", "student: KL(q || q)")
    )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"{name} alpha must lie in [0, 1) (the mixture weight), got {alpha}; "
            f"use an alpha in [0, 1) (0 is plain {plain}, DistiLLM uses 0.1)"
        )
    if alpha == 1.0:
        raise ValueError(
            f"{name} with alpha 1 is identically 0 (the mixture is the {side}); "
            f"use an alpha in [0, 1) (0 is plain {plain}, DistiLLM uses 0.1)"
        )


def _ab(alpha: float, beta: float) -> None:
    name = "alpha_beta_divergence"
    _finite(name, "alpha", alpha)
    _finite(name, "beta", beta)
    for key, v, side in (("alpha", alpha, "p"), ("beta", beta, "q")):
        if v < 0.0:
            raise ValueError(
                f"{name} with {key} {v} raises {side} to a negative power: the divergence is unbounded and float32 "
                f"overflows to inf once a log-prob falls below -{_FLOAT32_LOG_MAX / -v:.3g} nats (peaked teachers, "
                f"low temperatures); use {key} >= 0 (ABKD's range)"
            )
        if 0.0 < v < AB_ZERO_BAND:
            raise ValueError(
                f"{name} with {key} {v} (0 < {key} < {AB_ZERO_BAND:g}) has lost its digits to cancellation (its "
                f"formula divides by {key}^2) and equals its {key} = 0 limit to ~1e-5; use {key} 0, the limit "
                "(Cichocki et al. 2011, eq. 5-9)"
            )
    if alpha + beta > AB_SUM_CAP:
        floor = math.exp(-87.3 / (alpha + beta))
        raise ValueError(
            f"{name} with alpha + beta = {alpha + beta:g} > {AB_SUM_CAP:g}: p^(alpha+beta) underflows float32 for "
            f"p < {floor:.2g}, so on a teacher spread flat over a large vocabulary loss and gradient vanish; use "
            f"alpha + beta <= {AB_SUM_CAP:g} (ABKD uses about 1)"
        )


def _akl(mu: float) -> None:
    name = "adaptive_kl"
    _finite(name, "mu", mu)
    if mu == 0.0:
        raise ValueError(
            f"{name} with mu 0 has an empty head (no outcome is needed to reach mass 0), so it is "
            "plain reverse KL; use divergence reverse_kl, or a mu in (0, 1] (the paper uses 0.5)"
        )
    if not 0.0 < mu <= 1.0:
        raise ValueError(
            f"{name} mu must lie in (0, 1] (the teacher mass the head reaches), got {mu}; "
            "use a mu in (0, 1] (the paper uses 0.5; 1 is forward KL)"
        )


def _bild(top_k, student_led, vocab_size: int | None) -> None:
    name = "bild"
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"{name} top_k must be an integer, got {top_k!r}; give an integer such as 8 (the paper's)")
    top_k = int(top_k)
    if top_k < 1:
        raise ValueError(f"{name} top_k must be >= 1 (the teacher's top-k logits), got {top_k}; use 8 (the paper's)")
    if top_k < 3:
        raise ValueError(
            f"{name} with top_k {top_k} is identically 0 (at most one logit difference, and a softmax over one value "
            "is 1 on both sides); use top_k >= 3 (the paper uses 8)"
        )
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"{name} top_k {top_k} exceeds the vocabulary size {vocab_size}; use a top_k <= {vocab_size}")
    if not isinstance(student_led, bool):
        raise ValueError(
            f"{name} student_led must be true or false, got {student_led!r}; true is BiLD, false the t-LD half alone"
        )


def check_divergence_params(name: str, params: dict, *, vocab_size: int | None = None) -> None:
    """Raise ``ValueError`` (one line, ``"<problem>; <fix>"``) unless ``params`` are a valid,
    non-degenerate setting of the divergence ``name``; return ``None`` otherwise.

    Parameters missing from ``params`` take the divergence's defaults; unknown keys are
    refused. A value may be a number or a per-row tensor (each distinct value is checked).
    What is refused, and why (README: "Divergences at their parameter end points"):

    * ``generalized_jsd``: ``beta`` outside [0, 1]; ``beta = 0`` and ``beta = 1`` (identically 0,
      GKD eq. 4; TRL aliases them to forward / reverse KL, the limits of ``JSD / beta`` and
      ``JSD / (1 - beta)``).
    * ``skew_forward_kl`` / ``skew_reverse_kl``: ``alpha`` outside [0, 1]; ``alpha = 1`` (KL of a
      distribution to itself). ``alpha = 0`` is plain forward / reverse KL and allowed.
    * ``alpha_beta_divergence``: negative ``alpha`` or ``beta`` (negative powers: unbounded,
      float32 overflow); ``alpha + beta > 5`` (float32 underflow to a zero loss);
      ``0 < alpha, beta < 1e-6`` (use the exact limit 0). Every other pair, the limit cases
      included (Cichocki et al. 2011, eq. 5-9), is allowed: (1, 0) is forward KL, (0, 1)
      reverse KL, (0, 0) half the squared log-ratio.
    * ``adaptive_kl``: ``mu`` outside (0, 1] (``mu = 0`` is reverse KL); ``mu = 1`` puts every
      outcome into the head and is forward KL; a tiny ``mu`` keeps only the teacher's top
      token in the head.
    * ``bild``: ``top_k`` not an integer or ``< 1``; ``top_k > vocab_size`` when the vocabulary is
      given (the divergence itself refuses it too, as it sees the vocabulary); ``student_led`` not a
      bool; ``top_k`` 1 or 2 (no pair, or one pair whose softmax is 1 on both sides: identically 0, as the
      formula says and the function computes).

    Non-finite values are refused everywhere.
    """
    core = get_core(name)
    sig = list(inspect.signature(core).parameters.values())[2:]  # after (lq, lp)
    defaults = {p.name: p.default for p in sig}
    for key in params:
        if key not in defaults:
            have = ", ".join(defaults) or "none"
            raise ValueError(f"{name} takes no parameter {key!r} (its parameters: {have}); drop it")
    if name == "bild":
        _bild(params.get("top_k", defaults["top_k"]), params.get("student_led", defaults["student_led"]), vocab_size)
        return
    values = {k: _values(name, k, params.get(k, d)) for k, d in defaults.items()}
    if name == "generalized_jsd":
        for v in values["beta"]:
            _jsd(v)
    elif name in ("skew_forward_kl", "skew_reverse_kl"):
        for v in values["alpha"]:
            _skew(name, v)
    elif name == "alpha_beta_divergence":
        for a in values["alpha"]:
            for b in values["beta"]:
                _ab(a, b)
    elif name == "adaptive_kl":
        for v in values["mu"]:
            _akl(v)


def check_temperature(t: float, what: str = "temperature") -> None:
    """Raise ``ValueError`` (one line) unless ``t`` is a finite distillation temperature ``>= 0.01``.

    Below 0.01 the soft targets are one-hot to float32 precision -- at ``T = 0.01`` a logit gap
    of 1 is a probability ratio of ``e^-100``, under float32's smallest normal ``e^-87`` -- so the
    distillation signal is a hard label, with gradients scaled by ``1/T``. Every divergence at
    every parameter :func:`check_divergence_params` allows stays finite, values and gradients,
    at ``T = 0.01`` with float32 logits of magnitude 1e2..1e3 (tests/divergences/test_endpoints.py).
    ``what`` names the setting in the message.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {t!r}; give a number such as 1.0")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"{what} must be finite, got {t}; use a temperature >= {TEMPERATURE_FLOOR:g} (1.0 is plain)")
    if t <= 0.0:
        raise ValueError(
            f"{what} must be > 0 (logits are divided by it), got {t:g}; use a {what} >= "
            f"{TEMPERATURE_FLOOR:g} (1.0 is plain), or alpha 1 for hard labels"
        )
    if t < TEMPERATURE_FLOOR:
        raise ValueError(
            f"{what} {t:g} is below {TEMPERATURE_FLOOR:g}: the soft targets are one-hot to float precision and the "
            f"gradients scale as 1/{what}; use alpha 1 for hard labels or a {what} >= {TEMPERATURE_FLOOR:g}"
        )
