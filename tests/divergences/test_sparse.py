"""Sparse teacher: k = V equals dense; bucketed KL never exceeds dense KL; padding; errors."""

from __future__ import annotations

import pytest
import torch

from potstill.divergences import DIVERGENCES, sparse_divergence
from potstill.divergences.sparse import coarsen
from potstill.signals.types import SparseSignal

from .reference import softmax_and_log
from .test_dense import CASES, IDS

V = 37


def _logits(shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _topk(teacher_logits, k, temperature=1.0, tail="bucket"):
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    vals, ids = lp.topk(k, dim=-1)
    return SparseSignal(ids=ids, logprobs=vals, tail=tail)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
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
@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_padding_slots_are_ignored(name, params, tail):
    n, k = 4, 6
    s = _logits((n, V), seed=8).requires_grad_(True)
    t = _logits((n, V), seed=9)
    sig = _topk(t, k, tail=tail)
    # Row r keeps only its first k - r ids; padding slots get -inf and an arbitrary id (incl. -1).
    ids, lp = sig.ids.clone(), sig.logprobs.clone()
    for r in range(n):
        if r:
            lp[r, k - r:] = float("-inf")
            ids[r, k - r:] = torch.tensor([-1, 0, 3])[:r] if r <= 3 else 0
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
    # teacher puts all its mass on the ids (tail mass exactly 0): finite, tail adds only student-side terms
    lp = torch.log_softmax(t[:, :4], -1)
    sig = SparseSignal(ids=torch.arange(4).expand(2, 4), logprobs=lp)
    s_req = s.clone().requires_grad_(True)
    out = sparse_divergence("forward_kl", s_req, sig)
    (g,) = torch.autograd.grad(out.sum(), [s_req])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    q = torch.softmax(s.double(), -1)
    ref = (lp.double().exp() * (lp.double() - q[:, :4].log())).sum(-1)  # p_tail = 0 adds nothing
    torch.testing.assert_close(out.double(), ref)
    assert torch.isinf(sparse_divergence("reverse_kl", s, sig)).all()  # q_tail > 0 where p_tail = 0


def test_errors():
    s = _logits((2, V))
    lp = torch.log_softmax(_logits((2, V)), -1)[:, :3]
    with pytest.raises(ValueError, match="duplicate"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=torch.tensor([[1, 1, 2], [0, 1, 2]]), logprobs=lp))
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=torch.tensor([[1, 40, 2], [0, 1, 2]]), logprobs=lp))
    with pytest.raises(ValueError, match="ids"):
        sparse_divergence("forward_kl", s, SparseSignal(ids=torch.zeros(2, 4, dtype=torch.long), logprobs=lp))
    with pytest.raises(NotImplementedError, match="issue 3"):
        ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
        sparse_divergence("forward_kl", s, SparseSignal(ids=ids, logprobs=lp, weights=torch.ones(2, 3)))
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
