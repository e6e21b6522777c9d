"""Sparse teacher: k = V equals dense; bucketed KL never exceeds dense KL; padding; errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DIVERGENCE_CASES, DIVERGENCE_IDS

from potstill.divergences import DIVERGENCES, sparse_divergence
from potstill.divergences.sparse import coarsen
from potstill.signals.types import SparseSignal

from .reference import REFERENCES, softmax_and_log

V = 37


def _logits(shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# BiLD is no sum over outcomes and is not coarsened (test_bild.py tests its sparse path): partial top-k
# caches give its teacher-led half only, padded rows use the ids they have, sampled signals are refused.
NOT_BILD = [(n, p) for n, p in DIVERGENCE_CASES if n != "bild"]
NOT_BILD_IDS = [f"{n}-{p}" for n, p in NOT_BILD]
PARTIAL_CACHE = [(n, p) for n, p in DIVERGENCE_CASES if n != "bild" or p.get("student_led") is False]
PARTIAL_CACHE_IDS = [f"{n}-{p}" for n, p in PARTIAL_CACHE]


def _topk(teacher_logits, k, temperature=1.0, tail="bucket"):
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    vals, ids = lp.topk(k, dim=-1)
    return SparseSignal(ids=ids, logprobs=vals, tail=tail)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_all_ids_in_any_order_equals_dense(name, params, tail):
    n, temperature = 5, 1.7
    s = _logits((n, V), seed=1).requires_grad_(True)
    t = _logits((n, V), seed=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(n)])
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    sig = SparseSignal(ids=ids, logprobs=lp, tail=tail)
    out = sparse_divergence(name, s, sig, temperature=temperature, **params)
    dense = DIVERGENCES[name](s, t, temperature=temperature, **params)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    (gs,) = torch.autograd.grad(out.sum(), [s])
    (gd,) = torch.autograd.grad(dense.sum(), [s])
    torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_bucket_never_exceeds_dense_and_matches_coarsened_reference(name):
    """Data-processing inequality, and the exact value on the coarsened outcome space."""
    n, k = 6, 5
    s, t = _logits((n, V), seed=4), _logits((n, V), seed=5)
    sig = _topk(t, k)
    out = sparse_divergence(name, s, sig)
    dense = DIVERGENCES[name](s, t)
    assert (out <= dense + 1e-6).all() and (out < dense - 1e-4).any()
    # Reference: float64 probabilities, the k ids plus one outcome holding the rest.
    q, _ = softmax_and_log(s)
    p, _ = softmax_and_log(t)
    for r in range(n):
        chosen = [int(i) for i in sig.ids[r]]
        rest = [v for v in range(V) if v not in chosen]
        pc = torch.cat([p[r, chosen], p[r, rest].sum().reshape(1)])
        qc = torch.cat([q[r, chosen], q[r, rest].sum().reshape(1)])
        if name == "forward_kl":
            ref = (pc * (pc.log() - qc.log())).sum()
        elif name == "reverse_kl":
            ref = (qc * (qc.log() - pc.log())).sum()
        elif name == "generalized_jsd":
            m = 0.5 * (pc + qc)
            ref = 0.5 * (pc * (pc / m).log()).sum() + 0.5 * (qc * (qc / m).log()).sum()
        else:
            ref = 0.5 * (pc - qc).abs().sum()
        torch.testing.assert_close(out[r].double(), ref, rtol=1e-5, atol=1e-7)


def test_renormalize_matches_reference_and_ignores_tail():
    n, k = 4, 6
    s, t = _logits((n, V), seed=6), _logits((n, V), seed=7)
    sig = _topk(t, k, tail="renormalize")
    out = sparse_divergence("forward_kl", s, sig)
    q, _ = softmax_and_log(s)
    p, _ = softmax_and_log(t)
    for r in range(n):
        ids = sig.ids[r].tolist()
        pr, qr = p[r, ids] / p[r, ids].sum(), q[r, ids] / q[r, ids].sum()
        torch.testing.assert_close(out[r].double(), (pr * (pr / qr).log()).sum(), rtol=1e-5, atol=1e-7)
    # Moving student mass between tail tokens changes nothing in renormalize mode...
    s2 = s.clone()
    tail_ids = [v for v in range(V) if v not in sig.ids[0].tolist()]
    s2[0, tail_ids[0]] += 3.0
    torch.testing.assert_close(sparse_divergence("forward_kl", s2, sig)[0], out[0])
    # ...while the bucket sees the student's extra tail mass.
    bucket = SparseSignal(ids=sig.ids, logprobs=sig.logprobs, tail="bucket")
    assert sparse_divergence("forward_kl", s2, bucket)[0] != sparse_divergence("forward_kl", s, bucket)[0]


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(("name", "params"), NOT_BILD, ids=NOT_BILD_IDS)
def test_padding_slots_are_ignored(name, params, tail):
    n, k = 4, 6
    s = _logits((n, V), seed=8).requires_grad_(True)
    t = _logits((n, V), seed=9)
    sig = _topk(t, k, tail=tail)
    # Row r keeps only its first k - r ids; padding slots get -inf and an arbitrary id (incl. -1).
    ids, lp = sig.ids.clone(), sig.logprobs.clone()
    for r in range(n):
        if r:
            lp[r, k - r :] = float("-inf")
            ids[r, k - r :] = torch.tensor([-1, 0, 3])[:r] if r <= 3 else 0
    padded = sparse_divergence(name, s, SparseSignal(ids=ids, logprobs=lp, tail=tail), **params)
    (g,) = torch.autograd.grad(padded.sum(), [s])
    assert torch.isfinite(padded).all() and torch.isfinite(g).all()
    for r in range(n):
        keep = k - r
        one = SparseSignal(ids=sig.ids[r : r + 1, :keep], logprobs=sig.logprobs[r : r + 1, :keep], tail=tail)
        torch.testing.assert_close(padded[r : r + 1], sparse_divergence(name, s[r : r + 1], one, **params))


def test_row_without_ids_and_zero_tail():
    s, t = _logits((2, V), seed=10), _logits((2, V), seed=11)
    empty = SparseSignal(ids=torch.zeros(2, 3, dtype=torch.long), logprobs=torch.full((2, 3), float("-inf")))
    for tail in ("bucket", "renormalize"):
        out = sparse_divergence("forward_kl", s, SparseSignal(empty.ids, empty.logprobs, tail))
        torch.testing.assert_close(out, torch.zeros(2))
    # teacher puts all its mass on the ids (tail mass rounds to 0): the tail is floored at float32's epsilon
    # (a softmax leaves some mass outside any k < V ids), so both directions stay finite
    lp = torch.log_softmax(t[:, :4], -1)
    sig = SparseSignal(ids=torch.arange(4).expand(2, 4), logprobs=lp)
    s_req = s.clone().requires_grad_(True)
    out = sparse_divergence("forward_kl", s_req, sig)
    (g,) = torch.autograd.grad(out.sum(), [s_req])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    q = torch.softmax(s.double(), -1)
    eps, q_tail = 2.0**-24, q[:, 4:].sum(-1)
    ref = (lp.double().exp() * (lp.double() - q[:, :4].log())).sum(-1) + eps * (math.log(eps) - q_tail.log())
    torch.testing.assert_close(out.double(), ref)
    rkl = sparse_divergence("reverse_kl", s, sig).double()
    ref_r = (q[:, :4] * (q[:, :4].log() - lp.double())).sum(-1) + q_tail * (q_tail.log() - math.log(eps))
    torch.testing.assert_close(rkl, ref_r, rtol=1e-6, atol=0)  # float32 arithmetic


def test_errors():
    s = _logits((2, V))
    lp = torch.log_softmax(_logits((2, V)), -1)[:, :3]
    with pytest.raises(ValueError, match="duplicate"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=torch.tensor([[1, 1, 2], [0, 1, 2]]), logprobs=lp))
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=torch.tensor([[1, 40, 2], [0, 1, 2]]), logprobs=lp))
    with pytest.raises(ValueError, match="ids"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=torch.zeros(2, 4, dtype=torch.long), logprobs=lp))
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match="tail_logprob"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=ids, logprobs=lp, tail_logprob=torch.zeros(3)))
    for bad in (
        torch.tensor([[1.0, -0.1, 1.0], [1.0, 1.0, 1.0]]),
        torch.tensor([[1.0, float("nan"), 1.0]] * 2),
        torch.tensor([[1.0, float("inf"), 1.0]] * 2),
    ):
        with pytest.raises(ValueError, match="finite and >= 0"):
            sparse_divergence("forward_kl", s, SparseSignal(ids=ids, logprobs=lp, weights=bad))
    with pytest.raises(ValueError, match="weights"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=ids, logprobs=lp, weights=torch.ones(2, 4)))
    lp_pad = lp.clone()
    lp_pad[0, 2] = float("-inf")
    with pytest.raises(ValueError, match="padding slot"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=ids, logprobs=lp_pad, weights=torch.ones(2, 3)))
    with pytest.raises(ValueError, match="coarsen maps a top-k signal"):
        coarsen(s, SparseSignal(ids=ids, logprobs=lp, weights=torch.ones(2, 3)))
    with pytest.raises(ValueError, match="unknown divergence"):
        sparse_divergence("kl", s, SparseSignal(ids=torch.tensor([[0, 1, 2], [0, 1, 2]]), logprobs=lp))


def test_custom_core_and_coarsen_shapes():
    s, t = _logits((3, V), seed=12), _logits((3, V), seed=13)
    sig = _topk(t, 4)
    lq, lp = coarsen(s, sig)
    assert lq.shape == lp.shape == (3, 5)
    torch.testing.assert_close(lq.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))
    out = sparse_divergence(lambda lq, lp: (lp.exp() - lq.exp()).abs().max(-1).values, s, sig)
    assert out.shape == (3,)


def test_student_tail_is_exact_when_tiny():
    """The student's tail mass comes from its own logits, not from 1 - sum(q_ids) (which
    rounds to 0 in float32 when the ids hold all but 1e-11 of the mass)."""
    k = 4
    t = _logits((2, V), seed=14)
    s = torch.full((2, V), -25.0)
    s[:, :k] = _logits((2, k), seed=15)
    lp_all = torch.log_softmax(t, -1)
    sig = SparseSignal(ids=torch.arange(k).expand(2, k), logprobs=lp_all[:, :k])
    out = sparse_divergence("forward_kl", s, sig)
    q, lq = softmax_and_log(s)
    p, lp = softmax_and_log(t)
    pc = torch.cat([p[:, :k], p[:, k:].sum(-1, keepdim=True)], -1)
    lqc = torch.cat([lq[:, :k], torch.logsumexp(lq[:, k:], -1, keepdim=True)], -1)
    ref = (pc * (pc.log() - lqc)).sum(-1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("given_tail", [True, False])
def test_a_teacher_sure_of_its_top_ids_leaves_a_finite_reverse_kl(given_tail):
    """Top-k mass that rounds to 1 leaves a tail of -inf (as the cache computes it from float32 log-probs); a
    student with mass outside the ids then had an infinite reverse KL and a NaN gradient. The tail is floored
    at float32's epsilon: finite, and the student is pushed out of the tail."""
    t = torch.full((2, V), -60.0)
    t[:, 0] = 30.0  # p(0) = 1 in float32
    lp = torch.log_softmax(t, -1)[:, :4]
    tail = torch.full((2,), float("-inf")) if given_tail else None
    sig = SparseSignal(ids=torch.arange(4).expand(2, 4), logprobs=lp, tail="bucket", tail_logprob=tail)
    s = _logits((2, V), seed=44).requires_grad_(True)
    out = sparse_divergence("reverse_kl", s, sig)
    (g,) = torch.autograd.grad(out.sum(), [s])
    assert torch.isfinite(out).all() and torch.isfinite(g).all() and (out > 1).all()
    assert (g[:, 0] < 0).all()  # descending raises the logit of the id the teacher is sure of
    _, lp_c = coarsen(s, sig)
    torch.testing.assert_close(lp_c[:, -1].exp(), torch.full((2,), 2.0**-24), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------ sampled signals

ESTIMABLE = [(n, p) for n, p in NOT_BILD if n != "adaptive_kl"]
ESTIMABLE_IDS = [f"{n}-{p}" for n, p in ESTIMABLE]


def _sampled(lp, reps, draws, proposal_t, seed):
    """``reps`` independent sampled signals for one teacher row ``lp [V]`` (float64): ``draws``
    ids with replacement from ``r = softmax(lp / proposal_t)``, kept as unique ids with counts,
    ``w = count / draws * p / r``; unused slots are padding (logprob -inf, weight 0)."""
    lr = torch.log_softmax(lp / proposal_t, -1)
    g = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(lr.exp().expand(reps, -1), draws, replacement=True, generator=g)
    counts = torch.zeros(reps, lp.shape[-1], dtype=lp.dtype).scatter_add_(
        -1, drawn, torch.ones_like(lp[:1]).expand(reps, draws)
    )
    c, ids = counts.sort(-1, descending=True)
    c, ids = c[:, :draws], ids[:, :draws]
    real = c > 0
    logprobs = torch.where(real, lp[ids], float("-inf"))
    weights = torch.where(real, c / draws * torch.exp(lp[ids] - lr[ids]), 0.0)
    return SparseSignal(ids=ids, logprobs=logprobs, weights=weights), drawn


@pytest.mark.parametrize("proposal_t", [1.0, 2.0])
@pytest.mark.parametrize(("name", "params"), ESTIMABLE, ids=ESTIMABLE_IDS)
def test_sampled_estimate_is_unbiased(name, params, proposal_t):
    """Anshumann et al. (2025): the mean of many independent sampled estimates (value and
    gradient w.r.t. the student's logits) is the dense divergence, within 5 standard errors."""
    temperature, reps, draws = 1.5, 2000, 6
    s = _logits((1, V), seed=21).double()
    t = _logits((1, V), seed=22).double()
    lp = torch.log_softmax(t[0] / temperature, -1)
    sig, _ = _sampled(lp, reps, draws, proposal_t, seed=23)
    assert torch.isneginf(sig.logprobs).any()  # some rows repeat ids: padding slots are exercised
    s_rep = s.expand(reps, V).clone().requires_grad_(True)
    est = sparse_divergence(name, s_rep, sig, temperature=temperature, **params)
    (g,) = torch.autograd.grad(est.sum(), [s_rep])
    assert torch.isfinite(est).all() and torch.isfinite(g).all()

    s64 = s.clone().requires_grad_(True)
    ref = REFERENCES[name](s64, t, temperature, **params)
    (g_ref,) = torch.autograd.grad(ref.sum(), [s64])
    se = est.std() / reps**0.5
    assert est.std() > 1e-3 * ref.abs().item()  # a real estimate, not the dense value in disguise
    assert (est.mean() - ref[0]).abs() <= 5 * se, (est.mean().item(), ref.item(), se.item())
    g_se = g.std(0) / reps**0.5
    assert (g_se > 0).sum() > V // 2
    bad = (g.mean(0) - g_ref[0]).abs() > 5 * g_se + 1e-12
    assert not bad.any(), (g.mean(0)[bad], g_ref[0][bad], g_se[bad])


@pytest.mark.parametrize(("name", "params"), ESTIMABLE, ids=ESTIMABLE_IDS)
def test_sampled_with_every_id_weighted_by_p_is_dense(name, params):
    """With every id once and w = p the estimator's sum is the dense sum itself (exact)."""
    n, temperature = 4, 1.3
    s = _logits((n, V), seed=24).requires_grad_(True)
    t = _logits((n, V), seed=25)
    g = torch.Generator().manual_seed(26)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(n)])
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    out = sparse_divergence(
        name, s, SparseSignal(ids=ids, logprobs=lp, weights=lp.exp()), temperature=temperature, **params
    )
    dense = DIVERGENCES[name](s, t, temperature=temperature, **params)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    (gs,) = torch.autograd.grad(out.sum(), [s])
    (gd,) = torch.autograd.grad(dense.sum(), [s])
    torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "params"), ESTIMABLE, ids=ESTIMABLE_IDS)
def test_sampled_duplicates_and_padding_equal_counts(name, params):
    """One slot per draw (ids repeat, weight 1/n each) gives the estimate of unique ids with counts;
    padding slots (any id, incl. -1 and ids listed in the row) add exactly 0, with finite gradients."""
    reps, draws = 5, 7
    lp = torch.log_softmax(_logits((V,), seed=27).double(), -1)
    counted, drawn = _sampled(lp, reps, draws, 1.0, seed=28)
    per_draw = SparseSignal(
        ids=drawn, logprobs=lp[drawn], weights=torch.full(drawn.shape, 1.0 / draws, dtype=torch.float64)
    )
    s = _logits((reps, V), seed=29).double().requires_grad_(True)
    a = sparse_divergence(name, s, counted, **params)
    b = sparse_divergence(name, s, per_draw, **params)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga, gb = (torch.autograd.grad(x.sum(), [s])[0] for x in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    pad_ids = torch.tensor([-1, 0, 5]).expand(reps, 3).clone()
    pad_ids[:, 2] = drawn[:, 0]
    padded = SparseSignal(
        ids=torch.cat([per_draw.ids, pad_ids], -1),
        logprobs=torch.cat([per_draw.logprobs, torch.full((reps, 3), float("-inf"), dtype=torch.float64)], -1),
        weights=torch.cat([per_draw.weights, torch.zeros(reps, 3, dtype=torch.float64)], -1),
    )
    c = sparse_divergence(name, s, padded, **params)
    (gc,) = torch.autograd.grad(c.sum(), [s])
    torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gc, gb, rtol=1e-12, atol=1e-12)


SPLIT = [
    ("alpha_beta_divergence", {"alpha": 0.9, "beta": 0.1}),
    ("total_variation", {}),
    ("generalized_jsd", {}),
]


@pytest.mark.parametrize(("name", "params"), SPLIT, ids=[n for n, _ in SPLIT])
def test_sampled_estimate_sums_the_students_own_part_exactly(name, params):
    """Where the student has mass the teacher lacks, the plain estimate sum_i w_i phi(p_i, q_i) / p_i weighs
    the student-only term phi(0, q) by 1/p; summing that term over the vocabulary and sampling the rest keeps
    the mean (both unbiased) and cuts the spread. The plain estimate is written out here from the
    divergence's own per-outcome core."""
    reps, draws = 400, 8
    t = _logits((V,), seed=41).double()
    s = -t + 0.1 * _logits((V,), seed=42).double()  # the student favours what the teacher does not
    lp = torch.log_softmax(t, -1)
    sig, _ = _sampled(lp, reps, draws, 1.0, seed=43)
    est = sparse_divergence(name, s.expand(reps, V), sig, **params)
    q = torch.softmax(s, -1)
    live = torch.isfinite(sig.logprobs)
    ids = torch.where(live, sig.ids, torch.zeros_like(sig.ids))
    p_i, q_i = lp.exp()[ids], q[ids]

    from potstill.divergences import get_core

    core = get_core(name)
    phi = core(q_i.log().unsqueeze(-1), p_i.log().unsqueeze(-1), **params)
    plain = torch.where(live, sig.weights / p_i * phi, torch.zeros_like(phi)).sum(-1)
    ref = DIVERGENCES[name](s.unsqueeze(0), t.unsqueeze(0), **params)[0]
    for x in (est, plain):
        assert (x.mean() - ref).abs() <= 5 * x.std() / reps**0.5
    assert est.std() < 0.5 * plain.std(), (est.std().item(), plain.std().item())


def test_sampled_refuses_adaptive_kl_and_accepts_custom_cores():
    s = _logits((3, V), seed=30)
    lp = torch.log_softmax(_logits((3, V), seed=31), -1)
    sig = SparseSignal(ids=torch.arange(V).expand(3, V), logprobs=lp, weights=lp.exp())
    with pytest.raises(ValueError, match="adaptive_kl.*top-k or dense"):
        sparse_divergence("adaptive_kl", s, sig)
    from potstill.divergences import get_core

    with pytest.raises(ValueError, match="adaptive_kl"):
        sparse_divergence(get_core("adaptive_kl"), s, sig)
    # A custom core that is a sum of per-outcome terms: squared difference of probabilities.
    out = sparse_divergence(lambda lq, lp: ((lp.exp() - lq.exp()) ** 2).sum(-1), s, sig)
    torch.testing.assert_close(out, ((lp.exp() - torch.softmax(s, -1)) ** 2).sum(-1))


# ------------------------------------------------------------------------------------ tail_logprob


def _topk_with_tail(t, k, temperature=1.0):
    """Top-k bucket signal and the exact log tail mass (float64, from the full distribution)."""
    lp = torch.log_softmax(t.double() / temperature, -1)
    vals, ids = lp.topk(k, dim=-1)
    listed = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(lp.masked_fill(listed, float("-inf")), -1)
    return SparseSignal(ids=ids, logprobs=vals.float(), tail="bucket", tail_logprob=tail.float())


@pytest.mark.parametrize(("name", "params"), PARTIAL_CACHE, ids=PARTIAL_CACHE_IDS)
def test_exact_tail_logprob_equals_default_tail(name, params):
    n, k, temperature = 5, 6, 1.4
    s = _logits((n, V), seed=32).requires_grad_(True)
    with_tail = _topk_with_tail(_logits((n, V), seed=33), k, temperature)
    without = SparseSignal(ids=with_tail.ids, logprobs=with_tail.logprobs)
    a = sparse_divergence(name, s, with_tail, temperature=temperature, **params)
    b = sparse_divergence(name, s, without, temperature=temperature, **params)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga, gb = (torch.autograd.grad(x.sum(), [s])[0] for x in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_tail_logprob_renormalizes_quantized_logprobs():
    n, k = 6, 5
    s = _logits((n, V), seed=34)
    exact = _topk_with_tail(_logits((n, V), seed=35), k)
    # Coarse rounding of the listed log-probs (as a quantized cache would store them); row 1 padded, row 2 empty.
    lp_q = torch.round(exact.logprobs * 4) / 4
    ids = exact.ids.clone()
    lp_q[1, 3:] = float("-inf")
    ids[1, 3:] = ids[1, 0]
    lp_q[2] = float("-inf")
    sig = SparseSignal(ids=ids, logprobs=lp_q, tail_logprob=exact.tail_logprob)
    _, lp = coarsen(s.double(), sig)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.isneginf(lp[1, 3:k]).all() and torch.isneginf(lp[2, :k]).all() and lp[2, k] == 0
    # The same numbers by hand: [p, tail] / (sum p + tail), and the forward KL on them.
    p = torch.cat([lp_q.double().exp(), exact.tail_logprob.double().exp().unsqueeze(-1)], -1)
    p = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(lp.exp(), p, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(p[:, :k], lp_q.double().exp())  # the renormalization did something
    out = sparse_divergence("forward_kl", s.double(), sig)
    q, _ = softmax_and_log(s)
    for r in range(n):
        chosen = [int(i) for i, v in zip(ids[r], lp_q[r]) if v > float("-inf")]
        slots = [j for j in range(k) if lp_q[r, j] > float("-inf")]
        rest = [v for v in range(V) if v not in chosen]
        pc = torch.cat([p[r, slots], p[r, k:]])
        qc = torch.cat([q[r, chosen], q[r, rest].sum().reshape(1)])
        torch.testing.assert_close(out[r], (pc * (pc.log() - qc.log())).sum(), rtol=1e-10, atol=1e-12)
    # renormalize mode ignores tail_logprob
    renorm = SparseSignal(ids=ids, logprobs=lp_q, tail="renormalize", tail_logprob=exact.tail_logprob)
    torch.testing.assert_close(
        sparse_divergence("forward_kl", s, renorm),
        sparse_divergence("forward_kl", s, SparseSignal(ids, lp_q, "renormalize")),
    )


@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_all_ids_with_tail_logprob_equals_dense(name, params):
    """The bucket is empty when the ids cover the vocabulary: a stated tail mass (here a wrong
    one) is no outcome, and the result is the dense divergence."""
    n, temperature = 4, 1.2
    s = _logits((n, V), seed=36).requires_grad_(True)
    t = _logits((n, V), seed=37)
    g = torch.Generator().manual_seed(38)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(n)])
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    sig = SparseSignal(ids=ids, logprobs=lp, tail_logprob=torch.full((n,), -3.0))
    out = sparse_divergence(name, s, sig, temperature=temperature, **params)
    dense = DIVERGENCES[name](s, t, temperature=temperature, **params)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    (gs,) = torch.autograd.grad(out.sum(), [s])
    (gd,) = torch.autograd.grad(dense.sum(), [s])
    torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)
