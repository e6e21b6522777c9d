"""Divergences at their parameter end points: what is refused (one line, with the fix), what an
allowed end point equals, and the adaptive-KL head set of Wu et al. (2024)."""

from __future__ import annotations

import pytest
import torch

from potstill.divergences import (
    DIVERGENCES,
    check_divergence_params,
    check_temperature,
    chunked_kd_loss,
    sparse_divergence,
)
from potstill.signals.types import DenseSignal, Head, SparseSignal

from .reference import REFERENCES, akl_head, softmax_and_log


def _logits(shape, scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------ refusals

REFUSED = [
    ("generalized_jsd", {"beta": 0.0}, r"beta 0 is identically 0 .*; use divergence forward_kl, which is what TRL"),
    ("generalized_jsd", {"beta": 0}, r"beta 0 is identically 0"),
    ("generalized_jsd", {"beta": 1.0}, r"beta 1 is identically 0 .*; use divergence reverse_kl, which is what TRL"),
    ("generalized_jsd", {"beta": -0.1}, r"beta must lie in \[0, 1\].*; use a beta in \(0, 1\)"),
    ("generalized_jsd", {"beta": 1.5}, r"beta must lie in \[0, 1\]"),
    ("generalized_jsd", {"beta": float("nan")}, r"beta must be finite"),
    ("generalized_jsd", {"beta": float("inf")}, r"beta must be finite"),
    ("skew_forward_kl", {"alpha": 1.0}, r"alpha 1 is identically 0 .*KL\(p \|\| p\).*; use an alpha in \[0, 1\)"),
    ("skew_reverse_kl", {"alpha": 1.0}, r"alpha 1 is identically 0 .*KL\(q \|\| q\).*; use an alpha in \[0, 1\)"),
    ("skew_forward_kl", {"alpha": 1.2}, r"alpha must lie in \[0, 1\)"),
    ("skew_reverse_kl", {"alpha": -0.1}, r"alpha must lie in \[0, 1\)"),
    ("skew_reverse_kl", {"alpha": float("nan")}, r"alpha must be finite"),
    ("alpha_beta_divergence", {"alpha": float("nan")}, r"alpha must be finite"),
    ("alpha_beta_divergence", {"beta": float("-inf")}, r"beta must be finite"),
    ("alpha_beta_divergence", {"alpha": -0.5, "beta": 1.0}, r"negative power.*-177 nats.*; use alpha >= 0"),
    ("alpha_beta_divergence", {"alpha": 1.5, "beta": -0.5}, r"raises q to a negative power.*; use beta >= 0"),
    ("alpha_beta_divergence", {"alpha": 0.4, "beta": -0.4}, r"negative power"),
    ("alpha_beta_divergence", {"alpha": 3.0, "beta": 2.5}, r"alpha \+ beta = 5.5 > 5: .*underflows.*; use alpha"),
    ("alpha_beta_divergence", {"alpha": 6.0, "beta": 0.0}, r"alpha \+ beta = 6 > 5"),
    ("alpha_beta_divergence", {"alpha": 1e-7, "beta": 0.5}, r"lost its digits.*; use alpha 0, the limit"),
    ("alpha_beta_divergence", {"alpha": 1.0, "beta": 1e-9}, r"; use beta 0, the limit"),
    ("adaptive_kl", {"mu": 0.0}, r"mu 0 has an empty head.*reverse KL; use divergence reverse_kl"),
    ("adaptive_kl", {"mu": -0.5}, r"mu must lie in \(0, 1\]"),
    ("adaptive_kl", {"mu": 1.5}, r"mu must lie in \(0, 1\]"),
    ("adaptive_kl", {"mu": float("nan")}, r"mu must be finite"),
    ("forward_kl", {"beta": 0.5}, r"forward_kl takes no parameter 'beta' \(its parameters: none\); drop it"),
    ("skew_forward_kl", {"beta": 0.5}, r"its parameters: alpha"),
    ("generalized_jsd", {"temperature": 2.0}, r"takes no parameter 'temperature'"),
    ("generalized_jsd", {"beta": True}, r"must be a real number"),
    ("generalized_jsd", {"beta": "0.5"}, r"must be a real number"),
    ("kl", {}, r"unknown divergence 'kl'"),
]


@pytest.mark.parametrize(("name", "params", "match"), REFUSED, ids=[f"{n}-{p}" for n, p, _ in REFUSED])
def test_refused_in_one_line_with_the_fix(name, params, match):
    with pytest.raises(ValueError, match=match) as err:
        check_divergence_params(name, params)
    message = str(err.value)
    assert "\n" not in message
    assert "; " in message or "unknown divergence" in message


ALLOWED = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("total_variation", {}),
    ("generalized_jsd", {}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.9}),
    ("generalized_jsd", {"beta": 1e-6}),
    ("generalized_jsd", {"beta": 1 - 1e-6}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.9}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("alpha_beta_divergence", {}),
    ("alpha_beta_divergence", {"alpha": 0.2, "beta": 0.7}),
    ("alpha_beta_divergence", {"alpha": 1.0, "beta": 0.0}),
    ("alpha_beta_divergence", {"alpha": 0.0, "beta": 1.0}),
    ("alpha_beta_divergence", {"alpha": 0.0, "beta": 0.0}),
    ("alpha_beta_divergence", {"alpha": 5.0, "beta": 0.0}),
    ("alpha_beta_divergence", {"alpha": 2.5, "beta": 2.5}),
    ("alpha_beta_divergence", {"alpha": 0.5, "beta": 1e-4}),
    ("alpha_beta_divergence", {"alpha": 1e-6, "beta": 1e-6}),
    ("adaptive_kl", {}),
    ("adaptive_kl", {"mu": 1.0}),
    ("adaptive_kl", {"mu": 1e-3}),
    ("bild", {}),
    ("bild", {"top_k": 3}),
    ("bild", {"top_k": 64, "student_led": False}),
]


@pytest.mark.parametrize(("name", "params"), ALLOWED, ids=[f"{n}-{p}" for n, p in ALLOWED])
def test_allowed_settings_pass(name, params):
    assert check_divergence_params(name, params) is None


def test_per_row_tensor_values_are_each_checked():
    check_divergence_params("skew_forward_kl", {"alpha": torch.tensor([0.0, 0.1, 0.5])})
    with pytest.raises(ValueError, match="alpha 1 is identically 0"):
        check_divergence_params("skew_forward_kl", {"alpha": torch.tensor([0.1, 1.0])})
    # a joint bound sees the defaults: beta defaults to 0.5
    with pytest.raises(ValueError, match=r"alpha \+ beta = 5.5"):
        check_divergence_params("alpha_beta_divergence", {"alpha": 5.0})


# ------------------------------------------------------------------- end points and their limits


def test_jsd_ends_are_zero_and_jsd_over_beta_tends_to_the_kls():
    """Why TRL aliases beta = 0 / 1 to forward / reverse KL: JSD(beta) / beta -> KL(p || q) as beta -> 0
    and JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1, with a relative gap O(beta) (about 80 beta
    here), so at beta = 1e-6 the tolerance is rtol 1e-3 in float64."""
    s, t = _logits((6, 37), seed=40, dtype=torch.float64), _logits((6, 37), seed=41, dtype=torch.float64)
    jsd, f, r = DIVERGENCES["generalized_jsd"], DIVERGENCES["forward_kl"](s, t), DIVERGENCES["reverse_kl"](s, t)
    for beta in (0.0, 1.0):
        assert (jsd(s, t, beta=beta) == 0).all()  # the formula's value, which the check refuses
    gaps = {}
    for eps, rtol in ((1e-4, 1e-1), (1e-6, 1e-3)):
        near0, near1 = jsd(s, t, beta=eps) / eps, jsd(s, t, beta=1.0 - eps) / (1.0 - (1.0 - eps))
        torch.testing.assert_close(near0, f, rtol=rtol, atol=0)
        torch.testing.assert_close(near1, r, rtol=rtol, atol=0)
        gaps[eps] = float(((near0 - f).abs() / f).max())
    assert gaps[1e-6] < gaps[1e-4] / 50  # the gap shrinks linearly with beta


def test_skew_alpha_zero_is_plain_kl_and_one_is_zero():
    s, t = _logits((6, 37), seed=42), _logits((6, 37), seed=43)
    d = DIVERGENCES
    torch.testing.assert_close(d["skew_forward_kl"](s, t, alpha=0.0), d["forward_kl"](s, t))
    torch.testing.assert_close(d["skew_reverse_kl"](s, t, alpha=0.0), d["reverse_kl"](s, t))
    for name in ("skew_forward_kl", "skew_reverse_kl"):
        assert (d[name](s, t, alpha=1.0) == 0).all()


def test_ab_limit_cases_are_the_closed_forms():
    s, t = _logits((6, 37), seed=44), _logits((6, 37), seed=45)
    ab, d = DIVERGENCES["alpha_beta_divergence"], DIVERGENCES
    torch.testing.assert_close(ab(s, t, alpha=1.0, beta=0.0), d["forward_kl"](s, t))
    torch.testing.assert_close(ab(s, t, alpha=0.0, beta=1.0), d["reverse_kl"](s, t))
    _, lq = softmax_and_log(s)
    _, lp = softmax_and_log(t)
    torch.testing.assert_close(ab(s, t, alpha=0.0, beta=0.0).double(), 0.5 * ((lp - lq) ** 2).sum(-1))


# (limit, a point 1e-4 away from it): every limit line, each direction of approach
AB_NEAR = [
    ((0.5, 0.0), (0.5, 1e-4)),
    ((1.5, 0.0), (1.5, 1e-4)),
    ((0.0, 0.5), (1e-4, 0.5)),
    ((0.0, 1.0), (1e-4, 1.0)),
    ((0.0, 0.0), (1e-4, 1e-4)),
    ((0.0, 0.0), (1e-4, 0.0)),
    ((0.0, 0.0), (0.0, 1e-4)),
    ((0.5, -0.5), (0.5, -0.5 + 1e-4)),
    ((0.0, -0.5), (1e-4, -0.5)),
]


@pytest.mark.parametrize(("limit", "near"), AB_NEAR, ids=[f"{a}->{b}" for a, b in AB_NEAR])
def test_ab_is_continuous_into_its_limits_in_float32(limit, near):
    """The limit formulas (with 1/alpha^2, Cichocki et al. 2011 eq. 5-9) are where the general
    formula goes; float32 at 1e-4 from a limit line agrees with float64 (the general formula alone
    lost up to 40% there to cancellation), and lies within O(1e-4) of the limit."""
    ab = DIVERGENCES["alpha_beta_divergence"]
    s = _logits((6, 37), seed=46).requires_grad_(True)
    t = _logits((6, 37), seed=47)
    s64 = s.detach().double().requires_grad_(True)
    (a, b), (a0, b0) = near, limit
    v32, v64 = ab(s, t, alpha=a, beta=b), ab(s64, t.double(), alpha=a, beta=b)
    torch.testing.assert_close(v32.double(), v64.detach(), rtol=2e-6, atol=0)
    (g32,), (g64,) = torch.autograd.grad(v32.sum(), [s]), torch.autograd.grad(v64.sum(), [s64])
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5 * float(g64.abs().max()))
    at_limit = ab(s64.detach(), t.double(), alpha=a0, beta=b0)
    torch.testing.assert_close(v64.detach(), at_limit, rtol=3e-3, atol=0)


def test_ab_limit_divides_by_alpha_squared_not_alpha():
    """ABKD's reference code divides its special cases by alpha; at alpha = 0.5 that halves the
    value, which the general formula next to the limit shows to be wrong."""
    ab = DIVERGENCES["alpha_beta_divergence"]
    s, t = _logits((6, 37), seed=48, dtype=torch.float64), _logits((6, 37), seed=49, dtype=torch.float64)
    near, limit = ab(s, t, alpha=0.5, beta=1e-6), ab(s, t, alpha=0.5, beta=0.0)
    torch.testing.assert_close(near, limit, rtol=1e-4, atol=0)
    assert not torch.allclose(near, 0.5 * limit, rtol=0.1)  # what 1/alpha instead of 1/alpha^2 would give


def test_ab_bounds_are_where_float32_fails():
    """Why negative powers and alpha + beta > 5 are refused: inf and an exactly-zero loss."""
    ab = DIVERGENCES["alpha_beta_divergence"]
    # a peaked student: log-probs near -200 (float32 overflows q^-0.5 = e^100)
    s = torch.zeros(2, 64)
    s[:, 0] = 200.0
    t = _logits((2, 64), seed=50)
    assert torch.isinf(ab(s, t, alpha=1.5, beta=-0.5)).all()
    assert torch.isfinite(ab(s, t, alpha=1.0, beta=0.5)).all()
    # a teacher spread flat over 131072 outcomes (p ~ 7.6e-6): at alpha + beta = 10, p^10 ~ 1e-51 is
    # below float32's range and loss and gradient are subnormal (~1e-44); at 5 they are ~1e-21, normal
    flat_t = _logits((2, 2**17), scale=0.05, seed=51)
    flat_s = _logits((2, 2**17), scale=0.5, seed=52).requires_grad_(True)
    tiny = torch.finfo(torch.float32).tiny
    for (a, b), lost in (((5.0, 5.0), True), ((2.5, 2.5), False)):
        out = ab(flat_s, flat_t, alpha=a, beta=b)
        (g,) = torch.autograd.grad(out.sum(), [flat_s])
        assert bool((out < tiny).all() and (g.abs().max() < tiny)) == lost


# ---------------------------------------------------------------------------------- temperature


@pytest.mark.parametrize(
    ("t", "match"),
    [
        (0.005, r"below 0.01: .*one-hot.*; use alpha 1 for hard labels"),
        (0.0, r"must be > 0"),
        (-1.0, r"must be > 0"),
        (float("nan"), "must be finite"),
        (float("inf"), "must be finite"),
        (True, "real number"),
        ("2", "real number"),
    ],
)
def test_check_temperature_refuses(t, match):
    with pytest.raises(ValueError, match=match) as err:
        check_temperature(t)
    assert "\n" not in str(err.value) and "; " in str(err.value)
    with pytest.raises(ValueError, match="kd_temperature"):
        check_temperature(0.001, "kd_temperature")


def test_temperature_floor_keeps_every_allowed_divergence_finite():
    """At T = 0.01 with float32 logits of magnitude 1e2..1e3 every divergence at every parameter the
    check allows (the ALLOWED list) gives finite values and gradients; rows that are identical and
    nearly identical included."""
    check_temperature(0.01)
    for mag in (1e2, 1e3):
        s = _logits((6, 257), scale=mag, seed=53)
        t = _logits((6, 257), scale=mag, seed=54)
        t[0] = s[0] + _logits((257,), scale=1e-2 * mag, seed=55)
        t[1] = s[1]
        for name, params in ALLOWED:
            check_divergence_params(name, params)
            x = s.clone().requires_grad_(True)
            out = DIVERGENCES[name](x, t, temperature=0.01, **params)
            (g,) = torch.autograd.grad(out.sum(), [x])
            assert torch.isfinite(out).all() and torch.isfinite(g).all(), (name, params, mag)


# ------------------------------------------------------------------------------ adaptive KL head


def _authors_code_weight(p, q, mu):
    """The head rule of the authors' released AKL.py, from its description (not the paper): the
    longest prefix of p sorted descending whose running sum stays <= mu, plus the top outcome."""
    ps, order = p.sort(-1, descending=True)
    head = ps.cumsum(-1) <= mu
    head[..., 0] = True
    gap = (ps - q.gather(-1, order)).abs()
    return (gap * head).sum(-1) / gap.sum(-1)


def _akl_by_hand(p, q, w):
    lp, lq = p.log(), q.log()
    return w * (p * (lp - lq)).sum(-1) + (1 - w) * (q * (lq - lp)).sum(-1)


def test_akl_head_on_four_outcomes_by_hand():
    """p = (.4, .3, .2, .1), q = (.1, .2, .3, .4): |p - q| = (.3, .1, .1, .3), total .8. At mu = 0.5
    the head must reach 0.5: {.4, .3} (0.4 alone falls short), so w = (.3 + .1) / .8 = 1/2. The
    authors' code keeps only the prefix staying <= 0.5, {.4}: w = .3 / .8 = 3/8. At mu = 0.35 the
    top outcome alone reaches it: w = 3/8 both ways."""
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    akl = DIVERGENCES["adaptive_kl"]
    assert akl_head(p[0].tolist(), 0.5) == {0, 1} and akl_head(p[0].tolist(), 0.35) == {0}
    for mu, w in ((0.5, 0.5), (0.45, 0.5), (0.35, 0.375)):
        torch.testing.assert_close(akl(q.log(), p.log(), mu=mu), _akl_by_hand(p, q, w))
    torch.testing.assert_close(_authors_code_weight(p, q, 0.5), torch.tensor([0.375], dtype=torch.float64))


@pytest.mark.parametrize("mu", [0.2, 0.5, 0.8, 1.0])
def test_akl_unpeaked_teacher_matches_the_paper_reference(mu):
    """An unpeaked teacher (top p 0.05..0.3 over 50 outcomes), where the outcome that crosses mu
    carries weight: values and gradients against the float64 reference written from the paper."""
    s = _logits((4, 8, 50), scale=1.0, seed=56).requires_grad_(True)
    t = _logits((4, 8, 50), scale=1.0, seed=57)
    out = DIVERGENCES["adaptive_kl"](s, t, mu=mu)
    s64 = s.detach().double().requires_grad_(True)
    ref = REFERENCES["adaptive_kl"](s64, t.double(), mu=mu)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    (g,), (rg,) = torch.autograd.grad(out.sum(), [s]), torch.autograd.grad(ref.sum(), [s64])
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-6)


def test_akl_follows_the_paper_where_the_authors_code_differs():
    """Unpeaked teacher: the authors' code (crossing outcome left out of the head) gives another
    loss; peaked teacher (top p >= mu in every row): the two rules agree."""
    q_logits = _logits((4, 8, 50), scale=1.0, seed=56).double()
    for peak, differ in ((0.0, True), (10.0, False)):
        t = _logits((4, 8, 50), scale=1.0, seed=57).double()
        t[..., 0] += peak
        q, p = torch.softmax(q_logits, -1), torch.softmax(t, -1)
        assert differ or bool((p.max(-1).values >= 0.5).all())
        ours = DIVERGENCES["adaptive_kl"](q_logits, t, mu=0.5)
        theirs = _akl_by_hand(p, q, _authors_code_weight(p, q, 0.5))
        if differ:
            assert float((ours - theirs).abs().max()) > 1e-3
        else:
            torch.testing.assert_close(ours, theirs)


def test_akl_mu_one_is_forward_kl_even_for_a_peaked_teacher_in_float32():
    """mu = 1: the head must reach all the mass, so it holds every outcome with p > 0 and AKL is
    forward KL. For a teacher peaked at 1 - 1e-17 float32 rounds the mass above each tail outcome
    to 1; a head test "mass above < 1" then put the tail, where the student has its mass, out of
    the head, and AKL came out near reverse KL."""
    s = _logits((4, 1000), scale=1.0, seed=58)
    t = _logits((4, 1000), scale=1.0, seed=59)
    t[:, 0] += 40.0
    fkl = DIVERGENCES["forward_kl"](s, t)
    torch.testing.assert_close(DIVERGENCES["adaptive_kl"](s, t, mu=1.0), fkl)
    # the same through the sparse path (k = V) and the chunked reducer's closed-form path
    ids = torch.arange(1000).expand(4, -1)
    sig = SparseSignal(ids=ids, logprobs=torch.log_softmax(t, -1), tail="bucket")
    torch.testing.assert_close(sparse_divergence("adaptive_kl", s, sig, mu=1.0), fkl, rtol=1e-5, atol=1e-5)
    hidden = torch.eye(4).requires_grad_(True)
    head = Head(weight=s.t().contiguous())  # [V, H = 4]: hidden @ weight.T = s
    labels = torch.zeros(4, dtype=torch.long)
    losses = {}
    for name, params in (("adaptive_kl", {"mu": 1.0}), ("forward_kl", {})):
        loss, _ = chunked_kd_loss(
            hidden,
            head,
            labels,
            DenseSignal(logits=t),
            divergence=name,
            divergence_kwargs=params,
            alpha=0.0,
            normalizer=4,
            chunk_size=3,
        )
        losses[name] = loss
    torch.testing.assert_close(losses["adaptive_kl"], losses["forward_kl"], rtol=1e-5, atol=1e-5)


def test_akl_tiny_mu_keeps_only_the_top_outcome():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    for mu in (1e-3, 1e-12):
        check_divergence_params("adaptive_kl", {"mu": mu})
        torch.testing.assert_close(DIVERGENCES["adaptive_kl"](q.log(), p.log(), mu=mu), _akl_by_hand(p, q, 0.375))
