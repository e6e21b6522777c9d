"""BiLD (Li et al. 2024, arXiv:2406.13555): reference parity, closed forms, invariances, reducer and sparse paths."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.divergences import DIVERGENCES, chunked_kd_loss, get_core, sparse_divergence, unchunked_kd_loss
from potstill.divergences.bild import bild, student_led_ld, teacher_led
from potstill.divergences.params import check_divergence_params
from potstill.errors import PotstillError
from potstill.signals.types import DenseSignal, Head, SparseSignal

from .reference import bild as bild_reference
from .reference import forward_kl as forward_kl_reference


def _logits(shape, scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize(
    ("shape", "temperature", "params"),
    [
        ((3, 5, 37), 1.0, {}),
        ((7, 11), 3.0, {}),
        ((2, 1, 9), 2.5, {"top_k": 9}),
        ((5, 13), 1.0, {"top_k": 3}),
        ((4, 17), 0.7, {"top_k": 5, "student_led": False}),
    ],
    ids=str,
)
def test_matches_float64_reference_values_and_grads(shape, temperature, params):
    s = _logits(shape, seed=1).requires_grad_(True)
    t = _logits(shape, seed=2).requires_grad_(True)
    out = bild(s, t, temperature=temperature, **params)
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    s64, t64 = (x.detach().double().requires_grad_(True) for x in (s, t))
    ref = bild_reference(s64, t64, temperature, **params)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    w = _logits(shape[:-1], 1.0, seed=3)  # a random cotangent: every position's gradient counts
    gs, gt = torch.autograd.grad((out * w).sum(), [s, t])
    rs, rt = torch.autograd.grad((ref * w.double()).sum(), [s64, t64])
    torch.testing.assert_close(gs.double(), rs, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-4, atol=1e-7)


def test_float64_in_float64_out_and_registered():
    s, t = _logits((4, 19), seed=4, dtype=torch.float64), _logits((4, 19), seed=5, dtype=torch.float64)
    out = DIVERGENCES["bild"](s, t, temperature=1.5)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, bild_reference(s, t, 1.5), rtol=1e-12, atol=1e-14)
    # the core on log-probabilities at T is the same function (only differences enter)
    lq, lp = torch.log_softmax(s / 1.5, -1), torch.log_softmax(t / 1.5, -1)
    torch.testing.assert_close(get_core("bild")(lq, lp), out, rtol=1e-10, atol=1e-12)


def test_closed_form_three_logits():
    """k = 3 by hand: teacher top-3 (2, 1, 0) gives differences (1, 2, 1); a flat student gives
    differences (0, 0, 0), so q is uniform over the 3 pairs and t-LD = sum p log p + log 3 with
    p = (e, e^2, e) / (2e + e^2). Forward KL on the same logits is another number."""
    t = torch.tensor([[2.0, 1.0, 0.0, -9.0, -7.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0, -8.0, 5.0]], dtype=torch.float64)  # student's own top-1 elsewhere
    e = math.e
    p = [e / (2 * e + e * e), e * e / (2 * e + e * e), e / (2 * e + e * e)]
    expected = sum(x * math.log(x) for x in p) + math.log(3)
    got = teacher_led(s, t, top_k=3)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=1e-12, atol=0)
    assert abs(float(forward_kl_reference(s, t)) - expected) > 0.1


def test_not_forward_kl_tail_logits_outside_both_top_k_do_not_matter():
    """Only the two top-k sets enter: lowering a student logit that is in neither leaves BiLD exactly
    where it was, while forward KL (plain KD) moves. Fails if bild is replaced by forward KL."""
    s, t = _logits((3, 23), seed=6), _logits((3, 23), seed=7)
    top = set(torch.topk(s, 4).indices.flatten().tolist()) | set(torch.topk(t, 4).indices.flatten().tolist())
    tail = next(v for v in range(23) if v not in top)
    s2 = s.clone()
    s2[:, tail] -= 3.0
    f = DIVERGENCES["bild"]
    torch.testing.assert_close(f(s2, t, top_k=4), f(s, t, top_k=4), rtol=0, atol=0)
    assert (f(s, t, top_k=4) > 1e-3).all()
    fkl = DIVERGENCES["forward_kl"]
    assert not torch.allclose(fkl(s2, t), fkl(s, t))


@pytest.mark.parametrize("student_led", [True, False])
def test_invariant_to_a_constant_per_position_on_either_side(student_led):
    s, t = _logits((4, 6, 29), seed=8, dtype=torch.float64), _logits((4, 6, 29), seed=9, dtype=torch.float64)
    c = _logits((4, 6, 1), scale=50.0, seed=10, dtype=torch.float64)
    base = bild(s, t, temperature=1.7, student_led=student_led)
    torch.testing.assert_close(bild(s + c, t, temperature=1.7, student_led=student_led), base, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bild(s, t - c, temperature=1.7, student_led=student_led), base, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_k_one_and_two_are_exactly_zero_and_refused_by_the_checks(top_k):
    """k = 1 has no pair; k = 2 one pair, whose softmax is 1 on both sides: exactly 0, zero gradient."""
    s = _logits((5, 13), seed=11).requires_grad_(True)
    t = _logits((5, 13), seed=12)
    out = bild(s, t, top_k=top_k)
    assert torch.equal(out, torch.zeros(5))
    (g,) = torch.autograd.grad(out.sum(), [s])
    assert torch.equal(g, torch.zeros_like(g))
    with pytest.raises(ValueError, match="identically 0") as err:
        check_divergence_params("bild", {"top_k": top_k})
    assert "\n" not in str(err.value) and "top_k >= 3" in str(err.value)


def test_identical_logits_give_zero_and_values_are_nonnegative():
    t = _logits((6, 31), seed=13)
    assert torch.equal(bild(t, t.clone(), temperature=2.0), torch.zeros(6))
    assert (bild(_logits((6, 31), seed=14), t) >= 0).all()


def test_halves_are_the_teacher_and_student_led_terms():
    s, t = _logits((5, 21), seed=15), _logits((5, 21), seed=16)
    ref = bild_reference(s, t, 1.0, student_led=False)
    torch.testing.assert_close(bild(s, t, student_led=False).double(), ref, rtol=1e-5, atol=1e-7)
    # BiLD = t-LD + s-LD, equal weights; s-LD ranks by the student, so it is another number.
    torch.testing.assert_close(bild(s, t), teacher_led(s, t) + student_led_ld(s, t), rtol=0, atol=0)
    assert not torch.allclose(student_led_ld(s, t), teacher_led(s, t))


def test_large_logits_and_half_precision():
    s = _logits((4, 37), 1e3, seed=17).requires_grad_(True)
    t = _logits((4, 37), 1e3, seed=18)
    out = bild(s, t)
    (g,) = torch.autograd.grad(out.sum(), [s])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    torch.testing.assert_close(out.double(), bild_reference(s.detach(), t), rtol=1e-4, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        sh = _logits((3, 37), 3.0, seed=19, dtype=dtype).requires_grad_(True)
        th = _logits((3, 37), 3.0, seed=20, dtype=dtype)
        out = bild(sh, th)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), bild_reference(sh.detach(), th), rtol=1e-5, atol=1e-6)
        (g,) = torch.autograd.grad(out.sum(), [sh])
        assert g.dtype == dtype and torch.isfinite(g).all()


def test_absent_outcomes_take_no_part():
    """-inf logits on both sides (a masked vocabulary entry) are no outcome; fewer than two existing
    outcomes in the top-k leave no pair (0, finite gradient)."""
    s, t = _logits((3, 12), seed=21), _logits((3, 12), seed=22)
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 6:] = float("-inf")
    t_inf[:, 6:] = float("-inf")
    s_inf.requires_grad_(True)
    out = bild(s_inf, t_inf, top_k=8)  # 8 > 6 existing outcomes: the top-8 holds two absent ones
    (g,) = torch.autograd.grad(out.sum(), [s_inf])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    torch.testing.assert_close(out, bild(s[:, :6], t[:, :6], top_k=6))
    one = torch.full((2, 5), float("-inf"))
    one[:, 0] = 1.0
    assert torch.equal(bild(one, one.clone(), top_k=4), torch.zeros(2))


def test_bad_inputs_are_one_line_errors():
    s = _logits((2, 7))
    with pytest.raises(ValueError, match="exceeds the vocabulary size 7"):
        bild(s, s, top_k=8)
    with pytest.raises(ValueError, match="same shape"):
        bild(s, s[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        bild(s, s, temperature=0.0)
    for params, match in (
        ({"top_k": 0}, ">= 1"),
        ({"top_k": 8.0}, "integer"),
        ({"top_k": True}, "integer"),
        ({"student_led": 1}, "true or false"),
        ({"k": 8}, "no parameter 'k'"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            check_divergence_params("bild", params)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="exceeds the vocabulary size 5"):
        check_divergence_params("bild", {"top_k": 8}, vocab_size=5)
    check_divergence_params("bild", {"top_k": 8, "student_led": False}, vocab_size=8)


# ------------------------------------------------------------------------------------- the reducer


N, H, V = 11, 5, 23


def _reducer_inputs(seed=30):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).float().requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 2).float().requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4, 9]] = -100
    teacher = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3).float()
    return hidden, weight, labels, teacher


@pytest.mark.parametrize("params", [{}, {"top_k": 4, "student_led": False}], ids=str)
def test_chunked_equals_unchunked_and_the_float64_loss(params):
    hidden, weight, labels, teacher = _reducer_inputs()
    kw = dict(divergence="bild", divergence_kwargs=params, alpha=0.2, temperature=3.0, normalizer=8)
    out = []
    for fn, chunk in ((chunked_kd_loss, 3), (chunked_kd_loss, 64), (unchunked_kd_loss, 64)):
        loss, _ = fn(hidden, Head(weight=weight), labels, DenseSignal(logits=teacher), chunk_size=chunk, **kw)
        out.append((loss, torch.autograd.grad(loss, [hidden, weight])))
    # The loss from its definition, row by row, float64: alpha CE + (1 - alpha) BiLD, / normalizer.
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    ref = torch.zeros((), dtype=torch.float64)
    for i in range(N):
        if int(labels[i]) == -100:
            continue
        z = w64 @ h64[i]
        ce = -torch.log_softmax(z, -1)[int(labels[i])]
        ref = ref + 0.2 * ce + 0.8 * bild_reference(z, teacher[i].double(), 3.0, **params)
    ref = ref / 8
    ref_grads = torch.autograd.grad(ref, [h64, w64])
    for loss, grads in out:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------- sparse teachers


def _cache(teacher_logits, k, temperature, *, shuffle_seed=None):
    """A top-k cache row as the cache writes it: log-probs at the cache temperature, then (optionally)
    its slots shuffled, so nothing may rely on the cache's order."""
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    vals, ids = lp.topk(k, dim=-1)
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        perm = torch.stack([torch.randperm(k, generator=g) for _ in range(ids.shape[0])])
        vals, ids = vals.gather(-1, perm), ids.gather(-1, perm)
    return SparseSignal(ids=ids, logprobs=vals)


@pytest.mark.parametrize(("cache_k", "top_k"), [(8, 8), (12, 5), (23, 8)])
def test_topk_cache_teacher_led_equals_dense(cache_k, top_k):
    s = _logits((6, V), seed=40).requires_grad_(True)
    t = _logits((6, V), seed=41)
    sig = _cache(t, cache_k, 2.0, shuffle_seed=42)
    params = {"top_k": top_k, "student_led": False}
    out = sparse_divergence("bild", s, sig, temperature=2.0, **params)
    dense = DIVERGENCES["bild"](s, t, temperature=2.0, **params)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), bild_reference(s.detach(), t, 2.0, **params), rtol=1e-5, atol=1e-6)
    gs, gd = (torch.autograd.grad(x.sum(), [s])[0] for x in (out, dense))
    torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


def test_topk_cache_through_the_reducer_equals_the_dense_teacher():
    hidden, weight, labels, teacher = _reducer_inputs(seed=43)
    kw = dict(divergence="bild", divergence_kwargs={"student_led": False}, alpha=0.0, temperature=3.0, normalizer=8)
    a, _ = chunked_kd_loss(hidden, Head(weight=weight), labels, _cache(teacher, 10, 3.0, shuffle_seed=44), **kw)
    b, _ = chunked_kd_loss(hidden, Head(weight=weight), labels, DenseSignal(logits=teacher), **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga, gb = (torch.autograd.grad(x, [hidden, weight]) for x in (a, b))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_topk_cache_padding_uses_the_ids_a_row_has():
    s, t = _logits((3, V), seed=45), _logits((3, V), seed=46)
    sig = _cache(t, 6, 1.0)
    ids, lp = sig.ids.clone(), sig.logprobs.clone()
    lp[1, 4:] = float("-inf")  # row 1 lists 4 ids, padded with an id that is also listed
    ids[1, 4:] = ids[1, 0]
    out = sparse_divergence("bild", s, SparseSignal(ids=ids, logprobs=lp), top_k=6, student_led=False)
    torch.testing.assert_close(out[[0, 2]], teacher_led(s[[0, 2]], t[[0, 2]], top_k=6))
    torch.testing.assert_close(out[1], teacher_led(s[1], t[1], top_k=4))


def test_topk_cache_student_led_needs_the_whole_vocabulary():
    """s-LD needs the teacher at the student's top-k: refused on a partial cache (one line, the fix named),
    exact on a cache that lists every id (then the signal is the dense teacher)."""
    s = _logits((4, V), seed=47).requires_grad_(True)
    t = _logits((4, V), seed=48)
    with pytest.raises(PotstillError, match="student_led: false") as err:
        sparse_divergence("bild", s, _cache(t, 12, 1.5), temperature=1.5)
    assert "\n" not in str(err.value)
    full = _cache(t, V, 1.5, shuffle_seed=49)
    out = sparse_divergence("bild", s, full, temperature=1.5)
    dense = bild(s, t, temperature=1.5)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    gs, gd = (torch.autograd.grad(x.sum(), [s])[0] for x in (out, dense))
    torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-6)


def test_sparse_refusals():
    s, t = _logits((2, V), seed=50), _logits((2, V), seed=51)
    with pytest.raises(PotstillError, match="cache's width 6") as err:
        sparse_divergence("bild", s, _cache(t, 6, 1.0), student_led=False)  # top_k 8 > 6
    assert "\n" not in str(err.value)
    sig = _cache(t, 6, 1.0)
    sampled = SparseSignal(ids=sig.ids, logprobs=sig.logprobs, weights=torch.full((2, 6), 1 / 6))
    with pytest.raises(PotstillError, match="sampled signal") as err:
        sparse_divergence("bild", s, sampled, top_k=3, student_led=False)
    assert "\n" not in str(err.value)
