"""Dense divergences: parity with the float64 reference (values and gradients) and closed forms."""

from __future__ import annotations

import pytest
import torch
from helpers import DIVERGENCE_CASES, DIVERGENCE_IDS

from potstill.divergences import DIVERGENCES, get_core, get_divergence

from .reference import REFERENCES


def _logits(shape, scale=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("shape", [(3, 5, 37), (7, 37)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_matches_reference_values_and_grads(name, params, shape, temperature):
    s = _logits(shape, 2.0, seed=1).requires_grad_(True)
    t = _logits(shape, 2.0, seed=2).requires_grad_(True)
    out = DIVERGENCES[name](s, t, temperature=temperature, **params)
    assert out.shape == shape[:-1] and out.dtype == torch.float32

    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    ref = REFERENCES[name](s64, t64, temperature, **params)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-4, atol=2e-6)

    w = _logits(shape[:-1], 1.0, seed=3)  # random cotangent: checks every position's gradient
    gs, gt = torch.autograd.grad((out * w).sum(), [s, t])
    rs, rt = torch.autograd.grad((ref * w.double()).sum(), [s64, t64])
    torch.testing.assert_close(gs.double(), rs, rtol=2e-3, atol=2e-6)
    torch.testing.assert_close(gt.double(), rt, rtol=2e-3, atol=2e-6)


def _finite_at_large_logits(name, params):
    """AB cases with negative exponents (or the alpha+beta=0 limits) are infinite for near-one-hot rows."""
    a, b = params.get("alpha", 0.5), params.get("beta", 0.5)
    return not (name == "alpha_beta_divergence" and (b < 0 or a < 0 or a * b == 0 and a + b <= 0))


LARGE = [(n, p) for n, p in DIVERGENCE_CASES if _finite_at_large_logits(n, p)]


@pytest.mark.parametrize(
    ("name", "params"), LARGE, ids=[i for i, c in zip(DIVERGENCE_IDS, DIVERGENCE_CASES) if c in LARGE]
)
def test_large_logits_finite_and_match_reference(name, params):
    s = _logits((4, 37), 1e3, seed=4).requires_grad_(True)
    t = _logits((4, 37), 1e3, seed=5)
    # a row where the two agree closely, so not every value is huge
    with torch.no_grad():
        s[0] = t[0] + _logits((37,), 1e-1, seed=6)
    out = DIVERGENCES[name](s, t, **params)
    (g,) = torch.autograd.grad(out.sum(), [s])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    s64 = s.detach().double().requires_grad_(True)
    ref = REFERENCES[name](s64, t, **params)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    (rg,) = torch.autograd.grad(ref.sum(), [s64])
    torch.testing.assert_close(g.double(), rg, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_logits_1e4_and_half_precision(name, params):
    s = _logits((3, 37), 1e4, seed=7)
    out = DIVERGENCES[name](s, s.clone(), **params)
    assert torch.isfinite(out).all()
    for dtype in (torch.float16, torch.bfloat16):
        sh = _logits((3, 37), 3.0, seed=8, dtype=dtype).requires_grad_(True)
        th = _logits((3, 37), 3.0, seed=9, dtype=dtype)
        out = DIVERGENCES[name](sh, th, **params)
        assert out.dtype == torch.float32
        ref = REFERENCES[name](sh.detach(), th, 1.0, **params)  # the same rounded inputs
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), [sh])
        assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_identical_inputs_give_zero_and_all_nonnegative(name, params):
    t = _logits((5, 37), 3.0, seed=10)
    torch.testing.assert_close(DIVERGENCES[name](t, t.clone(), **params), torch.zeros(5), atol=1e-6, rtol=0)
    s = _logits((5, 37), 3.0, seed=11)
    assert (DIVERGENCES[name](s, t, **params) >= 0).all()


def test_jsd_half_is_symmetric():
    s, t = _logits((6, 37), 2.0, seed=12), _logits((6, 37), 2.0, seed=13)
    jsd = get_divergence("generalized_jsd")
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5))
    assert not torch.allclose(jsd(s, t, beta=0.2), jsd(t, s, beta=0.2))  # only 0.5 is symmetric


def test_jsd_endpoints_are_zero_with_zero_gradient():
    s = _logits((4, 37), 2.0, seed=14).requires_grad_(True)
    t = _logits((4, 37), 2.0, seed=15)
    for beta in (0.0, 1.0):
        out = DIVERGENCES["generalized_jsd"](s, t, beta=beta)
        torch.testing.assert_close(out, torch.zeros(4), atol=1e-6, rtol=0)
        if out.requires_grad:  # at beta = 1 the value does not depend on the student at all
            (g,) = torch.autograd.grad(out.sum(), [s])
            torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-6, rtol=0)


def test_skew_with_alpha_zero_is_plain_kl_and_one_is_zero():
    s, t = _logits((6, 37), 2.0, seed=16), _logits((6, 37), 2.0, seed=17)
    d = DIVERGENCES
    torch.testing.assert_close(d["skew_forward_kl"](s, t, alpha=0.0), d["forward_kl"](s, t))
    torch.testing.assert_close(d["skew_reverse_kl"](s, t, alpha=0.0), d["reverse_kl"](s, t))
    torch.testing.assert_close(d["skew_forward_kl"](s, t, alpha=1.0), torch.zeros(6))
    assert (d["skew_forward_kl"](s, t, alpha=0.1) < d["forward_kl"](s, t)).all()


def test_ab_limits_are_kl_and_continuous():
    s, t = _logits((6, 37), 2.0, seed=18), _logits((6, 37), 2.0, seed=19)
    ab, d = DIVERGENCES["alpha_beta_divergence"], DIVERGENCES
    torch.testing.assert_close(ab(s, t, alpha=1.0, beta=0.0), d["forward_kl"](s, t))
    torch.testing.assert_close(ab(s, t, alpha=0.0, beta=1.0), d["reverse_kl"](s, t))
    # the general formula approaches each limit
    s64, t64 = s.double(), t.double()
    for (a, b), (a0, b0) in [
        ((1.0, 1e-6), (1.0, 0.0)),
        ((1e-6, 1.0), (0.0, 1.0)),
        ((0.5, -0.5 + 1e-6), (0.5, -0.5)),
        ((1e-5, 1e-5), (0.0, 0.0)),
    ]:
        torch.testing.assert_close(ab(s64, t64, alpha=a, beta=b), ab(s64, t64, alpha=a0, beta=b0), rtol=1e-3, atol=1e-5)
    # alpha = beta = 1/2 is 4x the squared Hellinger distance
    p, q = torch.softmax(t64, -1), torch.softmax(s64, -1)
    torch.testing.assert_close(ab(s64, t64), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))


def test_total_variation_range():
    s, t = _logits((50, 37), 5.0, seed=20), _logits((50, 37), 5.0, seed=21)
    tv = DIVERGENCES["total_variation"](s, t)
    assert (tv >= 0).all() and (tv <= 1).all() and tv.max() > 0.5
    one_hot = torch.full((1, 37), -1e4)
    other = one_hot.clone()
    one_hot[0, 0], other[0, 1] = 0.0, 0.0
    torch.testing.assert_close(DIVERGENCES["total_variation"](one_hot, other), torch.ones(1))


def test_adaptive_kl_is_a_mixture_of_fkl_and_rkl():
    s, t = _logits((6, 37), 2.0, seed=22), _logits((6, 37), 2.0, seed=23)
    akl = DIVERGENCES["adaptive_kl"](s, t)
    f, r = DIVERGENCES["forward_kl"](s, t), DIVERGENCES["reverse_kl"](s, t)
    assert ((akl >= torch.minimum(f, r) - 1e-6) & (akl <= torch.maximum(f, r) + 1e-6)).all()
    # mu = 0: empty head, all weight on reverse KL
    torch.testing.assert_close(DIVERGENCES["adaptive_kl"](s, t, mu=0.0), r)


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_zero_probability_entries(name, params):
    """Vocabulary entries impossible for both models (-inf logits) add nothing; no NaN."""
    s = _logits((3, 37), 2.0, seed=24)
    t = _logits((3, 37), 2.0, seed=25)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 30:] = float("-inf")
    t_inf[:, 30:] = float("-inf")
    s_inf.requires_grad_(True)
    out = DIVERGENCES[name](s_inf, t_inf, **params)
    (g,) = torch.autograd.grad(out.sum(), [s_inf])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    torch.testing.assert_close(out, DIVERGENCES[name](s[:, :30], t[:, :30], **params))
    if name in ("forward_kl", "skew_forward_kl", "total_variation", "generalized_jsd"):
        # only the teacher excludes them: still finite for these (q > 0 where p = 0 is fine)
        t_only = DIVERGENCES[name](s, t_inf, **params)
        assert torch.isfinite(t_only).all()


def test_unknown_name_and_bad_parameters():
    with pytest.raises(ValueError, match="unknown divergence"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="unknown divergence"):
        get_core("kl")
    s = _logits((2, 37))
    with pytest.raises(ValueError, match="beta"):
        DIVERGENCES["generalized_jsd"](s, s, beta=1.5)
    with pytest.raises(ValueError, match="same shape"):
        DIVERGENCES["forward_kl"](s, s[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        DIVERGENCES["forward_kl"](s, s, temperature=0.0)
