"""The Liger backend computes potstill's KD loss: the conversion from Liger's convention, its refusals,
and parity with the chunked reducer where Liger runs.

Here (CPU, no liger-kernel) the conversion layer (:func:`fused_jsd_kd_loss`) is driven by a float64
reference of Liger's fused JSD written below from Liger's documented definition (per-token mean over
the call's non-ignored rows, ``w_hard * CE + w_soft * JSD_beta`` with beta 0 / 1 meaning forward /
reverse KL, no T^2), and must then equal the reducer exactly: that closes the mapping of every
convention (beta, mixing weights, T^2, normalization, vocabulary slicing, logit_scale folding).
The tests that run Liger itself skip without it (and, for ``liger_kd_loss``, without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from potstill.divergences import chunked_kd_loss
from potstill.divergences import liger as liger_mod
from potstill.divergences.liger import INSTALL_HINT, fused_jsd_kd_loss, liger_beta, liger_kd_loss
from potstill.signals.types import DenseSignal, Head, SparseSignal

N, H, HT, V = 13, 6, 9, 41

CASES = [  # (divergence, kwargs, alpha, temperature, scale_t2)
    ("forward_kl", {}, 0.0, 1.0, False),
    ("forward_kl", {}, 0.4, 2.0, True),
    ("reverse_kl", {}, 0.0, 0.5, False),
    ("reverse_kl", {}, 0.7, 2.0, False),
    ("generalized_jsd", {}, 0.0, 1.0, False),
    ("generalized_jsd", {"beta": 0.3}, 0.25, 3.0, True),
    ("generalized_jsd", {"beta": 0.9}, 0.0, 1.0, False),
]


def _rand(*shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _labels(n=N, vocab=V, seed=0, masked=(2, 7)):
    y = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    y[[m for m in masked if m < n]] = -100
    return y


def _problem(variant="bias_scale", n=N, vocab=V, teacher_extra=0, dtype=torch.float32, device="cpu", seed=0):
    """(student hidden, student head, leaves to differentiate, labels, teacher signal)."""
    hidden = _rand(n, H, seed=seed + 1, dtype=dtype).to(device).requires_grad_(True)
    weight = torch.nn.Parameter(_rand(vocab, H, seed=seed + 2, dtype=dtype).to(device))
    leaves = [hidden, weight]
    if variant == "plain":
        head = Head(weight=weight)
    else:
        bias = torch.nn.Parameter(_rand(vocab, seed=seed + 3, dtype=dtype).to(device))
        head = Head(weight=weight, bias=bias, logit_scale=1.5 if variant == "bias_scale" else None)
        leaves.append(bias)
    tv = vocab + teacher_extra
    t_head = Head(
        weight=_rand(tv, HT, seed=seed + 4, scale=1.5, dtype=dtype).to(device),
        bias=_rand(tv, seed=seed + 5, dtype=dtype).to(device),
    )
    teacher = DenseSignal(hidden=_rand(n, HT, seed=seed + 6, dtype=dtype).to(device), head=t_head)
    return hidden, head, leaves, _labels(n, vocab, seed).to(device), teacher


# ----------------------------------------------------------------------------- Liger's convention, by definition


def liger_reference(
    student_input,
    student_weight,
    teacher_input,
    teacher_weight,
    true_labels,
    student_bias,
    teacher_bias,
    weight_hard_loss,
    weight_soft_loss,
    beta,
    ignore_index,
    temperature,
    compiled,
    chunk_size,
    return_soft_hard_loss,
):
    """Liger's ``liger_fused_linear_jsd`` as its documentation defines it, in float64, unchunked:

    ``hard = sum_valid CE(z_s, y) / max(n_valid, 1)`` at T = 1, ``soft = sum_valid JSD_beta / max(n_valid, 1)``
    on ``softmax(z / T)``, ``JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P +
    (1 - beta) Q``, P the teacher, Q the student, "forward/reverse KL when beta equals 0 and 1";
    ``loss = weight_hard_loss * hard + weight_soft_loss * soft``. Returns ``(loss, soft, hard)``.
    """
    zs = student_input.double() @ student_weight.double().T
    if student_bias is not None:
        zs = zs + student_bias.double()
    with torch.no_grad():
        zt = teacher_input.double() @ teacher_weight.double().T
        if teacher_bias is not None:
            zt = zt + teacher_bias.double()
    valid = true_labels != ignore_index
    count = max(int(valid.sum()), 1)
    zs, zt, y = zs[valid], zt[valid], true_labels[valid]

    def probs(z):
        e = torch.exp(z - z.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)

    q1 = probs(zs)
    hard = -torch.log(q1.gather(-1, y[:, None])).sum() / count
    q, p = probs(zs / temperature), probs(zt / temperature)

    def kl(a, b):
        return (a * (torch.log(a) - torch.log(b))).sum(-1)

    if beta == 0:
        per_row = kl(p, q)
    elif beta == 1:
        per_row = kl(q, p)
    else:
        m = beta * p + (1 - beta) * q
        per_row = beta * kl(p, m) + (1 - beta) * kl(q, m)
    soft = per_row.sum() / count
    return weight_hard_loss * hard + weight_soft_loss * soft, soft, hard


def case_kwargs(divergence, kwargs, alpha, temperature, scale_t2, **extra) -> dict:
    """The loss functions' keyword arguments for one row of ``CASES``, plus ``extra``."""
    return dict(
        divergence=divergence,
        divergence_kwargs=kwargs,
        alpha=alpha,
        temperature=temperature,
        scale_t2=scale_t2,
        **extra,
    )


def stats_n(labels):
    return float((labels != -100).sum())


def _both(fused, hidden, head, leaves, labels, teacher, **kw):
    got, got_stats = fused_jsd_kd_loss(fused, hidden, head, labels, teacher, **kw)
    got_grads = torch.autograd.grad(got, leaves)
    want, want_stats = chunked_kd_loss(hidden, head, labels, teacher, **kw)
    want_grads = torch.autograd.grad(want, leaves)
    return (got, got_stats, got_grads), (want, want_stats, want_grads)


@pytest.mark.parametrize("variant", ["plain", "bias_scale"])
@pytest.mark.parametrize("divergence,kwargs,alpha,temperature,scale_t2", CASES)
def test_conversion_maps_liger_convention_to_potstills(variant, divergence, kwargs, alpha, temperature, scale_t2):
    """Liger's loss (by its definition) through the conversion equals the reducer: value, stats, gradients."""
    hidden, head, leaves, labels, teacher = _problem(variant)
    kw = case_kwargs(divergence, kwargs, alpha, temperature, scale_t2, normalizer=2 * N + 3, chunk_size=4)
    (got, gs, gg), (want, ws, wg) = _both(liger_reference, hidden, head, leaves, labels, teacher, **kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    for k in ("ce_sum", "kd_sum", "n_tokens"):
        torch.testing.assert_close(gs[k], ws[k], rtol=2e-6, atol=1e-6)
    for a, b in zip(gg, wg):  # the reducer computes in float32, the reference in float64
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_beta_mapping_and_closed_forms():
    assert liger_beta("forward_kl") == 0.0 and liger_beta("reverse_kl") == 1.0
    assert liger_beta("generalized_jsd", {"beta": 0.3}) == 0.3
    assert liger_beta("generalized_jsd") == 0.5  # potstill's default, read from the divergence
    # A student that is the teacher: every divergence is 0, the loss is alpha * CE / normalizer.
    hidden, head, _, labels, _ = _problem("plain")
    twin = DenseSignal(hidden=hidden.detach(), head=Head(weight=head.weight.detach()))
    for div in ("forward_kl", "reverse_kl", "generalized_jsd"):
        loss, stats = fused_jsd_kd_loss(
            liger_reference, hidden, head, labels, twin, divergence=div, alpha=0.5, normalizer=stats_n(labels)
        )
        assert abs(float(stats["kd_sum"])) < 1e-5
        torch.testing.assert_close(loss, 0.5 * stats["ce_sum"] / stats_n(labels))


def test_padded_teacher_vocab_is_sliced_not_padded():
    """Liger would zero-pad the student's logits to the teacher's rows; the backend slices both heads to vocab_size."""
    hidden, head, leaves, labels, teacher = _problem("bias", teacher_extra=5)
    kw = dict(divergence="forward_kl", alpha=0.2, normalizer=N, vocab_size=V)
    (got, _, gg), (want, _, wg) = _both(liger_reference, hidden, head, leaves, labels, teacher, **kw)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)
    with pytest.raises(ValueError, match="vocab_size="):
        fused_jsd_kd_loss(liger_reference, hidden, head, labels, teacher, normalizer=N)


def test_gradient_accumulation_with_global_normalizer():
    """Two micro-batches, each normalized by the global token count, give the one-batch gradients (TRL #4719)."""
    hidden, head, leaves, labels, teacher = _problem("bias", n=2 * N)
    kw = dict(divergence="generalized_jsd", divergence_kwargs={"beta": 0.4}, alpha=0.3, temperature=2.0)
    total = stats_n(labels)
    whole, _ = fused_jsd_kd_loss(liger_reference, hidden, head, labels, teacher, normalizer=total, **kw)
    want = torch.autograd.grad(whole, leaves)
    acc = None
    for part in (slice(0, 5), slice(5, 2 * N)):
        sub = DenseSignal(hidden=teacher.hidden[part], head=teacher.head)
        loss, _ = fused_jsd_kd_loss(liger_reference, hidden[part], head, labels[part], sub, normalizer=total, **kw)
        g = torch.autograd.grad(loss, leaves)
        acc = g if acc is None else tuple(a + b for a, b in zip(acc, g))
    for a, b in zip(acc, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [0, N])
def test_no_target_rows_give_zero_not_nan(n):
    hidden, head, leaves, labels, teacher = _problem("bias", n=n)
    labels = torch.full_like(labels, -100)
    loss, stats = fused_jsd_kd_loss(liger_reference, hidden, head, labels, teacher, alpha=0.5, normalizer=0)
    assert float(loss) == 0.0 and float(stats["n_tokens"]) == 0.0
    for g in torch.autograd.grad(loss, leaves, allow_unused=True):
        assert g is None or (torch.isfinite(g).all() and not g.any())


# ----------------------------------------------------------------------------- refusals (one line, with the fix)


def _one_line(info, *needles):
    msg = str(info.value)
    assert "\n" not in msg, msg
    for s in needles:
        assert s in msg, msg


@pytest.mark.parametrize("divergence", ["skew_forward_kl", "total_variation", "adaptive_kl", "alpha_beta_divergence"])
def test_refuses_divergences_liger_does_not_compute(divergence):
    hidden, head, _, labels, teacher = _problem()
    with pytest.raises(ValueError) as info:
        fused_jsd_kd_loss(liger_reference, hidden, head, labels, teacher, divergence=divergence, normalizer=N)
    _one_line(info, divergence, "loss_backend 'potstill'")


@pytest.mark.parametrize("beta,fix", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_refuses_jsd_end_points_instead_of_aliasing_them(beta, fix):
    """Liger's beta 0 / 1 mean forward / reverse KL; potstill's JSD there is 0 and is refused with the fix."""
    with pytest.raises(ValueError) as info:
        liger_beta("generalized_jsd", {"beta": beta})
    _one_line(info, fix)


def test_refuses_cached_sparse_missing_teacher_and_softcap():
    hidden, head, _, labels, teacher = _problem()
    cached = DenseSignal(logits=_rand(N, V, seed=9))
    lp = torch.log_softmax(_rand(N, V, seed=10), -1)
    vals, ids = lp.topk(5, -1)
    sparse = SparseSignal(ids=ids, logprobs=vals)
    for sig, needle in ((cached, "cached"), (sparse, "top-k"), (None, "teacher")):
        with pytest.raises(ValueError) as info:
            fused_jsd_kd_loss(liger_reference, hidden, head, labels, sig, normalizer=N)
        _one_line(info, needle, "loss_backend 'potstill'")
    capped = Head(weight=head.weight, softcap=30.0)
    with pytest.raises(ValueError) as info:
        fused_jsd_kd_loss(liger_reference, hidden, capped, labels, teacher, normalizer=N)
    _one_line(info, "softcap", "loss_backend 'potstill'")


def test_liger_kd_loss_without_liger_or_cuda_says_the_fix(monkeypatch):
    hidden, head, _, labels, teacher = _problem()
    monkeypatch.setattr(liger_mod, "liger_available", lambda: False)
    with pytest.raises(RuntimeError) as info:
        liger_kd_loss(hidden, head, labels, teacher, normalizer=N)
    _one_line(info, INSTALL_HINT, "loss_backend 'potstill'")
    monkeypatch.setattr(liger_mod, "liger_available", lambda: True)
    with pytest.raises(RuntimeError) as info:
        liger_kd_loss(hidden, head, labels, teacher, normalizer=N)
    _one_line(info, "CUDA", "loss_backend 'potstill'")
    # What Liger cannot compute is refused before the availability check.
    with pytest.raises(ValueError) as info:
        liger_kd_loss(hidden, head, labels, teacher, divergence="total_variation", normalizer=N)
    _one_line(info, "total_variation")


# ----------------------------------------------------------------------------- where Liger runs


def _liger_fn():
    functional = pytest.importorskip("liger_kernel.chunked_loss.functional")
    return functional.liger_fused_linear_jsd


@pytest.mark.parametrize("divergence,kwargs,alpha,temperature,scale_t2", CASES[:2] + CASES[5:6])
def test_real_liger_on_cpu_matches_the_reducer(divergence, kwargs, alpha, temperature, scale_t2):
    """Liger's own function (uncompiled; its chunked loss is plain torch) through the conversion, on CPU."""
    fused = _liger_fn()
    hidden, head, leaves, labels, teacher = _problem("bias_scale", teacher_extra=3)
    kw = case_kwargs(divergence, kwargs, alpha, temperature, scale_t2, normalizer=2 * N + 3, chunk_size=4, vocab_size=V)
    got, got_stats = fused_jsd_kd_loss(fused, hidden, head, labels, teacher, compiled=False, **kw)
    gg = torch.autograd.grad(got, leaves)
    want, want_stats = chunked_kd_loss(hidden, head, labels, teacher, **kw)
    wg = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_stats["kd_sum"], want_stats["kd_sum"], rtol=1e-5, atol=1e-5)
    for a, b in zip(gg, wg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


CUDA_SHAPES = [(37, 1000, 64, 96), (515, 32000, 128, 256)]  # (rows, vocab, student hidden, teacher hidden)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's backend runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("divergence,kwargs,alpha,temperature,scale_t2", CASES[:2] + CASES[3:4] + CASES[5:6])
def test_liger_kd_loss_matches_the_reducer_on_cuda(dtype, shape, divergence, kwargs, alpha, temperature, scale_t2):
    """Parity with potstill's reducer, loss and gradients of the student's rows and head, fp32 and bf16."""
    _liger_fn()
    n, v, hs, ht = shape
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)

    hidden = rnd(n, hs).requires_grad_(True)
    weight = torch.nn.Parameter(rnd(v, hs, scale=hs**-0.5 * 4))
    bias = torch.nn.Parameter(rnd(v, scale=0.1))
    head = Head(weight=weight, bias=bias)
    teacher = DenseSignal(hidden=rnd(n, ht), head=Head(weight=rnd(v + 7, ht, scale=ht**-0.5 * 4)))
    labels = torch.randint(0, v, (n,), generator=g, device="cuda")
    labels[::5] = -100
    normalizer = int((labels != -100).sum()) + 11
    kw = case_kwargs(
        divergence, kwargs, alpha, temperature, scale_t2, normalizer=normalizer, chunk_size=128, vocab_size=v
    )
    got, gs = liger_kd_loss(hidden, head, labels, teacher, compiled=False, **kw)
    gg = torch.autograd.grad(got, [hidden, weight, bias])
    want, ws = chunked_kd_loss(hidden, head, labels, teacher, **kw)
    wg = torch.autograd.grad(want, [hidden, weight, bias])
    # Liger computes the soft term in the logits' dtype and sums the head's gradient in the head's:
    # in bf16 the two backends differ by bf16 rounding.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(float(got) - float(want)) <= tol * abs(float(want)) + 1e-6
    assert abs(float(gs["kd_sum"]) - float(ws["kd_sum"])) <= tol * abs(float(ws["kd_sum"])) + 1e-4
    for name, a, b in zip(("hidden", "weight", "bias"), gg, wg):
        assert a.dtype == b.dtype == dtype
        assert _rel(a, b) <= (1e-4 if dtype == torch.float32 else 3e-2), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's backend runs on CUDA")
def test_liger_kd_loss_compiled_matches_uncompiled_on_cuda():
    _liger_fn()
    hidden, head, leaves, labels, teacher = _problem("bias", n=300, vocab=5000, device="cuda")
    kw = dict(divergence="generalized_jsd", alpha=0.1, temperature=2.0, normalizer=400, chunk_size=64)
    out = []
    for compiled in (False, True):
        loss, _ = liger_kd_loss(hidden, head, labels, teacher, compiled=compiled, **kw)
        out.append((loss, torch.autograd.grad(loss, leaves)))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
