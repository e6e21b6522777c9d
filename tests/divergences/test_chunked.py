"""The chunked reducer equals the unchunked one (values and gradients), masks, normalizes
globally, aligns vocabularies and refuses a broken teacher."""

from __future__ import annotations

import pytest
import torch

from potstill.divergences import chunked_kd_loss, unchunked_kd_loss
from potstill.errors import PotstillError
from potstill.signals.types import DenseSignal, Head, SparseSignal

from .reference import kd_loss as reference_kd_loss

N, H, HT, V = 11, 5, 7, 37


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _labels(n=N, seed=0, masked=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (n,), generator=g)
    y[[m for m in masked if m < n]] = -100
    return y


def _teacher(kind, n=N, vocab=V, seed=100):
    if kind == "logits":
        return DenseSignal(logits=_rand(n, vocab, seed=seed, scale=2.0))
    if kind == "hidden":
        head = Head(weight=_rand(vocab, HT, seed=seed + 1), bias=_rand(vocab, seed=seed + 2), softcap=15.0)
        return DenseSignal(hidden=_rand(n, HT, seed=seed + 3), head=head)
    lp = torch.log_softmax(_rand(n, vocab, seed=seed, scale=2.0) / 2.0, -1)
    vals, ids = lp.topk(6, -1)
    return SparseSignal(ids=ids, logprobs=vals, tail="renormalize" if kind == "sparse_renorm" else "bucket")


def _student(variant, seed=10):
    """(hidden, head, leaves whose gradients to compare)."""
    hidden = _rand(N, H, seed=seed).requires_grad_(True)
    weight = torch.nn.Parameter(_rand(V, H, seed=seed + 1))
    if variant == "plain":
        return hidden, Head(weight=weight), [hidden, weight]
    if variant == "bias":
        bias = torch.nn.Parameter(_rand(V, seed=seed + 2))
        return hidden, Head(weight=weight, bias=bias), [hidden, weight, bias]
    if variant == "softcap_scale":
        bias = torch.nn.Parameter(_rand(V, seed=seed + 2))
        head = Head(weight=weight, bias=bias, logit_scale=2.5, softcap=3.0)
        return hidden, head, [hidden, weight, bias]
    if variant == "frozen":
        return hidden, Head(weight=weight.detach()), [hidden]
    # tied: the head weight is also the input embedding that produced the hidden states
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 3))
    mix = _rand(H, H, seed=seed + 4)
    hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix)
    return hidden, Head(weight=weight), [weight]


def _both(hidden, head, leaves, labels, teacher, **kw):
    out = []
    for fn in (chunked_kd_loss, unchunked_kd_loss):
        loss, stats = fn(hidden, head, labels, teacher, **kw)
        grads = torch.autograd.grad(loss, leaves, retain_graph=True)
        out.append((loss, stats, grads))
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, N, 50])
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "sparse", "sparse_renorm"])
@pytest.mark.parametrize("variant", ["plain", "bias", "softcap_scale", "frozen", "tied"])
def test_chunked_equals_unchunked(chunk_size, teacher_kind, variant):
    hidden, head, leaves = _student(variant)
    labels = _labels()
    kw = dict(
        divergence="generalized_jsd",
        divergence_kwargs={"beta": 0.3},
        alpha=0.4,
        temperature=2.0,
        scale_t2=True,
        normalizer=13,
        chunk_size=chunk_size,
    )
    (lc, sc, gc), (lu, su, gu) = _both(hidden, head, leaves, labels, _teacher(teacher_kind), **kw)
    assert lc.dtype == torch.float32 and lc.shape == ()
    torch.testing.assert_close(lc, lu, rtol=1e-5, atol=1e-6)
    for key in ("ce_sum", "kd_sum", "n_tokens"):
        torch.testing.assert_close(sc[key], su[key], rtol=1e-5, atol=1e-6)
        assert not sc[key].requires_grad
    assert float(sc["n_tokens"]) == N - 2
    for a, b in zip(gc, gu):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "forward_kl",
        "reverse_kl",
        "skew_forward_kl",
        "skew_reverse_kl",
        "total_variation",
        "alpha_beta_divergence",
        "adaptive_kl",
        "bild",
    ],
)
def test_chunked_equals_unchunked_for_every_divergence(name):
    hidden, head, leaves = _student("bias")
    kw = dict(divergence=name, alpha=0.0, temperature=1.5, normalizer=9, chunk_size=4)
    (lc, _, gc), (lu, _, gu) = _both(hidden, head, leaves, _labels(), _teacher("logits"), **kw)
    torch.testing.assert_close(lc, lu, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "adaptive_kl", "alpha_beta_divergence", "bild"])
def test_unchunked_matches_float64_reference(name):
    """The unchunked path itself against the loss written from its definition."""
    hidden, head, leaves = _student("softcap_scale")
    labels, teacher = _labels(), _teacher("logits")
    params = {"alpha": 0.2, "beta": 0.7} if name == "alpha_beta_divergence" else {}
    kw = dict(alpha=0.3, temperature=2.5, scale_t2=True, normalizer=20)
    for fn in (unchunked_kd_loss, chunked_kd_loss):
        loss, _ = fn(hidden, head, labels, teacher, divergence=name, divergence_kwargs=params, chunk_size=4, **kw)
        leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
        h64, w64, b64 = leaves64
        ref = reference_kd_loss(
            h64, w64, b64, labels, teacher.logits.double(), name=name, params=params, logit_scale=2.5, softcap=3.0, **kw
        )
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
        for g, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref, leaves64)):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)


def test_masked_rows_add_nothing():
    hidden, head, (h, w) = _student("plain")
    labels, teacher = _labels(), _teacher("logits")
    keep = (labels != -100).nonzero().squeeze(-1)
    # garbage in the masked rows must not matter, even NaN in the teacher
    teacher.logits[2] = float("nan")
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, alpha=0.5, normalizer=9, chunk_size=3)
    gh, gw = torch.autograd.grad(loss, [h, w])
    h2 = h.detach()[keep].requires_grad_(True)
    loss2, _ = chunked_kd_loss(h2, head, labels[keep], teacher.rows(keep), alpha=0.5, normalizer=9, chunk_size=3)
    gh2, gw2 = torch.autograd.grad(loss2, [h2, w])
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(gw, gw2)
    torch.testing.assert_close(gh[keep], gh2)
    assert (gh[[2, 7]] == 0).all()


@pytest.mark.parametrize("n", [0, N])
@pytest.mark.parametrize("fn", [chunked_kd_loss, unchunked_kd_loss])
def test_all_masked_gives_zero_not_nan(fn, n):
    h = _rand(n, H, seed=1).requires_grad_(True)
    w = torch.nn.Parameter(_rand(V, H, seed=2))
    labels = torch.full((n,), -100, dtype=torch.long)
    for normalizer in (0, 0.0, torch.tensor(0)):
        loss, stats = fn(h, Head(weight=w), labels, _teacher("logits", n=n), alpha=0.5, normalizer=normalizer)
        assert loss.requires_grad and float(loss.detach()) == 0.0 and float(stats["n_tokens"]) == 0
        gh, gw = torch.autograd.grad(loss, [h, w])
        assert (gh == 0).all() and (gw == 0).all()


def test_gradient_accumulation_with_global_normalizer():
    h, head, (_, w, b) = _student("bias")
    labels = _labels(masked=(1, 2, 3))  # uneven valid counts: 5 - 3 = 2 in the first half, 6 in the second
    teacher = _teacher("logits")
    total_valid = int((labels != -100).sum())
    kw = dict(alpha=0.3, temperature=2.0, chunk_size=2)
    loss, _ = chunked_kd_loss(h, head, labels, teacher, normalizer=total_valid, **kw)
    whole = torch.autograd.grad(loss, [h, w, b])

    def accumulate(per_micro_batch):
        grads = [torch.zeros_like(x) for x in (h, w, b)]
        for rows in (torch.arange(0, 5), torch.arange(5, N)):
            norm = int((labels[rows] != -100).sum()) if per_micro_batch else total_valid
            h_part = h.detach()[rows].requires_grad_(True)
            part, _ = chunked_kd_loss(h_part, head, labels[rows], teacher.rows(rows), normalizer=norm, **kw)
            gh, gw, gb = torch.autograd.grad(part, [h_part, w, b])
            grads[0][rows] += gh
            grads[1] += gw
            grads[2] += gb
        return grads

    for a, c in zip(accumulate(False), whole):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    # Normalizing each micro-batch by its own count (TRL #4719) gives different gradients.
    wrong = accumulate(True)
    assert not torch.allclose(wrong[1], whole[1], rtol=1e-3, atol=1e-5)
    # and a tensor normalizer (as after an all-reduce) works the same as an int
    loss_t, _ = chunked_kd_loss(h, head, labels, teacher, normalizer=torch.tensor(float(total_valid)), **kw)
    torch.testing.assert_close(loss_t, loss)


@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
def test_vocab_size_aligns_padded_teacher(teacher_kind):
    pad = 4
    hidden, head, leaves = _student("bias")
    teacher = _teacher(teacher_kind, vocab=V + pad)
    labels = _labels()
    kw = dict(alpha=0.25, temperature=1.5, normalizer=N, chunk_size=3)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_kd_loss(hidden, head, labels, teacher, **kw)
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, vocab_size=V, **kw)
    grads = torch.autograd.grad(loss, leaves)
    full = teacher.chunk_logits(0, N)
    assert full.shape[-1] == V + pad
    h64, w64, b64 = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = reference_kd_loss(
        h64,
        w64,
        b64,
        labels,
        full[:, :V].double(),
        name="forward_kl",
        params={},
        scale_t2=False,
        **kw_without(kw, "chunk_size"),
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, torch.autograd.grad(ref, [h64, w64, b64])):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)
    # the student head may be the padded one too: only its first V rows are used and get gradient
    w_pad = torch.nn.Parameter(torch.cat([head.weight.detach(), _rand(pad, H, seed=9)]))
    loss_p, _ = chunked_kd_loss(hidden, Head(weight=w_pad, bias=None), labels, teacher, vocab_size=V, **kw)
    (gw_pad,) = torch.autograd.grad(loss_p, [w_pad])
    assert gw_pad.shape == (V + pad, H) and (gw_pad[V:] == 0).all() and gw_pad[:V].abs().sum() > 0


def kw_without(kw, key):
    return {k: v for k, v in kw.items() if k != key}


@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "sparse"])
@pytest.mark.parametrize("fn", [chunked_kd_loss, unchunked_kd_loss])
def test_nonfinite_teacher_raises(fn, teacher_kind):
    hidden, head, _ = _student("plain")
    teacher = _teacher(teacher_kind)
    if teacher_kind == "logits":
        teacher.logits[5, 3] = float("inf")
    elif teacher_kind == "hidden":
        teacher.hidden[5, 0] = float("nan")
    else:
        teacher.logprobs[5, 1] = float("nan")
    with pytest.raises(PotstillError, match="row 5.*float32"):
        fn(hidden, head, _labels(), teacher, normalizer=N, chunk_size=4)


def test_alpha_one_is_plain_cross_entropy_without_teacher():
    hidden, head, leaves = _student("bias")
    labels = _labels()
    loss, stats = chunked_kd_loss(hidden, head, labels, None, alpha=1.0, normalizer=9, chunk_size=4)
    logits = hidden @ head.weight.T + head.bias
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / 9
    torch.testing.assert_close(loss, ce)
    assert float(stats["kd_sum"]) == 0.0
    for g, r in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ce, leaves)):
        torch.testing.assert_close(g, r)
    # a teacher that is there but broken is never read at alpha = 1
    broken = DenseSignal(logits=torch.full((N, V), float("nan")))
    loss_b, _ = chunked_kd_loss(hidden, head, labels, broken, alpha=1.0, normalizer=9)
    torch.testing.assert_close(loss_b, loss)


def test_input_validation():
    hidden, head, _ = _student("plain")
    labels, teacher = _labels(), _teacher("logits")
    with pytest.raises(ValueError, match="teacher signal is required"):
        chunked_kd_loss(hidden, head, labels, None, alpha=0.5, normalizer=1)
    with pytest.raises(ValueError, match="rows must align"):
        chunked_kd_loss(hidden, head, labels, _teacher("logits", n=N - 1), normalizer=1)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(hidden, head, labels[:-1], teacher, normalizer=1)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(hidden, head, torch.full((N,), V), teacher, normalizer=1)
    with pytest.raises(ValueError, match="hidden size"):
        chunked_kd_loss(hidden[:, :3], head, labels, teacher, normalizer=1)
    with pytest.raises(ValueError, match="alpha"):
        chunked_kd_loss(hidden, head, labels, teacher, alpha=1.5, normalizer=1)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_kd_loss(hidden, head, labels, teacher, divergence="kl", normalizer=1)


def test_never_asks_teacher_for_more_than_a_chunk():
    seen = []

    class Recording(DenseSignal):
        def chunk_logits(self, start, end, vocab_size=None):
            seen.append(end - start)
            return super().chunk_logits(start, end, vocab_size)

    hidden, head, _ = _student("plain")
    t = _teacher("logits")
    loss, _ = chunked_kd_loss(hidden, head, _labels(), Recording(logits=t.logits), normalizer=N, chunk_size=3)
    loss.backward()
    assert seen and max(seen) <= 3 and sum(seen) == N


U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def test_bf16_inputs_give_bf16_grads_close_to_fp32():
    """bf16 hidden / head / teacher give bf16 gradients within 30 * 2^-8 of float32's, relative in norm.

    Derivation (first order, u = 2^-8, as in tests/kd/test_precision.py and the README's precision
    paragraph). Rounding h, W, b and the matmul's output to bf16 moves each student logit by <= 3u
    relative to sum_i |W_ji||h_i| + |b_j|, and the teacher's logits by <= u of theirs. Since
    q_j = e^{z_j} / sum_k e^{z_k}, a logit error delta changes each q_j by a factor within e^{+-2 max|delta|},
    so d loss / dz (softmax minus a target, per term) carries <= 2 * 3u * s relative error, s ~ 2.5 the
    logit scale here (sum of 5 products of unit normals plus a unit-normal bias: sd sqrt(6)): ~15u.
    The backward then rounds d loss / dz to bf16 (u), its product with the bf16 W or h (u) and the
    scaled result in the input's dtype (u), with W or h itself already rounded (u): 4u more, ~19u in
    all; c = 30 leaves room for the larger logits of the tail. (Measured: about 1u per gradient.)
    The gradients must also differ from float32's, so that bf16 is known to have taken effect.
    """
    hidden, head, (h, w, b) = _student("bias")
    labels, teacher = _labels(), _teacher("logits")
    kw = dict(alpha=0.5, temperature=2.0, normalizer=9, chunk_size=4)
    loss, _ = chunked_kd_loss(h, head, labels, teacher, **kw)
    ref = torch.autograd.grad(loss, [h, w, b])
    hb = h.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    bb = b.detach().bfloat16().requires_grad_(True)
    tb = DenseSignal(logits=teacher.logits.bfloat16())
    loss_b, _ = chunked_kd_loss(hb, Head(weight=wb, bias=bb), labels, tb, **kw)
    grads = torch.autograd.grad(loss_b, [hb, wb, bb])
    assert loss_b.dtype == torch.float32
    torch.testing.assert_close(loss_b, loss, rtol=3e-2, atol=3e-2)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref):
        assert g.dtype == torch.bfloat16
        rel = float((g.float() - r).norm() / r.norm())
        assert 0.0 < rel <= 30 * U_BF16, (name, rel)


def test_backward_scales_by_upstream_gradient_and_no_grad_mode():
    hidden, head, leaves = _student("bias")
    labels, teacher = _labels(), _teacher("sparse")
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, normalizer=9, chunk_size=4)
    g1 = torch.autograd.grad(loss, leaves)
    loss, _ = chunked_kd_loss(hidden, head, labels, teacher, normalizer=9, chunk_size=4)
    g3 = torch.autograd.grad(loss * 3.0, leaves)
    for a, c in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, c)
    with torch.no_grad():
        loss_ng, _ = chunked_kd_loss(hidden, head, labels, teacher, normalizer=9, chunk_size=4)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())


@pytest.mark.parametrize(
    "name,params",
    [
        ("forward_kl", {}),
        ("reverse_kl", {}),
        ("skew_forward_kl", {"alpha": 0.3}),
        ("skew_forward_kl", {"alpha": 0.0}),
        ("adaptive_kl", {"mu": 0.5}),
        ("adaptive_kl", {"mu": 0.9}),
    ],
)
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("variant", ["plain", "bias", "frozen", "tied"])
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
def test_closed_form_gradient_path_equals_autograd_reference(name, params, alpha, temperature, variant, teacher_kind):
    """The closed-form chunk path (plain heads, these divergences) against plain autograd on full logits."""
    from potstill.divergences.closed_form import CLOSED_FORM

    assert name in CLOSED_FORM
    hidden, head, leaves = _student(variant, seed=31)
    kw = dict(
        divergence=name,
        divergence_kwargs=params,
        alpha=alpha,
        temperature=temperature,
        scale_t2=True,
        normalizer=11,
        chunk_size=3,
    )
    (lc, sc, gc), (lu, su, gu) = _both(hidden, head, leaves, _labels(), _teacher(teacher_kind), **kw)
    torch.testing.assert_close(lc, lu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sc["kd_sum"], su["kd_sum"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sc["ce_sum"], su["ce_sum"], rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, gu):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ closed forms against a sparse teacher

SPARSE_KINDS = [
    "sampled",
    "sampled_proposal",
    "sampled_repeats",
    "bucket",
    "bucket_tail",
    "bucket_all_ids",
    "renormalize",
]


def _sparse_teacher(kind, n=N, k=6, seed=200):
    """Sparse signals with padding slots (ids -1, 0 and ids listed in the same row) and a row
    without ids (row 4), at temperature 1 of random teacher logits."""
    lp = torch.log_softmax(_rand(n, V, seed=seed, scale=2.0), -1).double()
    g = torch.Generator().manual_seed(seed + 1)
    if kind.startswith("sampled"):
        lr = torch.log_softmax(lp / 2.0, -1) if kind == "sampled_proposal" else lp
        drawn = torch.multinomial(lr.exp(), k, replacement=True, generator=g)
        if kind == "sampled_repeats":  # one slot per draw: ids repeat within a row
            ids, w = drawn, torch.full((n, k), 1.0 / k, dtype=torch.float64)
        else:  # unique ids with counts
            counts = torch.zeros(n, V, dtype=torch.float64).scatter_add_(
                -1, drawn, torch.ones(n, k, dtype=torch.float64)
            )
            c, ids = counts.sort(-1, descending=True)
            c, ids = c[:, :k], ids[:, :k]
            w = c / k
        w = w * (lp.gather(-1, ids) - lr.gather(-1, ids)).exp()
        logprobs = lp.gather(-1, ids)
        real = w > 0
        logprobs = torch.where(real, logprobs, float("-inf"))
        ids = torch.where(real, ids, torch.where(torch.arange(k) % 2 == 0, -1, ids[:, :1]))
        ids[4], logprobs[4], w[4] = -1, float("-inf"), 0.0
        return SparseSignal(ids=ids, logprobs=logprobs.float(), weights=w.float())
    if kind == "bucket_all_ids":  # every id (row 3: all but two), in random order
        ids = torch.stack([torch.randperm(V, generator=g) for _ in range(n)])
        logprobs = lp.gather(-1, ids)
        logprobs[3, :2] = float("-inf")
        ids[3, :2] = ids[3, 5]
        logprobs[4] = float("-inf")
        tail = torch.full((n,), -4.0)  # no outcome when the ids cover V: ignored
        return SparseSignal(ids=ids, logprobs=logprobs.float(), tail_logprob=tail)
    vals, ids = lp.topk(k, -1)
    listed = torch.zeros(n, V, dtype=torch.bool).scatter_(-1, ids, True)
    tail = torch.logsumexp(lp.masked_fill(listed, float("-inf")), -1)
    vals[1, 4:], ids[1, 4:] = float("-inf"), torch.tensor([-1, 0])
    vals[2, 3:], ids[2, 3:] = float("-inf"), ids[2, 0]
    vals[4] = float("-inf")
    if kind == "bucket_tail":  # quantized-like log-probs and the exact tail: renormalized
        vals = torch.round(vals * 8) / 8
        return SparseSignal(ids=ids, logprobs=vals.float(), tail_logprob=tail.float())
    return SparseSignal(ids=ids, logprobs=vals.float(), tail="renormalize" if kind == "renormalize" else "bucket")


def _no_autograd_path(monkeypatch):
    from potstill.divergences import chunked

    def fail(*args, **kwargs):
        raise AssertionError("the sparse closed form should not fall back to the autograd path")

    monkeypatch.setattr(chunked, "_chunk_loss", fail)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("variant", ["plain", "bias", "tied"])
@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_sparse_forward_kl_closed_form(kind, variant, temperature, alpha, monkeypatch):
    """Forward KL against sparse signals takes the closed form; it equals the autograd path and
    the float64 reference in loss, kd_sum and gradients."""
    from .reference import sparse_kd_loss

    hidden, head, leaves = _student(variant, seed=41)
    labels, teacher = _labels(), _sparse_teacher(kind)
    kw = {"divergence": "forward_kl", "alpha": alpha, "temperature": temperature, "scale_t2": True, "normalizer": 11}
    loss_u, stats_u = unchunked_kd_loss(hidden, head, labels, teacher, **kw)
    grads_u = torch.autograd.grad(loss_u, leaves, retain_graph=True)
    _no_autograd_path(monkeypatch)
    loss_c, stats_c = chunked_kd_loss(hidden, head, labels, teacher, chunk_size=4, **kw)
    grads_c = torch.autograd.grad(loss_c, leaves)
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-6)
    for key in ("ce_sum", "kd_sum"):
        torch.testing.assert_close(stats_c[key], stats_u[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_u):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if variant == "tied":
        return  # the reference takes the head and the hidden states as independent inputs
    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    h64, w64, b64 = leaves64 + [None] * (3 - len(leaves64))
    ref = sparse_kd_loss(h64, w64, b64, labels, teacher, **kw_without(kw, "divergence"))
    torch.testing.assert_close(loss_c.double(), ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads_c, torch.autograd.grad(ref, leaves64)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)


def test_sparse_closed_form_when_the_student_tail_underflows(monkeypatch):
    """A student whose mass outside the ids is below float32's range: those rows are redone in
    log space, so the tail term keeps its exact (finite) value and gradient."""
    from .reference import sparse_kd_loss

    hidden, _, _ = _student("plain", seed=43)
    weight = torch.nn.Parameter(_rand(V, H, seed=44) * 0.1)
    teacher = _sparse_teacher("bucket")
    bias = torch.full((V,), -150.0)
    bias[teacher.ids[0]] = 0.0  # row 0's ids: every other token gets about e^-150 of the mass
    bias = torch.nn.Parameter(bias)
    head, leaves = Head(weight=weight, bias=bias), [hidden, weight, bias]
    labels = _labels()
    kw = {"divergence": "forward_kl", "alpha": 0.0, "temperature": 1.0, "normalizer": 11}
    loss_u, _ = unchunked_kd_loss(hidden, head, labels, teacher, **kw)
    grads_u = torch.autograd.grad(loss_u, leaves)
    _no_autograd_path(monkeypatch)
    loss_c, _ = chunked_kd_loss(hidden, head, labels, teacher, chunk_size=4, **kw)
    grads_c = torch.autograd.grad(loss_c, leaves)
    assert torch.isfinite(loss_c) and all(torch.isfinite(g).all() for g in grads_c)
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_u):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = sparse_kd_loss(*leaves64, labels, teacher, alpha=0.0, temperature=1.0, scale_t2=False, normalizer=11)
    torch.testing.assert_close(loss_c.double(), ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads_c, torch.autograd.grad(ref, leaves64)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)


def test_sparse_autograd_path_for_other_divergences_and_heads():
    """Only forward KL with a plain head has the sparse closed form; the rest still agree."""
    from potstill.divergences import chunked

    calls = []
    original = chunked._chunk_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for divergence, variant in (("reverse_kl", "bias"), ("forward_kl", "softcap_scale")):
        hidden, head, leaves = _student(variant, seed=45)
        labels, teacher = _labels(), _sparse_teacher("sampled")
        kw = {"divergence": divergence, "alpha": 0.3, "temperature": 1.5, "normalizer": 11}
        chunked._chunk_loss, calls[:] = spy, []
        try:
            loss_c, _ = chunked_kd_loss(hidden, head, labels, teacher, chunk_size=4, **kw)
        finally:
            chunked._chunk_loss = original
        assert calls
        loss_u, _ = unchunked_kd_loss(hidden, head, labels, teacher, **kw)
        torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(loss_c, leaves), torch.autograd.grad(loss_u, leaves)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sparse_signal_errors_in_the_reducer():
    hidden, head, _ = _student("plain")
    labels = _labels()
    sampled = _sparse_teacher("sampled")
    with pytest.raises(ValueError, match="adaptive_kl.*top-k or dense"):
        chunked_kd_loss(hidden, head, labels, sampled, divergence="adaptive_kl", normalizer=N)
    bad = SparseSignal(ids=sampled.ids, logprobs=sampled.logprobs, weights=-sampled.weights)
    with pytest.raises(ValueError, match=">= 0"):
        chunked_kd_loss(hidden, head, labels, bad, normalizer=N)
    top = _sparse_teacher("bucket")
    dup = top.ids.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="duplicate"):
        chunked_kd_loss(hidden, head, labels, SparseSignal(ids=dup, logprobs=top.logprobs), normalizer=N)
    # ...but not in a masked row (row 2), which is never read
    dup = top.ids.clone()
    dup[2, 1] = dup[2, 0]
    chunked_kd_loss(hidden, head, labels, SparseSignal(ids=dup, logprobs=top.logprobs), normalizer=N)
    tail = _sparse_teacher("bucket_tail")
    with pytest.raises(ValueError, match="tail_logprob"):
        chunked_kd_loss(
            hidden, head, labels, SparseSignal(tail.ids, tail.logprobs, tail_logprob=torch.zeros(3)), normalizer=N
        )
    nan_tail = tail.tail_logprob.clone()
    nan_tail[5] = float("nan")
    for fn in (chunked_kd_loss, unchunked_kd_loss):
        with pytest.raises(PotstillError, match="row 5"):
            fn(hidden, head, labels, SparseSignal(tail.ids, tail.logprobs, tail_logprob=nan_tail), normalizer=N)


# ------------------------------------------------------------------ per-row divergence weights


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize(
    "name,teacher_kind,variant",
    [
        ("forward_kl", "logits", "plain"),  # dense closed form
        ("reverse_kl", "hidden", "bias"),  # dense closed form, lazy teacher
        ("adaptive_kl", "logits", "plain"),  # dense closed form with its own row weights
        ("forward_kl", "sparse", "plain"),  # sparse closed form (bucket)
        ("forward_kl", "sparse_renorm", "tied"),  # sparse closed form (renormalize)
        ("generalized_jsd", "logits", "softcap_scale"),  # autograd path
    ],
)
def test_kd_weights_are_a_weighted_sum_of_single_row_losses(name, teacher_kind, variant, alpha, temperature):
    """With weights w, the loss is alpha * CE + (1 - alpha) * sum_i w_i * D_i, where D_i is
    the divergence of row i alone (every other row masked out): checked on values and gradients
    of chunked and unchunked, against single-row runs that never see a weight."""
    hidden, head, leaves = _student(variant, seed=3)
    labels, teacher = _labels(), _teacher(teacher_kind)
    w = torch.rand(N, generator=torch.Generator().manual_seed(5)) * 2
    w[4] = 0.0
    kw = dict(divergence=name, temperature=temperature, normalizer=N, chunk_size=4)
    ce_loss, _ = unchunked_kd_loss(hidden, head, labels, None, alpha=1.0, **kw)
    ref = alpha * ce_loss
    for i in range(N):
        if labels[i] == -100:
            continue
        single = torch.full_like(labels, -100)
        single[i] = labels[i]
        li, _ = unchunked_kd_loss(hidden, head, single, teacher, alpha=0.0, **kw)
        ref = ref + (1 - alpha) * w[i] * li
    ref_grads = torch.autograd.grad(ref, leaves, retain_graph=True)
    for fn in (chunked_kd_loss, unchunked_kd_loss):
        loss, stats = fn(hidden, head, labels, teacher, alpha=alpha, kd_weights=w, **kw)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(torch.autograd.grad(loss, leaves, retain_graph=True), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_kd_weights_of_one_change_nothing_and_bad_weights_raise():
    hidden, head, leaves = _student("plain")
    labels, teacher = _labels(), _teacher("logits")
    kw = dict(divergence="forward_kl", alpha=0.3, normalizer=N, chunk_size=4)
    a, _ = chunked_kd_loss(hidden, head, labels, teacher, **kw)
    b, _ = chunked_kd_loss(hidden, head, labels, teacher, kd_weights=torch.ones(N), **kw)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"kd_weights must be \[n\]"):
        chunked_kd_loss(hidden, head, labels, teacher, kd_weights=torch.ones(N + 1), **kw)
    bad = torch.ones(N)
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="finite and >= 0"):
        chunked_kd_loss(hidden, head, labels, teacher, kd_weights=bad, **kw)


# ------------------------------------------------------------------ per-row divergence parameters


@pytest.mark.parametrize("chunk_size", [1, 4, 50])
@pytest.mark.parametrize(
    "name,teacher_kind,variant",
    [
        ("skew_forward_kl", "logits", "plain"),  # has a closed form: per-row alphas must leave it
        ("skew_reverse_kl", "hidden", "bias"),
        ("skew_forward_kl", "logits", "softcap_scale"),
    ],
)
def test_row_divergence_kwargs_equal_single_row_losses_with_scalar_parameters(chunk_size, name, teacher_kind, variant):
    """A per-row skew alpha (DistiLLM-2's per-sequence curriculum) gives the sum over rows of
    the loss of each row alone with its alpha as a plain scalar: values and gradients."""
    hidden, head, leaves = _student(variant, seed=4)
    labels, teacher = _labels(), _teacher(teacher_kind)
    a = torch.rand(N, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.01
    kw = dict(divergence=name, temperature=1.5, normalizer=N, alpha=0.3)
    ce_loss, _ = unchunked_kd_loss(hidden, head, labels, None, **{**kw, "alpha": 1.0})
    ref = 0.3 * ce_loss
    for i in range(N):
        if labels[i] == -100:
            continue
        single = torch.full_like(labels, -100)
        single[i] = labels[i]
        li, _ = unchunked_kd_loss(
            hidden, head, single, teacher, divergence_kwargs={"alpha": float(a[i])}, **{**kw, "alpha": 0.0}
        )
        ref = ref + 0.7 * li
    ref_grads = torch.autograd.grad(ref, leaves, retain_graph=True)
    loss, _ = chunked_kd_loss(
        hidden,
        head,
        labels,
        teacher,
        chunk_size=chunk_size,
        divergence_kwargs={"alpha": 0.9},
        row_divergence_kwargs={"alpha": a},
        **kw,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, leaves, retain_graph=True), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_row_divergence_kwargs_are_checked():
    hidden, head, _ = _student("plain")
    labels = _labels()
    kw = dict(divergence="skew_forward_kl", normalizer=N)
    with pytest.raises(ValueError, match=r"must be \[n\]"):
        chunked_kd_loss(hidden, head, labels, _teacher("logits"), row_divergence_kwargs={"alpha": torch.ones(3)}, **kw)
    with pytest.raises(ValueError, match="dense teacher"):
        chunked_kd_loss(hidden, head, labels, _teacher("sparse"), row_divergence_kwargs={"alpha": torch.ones(N)}, **kw)
    with pytest.raises(ValueError, match="in every row"):
        chunked_kd_loss(
            hidden, head, labels, _teacher("logits"), row_divergence_kwargs={"alpha": torch.full((N,), 1.5)}, **kw
        )
