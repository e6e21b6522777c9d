"""The cache's fidelity certificate: closed forms (k = V is exact, the top-k bucket never exceeds forward KL
and grows with k), the sampled signal's unbiasedness, the recommendation rule and its refusals, the signal
it measures against the one a real cache hands the trainer, and the probe built from tiny causal LMs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from potstill.data import PadCollator
from potstill.divergences import forward_kl, sparse_divergence
from potstill.errors import PotstillError
from potstill.models import final_hidden, output_head
from potstill.signals import target_index, target_rows
from potstill.signals.cache import CachedSignal, CacheSpec, write_cache
from potstill.signals.cache.certify import cached_signal, certify, certify_models
from potstill.signals.cache.encode import row_seed

from .cache_helpers import encode

pytestmark = pytest.mark.usefixtures("one_thread")

R, V = 24, 40


def probe(seed: int = 0, rows: int = R, vocab: int = V) -> tuple[torch.Tensor, torch.Tensor]:
    """A peaked teacher and a student that differs from it: ``[rows, vocab]`` float32 logits each."""
    g = torch.Generator().manual_seed(seed)
    teacher = 3.0 * torch.randn(rows, vocab, generator=g)
    student = teacher + 1.5 * torch.randn(rows, vocab, generator=g)
    return teacher, student


# ------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"])
def test_topk_over_the_whole_vocabulary_is_the_dense_signal(divergence):
    t, s = probe()
    out = certify(t, s, divergence, kind="topk", candidates=[V], dtype="fp32", temperature=2.0)
    (row,) = out["candidates"]
    # The bucket is empty on both sides: the same divergence, up to float32 summation order.
    assert abs(row["loss_bias"]) <= 1e-6
    assert row["grad_error"] <= 1e-6
    assert row["loss_std"] == 0.0 and row["grad_std"] == 0.0 and out["seeds"] == 1
    assert out["recommendation"] == V


def test_topk_bucket_forward_kl_is_below_dense_and_grows_with_k():
    t, s = probe(1)
    ks = [1, 2, 4, 8, 16]
    out = certify(t, s, "forward_kl", kind="topk", candidates=ks, dtype="fp32")
    bias = [row["loss_bias"] for row in out["candidates"]]
    # Data-processing inequality: a coarsening of p and q never has more KL; the top-k sets are nested, so a
    # larger k refines the partition and the bucket loss grows towards the dense one.
    assert all(b < 0 for b in bias)
    assert all(a < b for a, b in zip(bias, bias[1:]))
    assert [row["k"] for row in out["candidates"]] == ks


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_sampled_forward_kl_is_unbiased(proposal_temperature):
    t, s = probe(2)
    n_seeds = 48
    out = certify(
        t,
        s,
        "forward_kl",
        kind="sampled",
        candidates=[4],
        dtype="fp32",
        seeds=range(n_seeds),
        proposal_temperature=proposal_temperature,
    )
    (row,) = out["candidates"]
    assert out["seeds"] == n_seeds and row["loss_std"] > 0 and row["grad_std"] > 0
    # The mean over seeds is within four standard errors of the dense loss ...
    assert abs(row["loss_bias"]) <= 4 * row["loss_std"] / math.sqrt(n_seeds - 1)
    # ... and the mean gradient's distance to the dense one is what averaging S unbiased draws leaves:
    # E||mean - g||^2 = (population variance) / (S - 1), concentrated over R * V = 960 coordinates.
    assert row["grad_bias"] <= 1.5 * row["grad_std"] / math.sqrt(n_seeds - 1)
    assert row["loss_error"] == pytest.approx(math.hypot(row["loss_bias"], row["loss_std"]))
    assert row["grad_error"] == pytest.approx(math.hypot(row["grad_bias"], row["grad_std"]))


# ------------------------------------------------------------------------------ the recommendation


def test_the_recommendation_is_the_smallest_candidate_within_the_tolerance():
    t, s = probe(3)
    ks = [16, 1, 8, 4, 2]  # any order: rows come back ascending
    first = certify(t, s, "forward_kl", kind="topk", candidates=ks, dtype="fp32")
    rows = {row["k"]: row for row in first["candidates"]}
    worst = {k: max(r["loss_error"], r["grad_error"]) for k, r in rows.items()}
    assert [worst[k] for k in sorted(ks)] == sorted(worst.values(), reverse=True)  # the example is monotone
    tol = worst[8]
    out = certify(t, s, "forward_kl", kind="topk", candidates=ks, dtype="fp32", tolerance=tol)
    assert [row["ok"] for row in out["candidates"]] == [False, False, False, True, True]
    assert out["recommendation"] == 8
    assert out["reason"].startswith("k=8 is the smallest candidate") and out["tolerance"] == tol
    json.dumps(out)


def test_a_tolerance_no_candidate_meets_says_why():
    t, s = probe(4)
    out = certify(t, s, "reverse_kl", kind="topk", candidates=[2, 8], tolerance=1e-6)
    assert out["recommendation"] is None and not any(row["ok"] for row in out["candidates"])
    assert out["reason"].startswith("no k of 2, 8 is within the tolerance 1e-06: the best, k=8,")
    assert "dense" in out["reason"]
    out = certify(t, s, "forward_kl", kind="sampled", candidates=[2], seeds=range(3), tolerance=1e-6)
    assert out["recommendation"] is None and "more draws" in out["reason"]


@pytest.mark.parametrize(
    ("divergence", "params", "kind", "why"),
    [
        ("adaptive_kl", {"mu": 0.5}, "sampled", "full ranking"),
        ("bild", {"top_k": 4, "student_led": False}, "sampled", "top-k logits"),
        ("bild", {"top_k": 4}, "topk", "student-led"),
    ],
)
def test_a_divergence_the_signal_cannot_give_is_refused_with_the_reason(divergence, params, kind, why):
    t, s = probe(5)
    out = certify(t, s, divergence, params, kind=kind, candidates=[8, 16], seeds=range(2))
    assert out["recommendation"] is None
    assert out["reason"].startswith(f"{divergence} cannot be computed from a {kind} signal: ")
    assert why in out["reason"]
    for row in out["candidates"]:
        assert not row["ok"] and why in row["refused"] and row["loss_bias"] is None and row["grad_error"] is None
    json.dumps(out)


def test_bild_teacher_led_from_topk_is_certified():
    t, s = probe(6)
    out = certify(t, s, "bild", {"top_k": 4, "student_led": False}, kind="topk", candidates=[4, 8], dtype="fp32")
    # t-LD reads only the teacher's top-4 logits, which every k >= 4 holds exactly (up to fp32 rounding).
    assert out["recommendation"] == 4
    assert all(row["refused"] is None and row["grad_error"] <= 1e-5 for row in out["candidates"])


def test_a_student_equal_to_the_teacher_is_refused():
    t, _ = probe(7)
    with pytest.raises(PotstillError, match="matches the teacher"):
        certify(t, t.clone(), "forward_kl", kind="topk", candidates=[4])


# ------------------------------------------------------------------------------ the head criterion

D = 6  # feature width of the head criterion's probes


def features(seed: int = 0, rows: int = R) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(100 + seed))


def keys_of(sizes: list[int]) -> list[tuple[int, int]]:
    """Row keys of examples with ``sizes`` rows each."""
    return [(e, r) for e, n in enumerate(sizes) for r in range(n)]


def explicit_head_metrics(t, s, f, keys, divergence, draws, seeds, kind):
    """The head criterion with every ``[d, V]`` gradient formed explicitly (no Gram matrices): the bias of the
    mean head gradient over the seeds with the mean's own noise subtracted, and the draws' variance of one
    step's head gradient over the minibatch variance at a batch of ``b`` examples (any ``b``), along the dense
    head gradient and in total."""
    x = s.clone().requires_grad_(True)
    (gd,) = torch.autograd.grad(forward_kl(x, t).mean(), x)
    r = t.shape[0]
    f64, gd = f.double(), gd.double()
    grads = []
    for seed in seeds:
        spec = CacheSpec(
            kind=kind, k=draws if kind == "topk" else 1, draws=draws if kind == "sampled" else 1, dtype="fp32"
        )
        sig = cached_signal(t, spec, t.shape[1], [row_seed(seed, e, i) for e, i in keys] if kind == "sampled" else None)
        x = s.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sparse_divergence(divergence, x, sig).mean(), x)
        grads.append(g.double())
    n = len(seeds)
    gd_head = f64.T @ gd  # [d, V]
    u = gd_head / gd_head.norm()
    # Row r's contribution to the head gradient: f_r outer (its logit gradient); per seed and dense.
    contrib = lambda g, i: f64[i][:, None] * g[i][None, :]  # noqa: E731
    mean_head = sum(f64.T @ g for g in grads) / n
    row_var = [torch.stack([contrib(g, i) for g in grads]).var(0).sum() if n > 1 else 0.0 for i in range(r)]
    row_var_along = [torch.stack([(contrib(g, i) * u).sum() for g in grads]).var(0) if n > 1 else 0.0 for i in range(r)]
    noise = float(sum(row_var))
    bias_sq = max(float((mean_head - gd_head).pow(2).sum()) - noise / n, 0.0)
    # Minibatch: b examples drawn with replacement; the batch gradient sum_{e in B} S_e / sum_{e in B} n_e
    # (S_e the example's sum of row contributions), linearised around the probe's mean gradient.
    ex = sorted({e for e, _ in keys})
    rows_of = {e: [i for i, (k, _) in enumerate(keys) if k == e] for e in ex}
    mean_c = sum(contrib(gd, i) for i in range(r)) / r
    n_bar = r / len(ex)
    dev = [sum(contrib(gd, i) for i in rows_of[e]) - len(rows_of[e]) * mean_c for e in ex]
    b = 3
    out = []
    for noise_rows, sq in (
        (row_var_along, lambda d: float((d * u).sum()) ** 2),
        (row_var, lambda d: float(d.pow(2).sum())),
    ):
        minibatch_var = sum(sq(d) for d in dev) / (len(ex) - 1) / (b * n_bar**2)
        draw_var = float(sum(noise_rows)) / r / (b * n_bar)  # independent rows: their variances add
        out.append(draw_var / minibatch_var)
    return math.sqrt(bias_sq / float(gd_head.pow(2).sum())), out[0], out[1]


@pytest.mark.parametrize(("kind", "draws", "n_seeds"), [("sampled", 4, 6), ("sampled", 16, 3), ("topk", 8, 1)])
def test_head_criterion_matches_an_explicit_computation(kind, draws, n_seeds):
    t, s = probe(8)
    f = features(8)
    keys = keys_of([5, 7, 3, 9])
    out = certify(
        t, s, "forward_kl", kind=kind, candidates=[draws], dtype="fp32", seeds=range(n_seeds), row_keys=keys, features=f
    )
    (row,) = out["candidates"]
    bias, along, total = explicit_head_metrics(t, s, f, keys, "forward_kl", draws, list(range(n_seeds)), kind)
    assert out["criterion"] == "head"
    assert row["head_grad_bias"] == pytest.approx(bias, rel=1e-5, abs=1e-9)
    assert row["noise_ratio"] == pytest.approx(along, rel=1e-5, abs=1e-12)
    assert row["noise_ratio_total"] == pytest.approx(total, rel=1e-5, abs=1e-12)
    if kind == "topk":
        assert row["noise_ratio"] == row["noise_ratio_total"] == 0.0 and row["head_grad_bias"] > 0.01  # biased
    else:
        assert 0 < row["noise_ratio"] != row["noise_ratio_total"]


def test_sampled_noise_falls_as_one_over_draws_and_its_bias_is_noise():
    t, s = probe(9)
    f = features(9)
    keys = keys_of([6, 6, 6, 6])
    out = certify(
        t,
        s,
        "forward_kl",
        kind="sampled",
        candidates=[4, 64],
        dtype="fp32",
        seeds=range(128),
        row_keys=keys,
        features=f,
    )
    few, many = out["candidates"]
    # The variance of a mean of n draws is the variance of one over n: 16x less ... up to the seeds' spread.
    assert 12 < few["noise_ratio"] / many["noise_ratio"] < 21
    # Unbiased: once the mean's own noise is subtracted, what is left is a small fraction of a top-k bucket's bias
    # (without the subtraction, 4 draws would read sqrt(noise / seeds) ~ 0.1 here).
    topk = certify(t, s, "forward_kl", kind="topk", candidates=[4], dtype="fp32", row_keys=keys, features=f)
    assert few["head_grad_bias"] < 0.1 * topk["candidates"][0]["head_grad_bias"]
    assert many["head_grad_bias"] < 0.1 * topk["candidates"][0]["head_grad_bias"]


def test_head_criterion_decides_by_bias_and_noise_tolerance():
    t, s = probe(10)
    f = features(10)
    keys = keys_of([6, 6, 6, 6])
    kw = dict(kind="sampled", candidates=[4, 16, 64], dtype="fp32", seeds=range(8), row_keys=keys, features=f)
    first = certify(t, s, "forward_kl", tolerance=10.0, **kw)
    ratios = {row["draws"]: row["noise_ratio"] for row in first["candidates"]}
    assert ratios[4] > ratios[16] > ratios[64]
    # The logit-gradient error of a few draws is far above any usual tolerance: the head criterion does not use it.
    assert first["candidates"][0]["grad_error"] > 0.3
    noise_tol = (ratios[16] + ratios[4]) / 2  # between: 16 and 64 within, 4 not
    out = certify(t, s, "forward_kl", tolerance=10.0, noise_tolerance=noise_tol, **kw)
    assert [row["ok"] for row in out["candidates"]] == [False, True, True] and out["recommendation"] == 16
    assert out["reason"].startswith("draws=16 is the smallest candidate within the tolerance 10 and noise tolerance")
    out = certify(t, s, "forward_kl", tolerance=10.0, noise_tolerance=ratios[64] / 2, **kw)
    assert out["recommendation"] is None and "more draws" in out["reason"]
    # Reverse KL from sampled ids weighs the student's mass by q/p where the teacher's draws rarely fall: at the
    # same draws its noise is many times forward KL's, and none of these is within the default tolerances.
    out = certify(t, s, "reverse_kl", tolerance=0.05, **kw)
    assert out["recommendation"] is None and out["noise_tolerance"] == 0.25
    assert all(r["noise_ratio"] > 5 * ratios[r["draws"]] for r in out["candidates"])
    json.dumps(out)


def test_head_criterion_refuses_a_probe_of_one_example():
    t, s = probe(11)
    with pytest.raises(ValueError, match="at least two examples"):
        certify(t, s, "forward_kl", kind="topk", candidates=[4], row_keys=keys_of([R]), features=features(11))
    with pytest.raises(ValueError, match="features"):
        certify(t, s, "forward_kl", kind="topk", candidates=[4], features=features(11, rows=R - 1))
    one = certify(
        t, s, "forward_kl", kind="sampled", candidates=[4], seeds=[0], row_keys=keys_of([12, 12]), features=features(11)
    )
    assert one["candidates"][0]["noise_ratio"] is None and not one["candidates"][0]["ok"]


# ------------------------------------------------------------------------------ against a real cache


@pytest.mark.parametrize(
    "spec",
    [
        CacheSpec(kind="topk", k=6, dtype="fp16", tail="bucket", temperature=2.0, batch_size=1),
        CacheSpec(kind="sampled", draws=8, dtype="int8", seed=3, batch_size=1),
        CacheSpec(kind="sampled", draws=8, dtype="bf16", proposal_temperature=1.5, seed=1, batch_size=1),
    ],
    ids=["topk-fp16", "sampled-int8", "sampled-tempered-bf16"],
)
def test_the_measured_signal_is_the_one_the_cache_hands_the_trainer(
    spec, tmp_path, _tiny_teacher_session, _tiny_tokenizer_session
):
    teacher, tok = _tiny_teacher_session, _tiny_tokenizer_session
    exs = encode(tok)[:3]
    write_cache(teacher, tok, exs, tmp_path / "c", spec, progress=False)
    cache = CachedSignal(tmp_path / "c")
    head = output_head(teacher)
    collate = PadCollator(tok.pad_token_id)
    for eid, ex in enumerate(exs):
        batch = collate([ex])
        got = cache.signal(batch)
        with torch.no_grad():
            hidden = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
            z = head(target_rows(hidden, target_index(batch["labels"]))).float()
        seeds = [row_seed(spec.seed, eid, r) for r in range(z.shape[0])] if spec.kind == "sampled" else None
        want = cached_signal(z, spec, head.vocab, seeds)
        assert torch.equal(want.ids, got.ids) and torch.equal(want.logprobs, got.logprobs)
        assert want.tail == got.tail
        for name in ("weights", "tail_logprob"):
            a, b = getattr(want, name), getattr(got, name)
            assert (a is None and b is None) or torch.equal(a, b), name


# ------------------------------------------------------------------------------ from models


def test_certify_models_builds_the_probe_from_target_rows(
    _tiny_teacher_session, _tiny_student_session, _tiny_tokenizer_session
):
    teacher, student, tok = _tiny_teacher_session, _tiny_student_session, _tiny_tokenizer_session
    exs = encode(tok)[:4]
    vocab = output_head(teacher).vocab
    max_rows = 20  # cuts the probe inside the second example
    out = certify_models(
        teacher,
        student,
        exs,
        "forward_kl",
        kind="topk",
        candidates=[4, vocab],
        max_rows=max_rows,
        batch_size=3,
        pad_id=tok.pad_token_id,
        dtype="fp32",
    )
    json.dumps(out)
    assert out["rows"] == max_rows and out["vocab"] == vocab and out["examples"] == 3
    # The dense loss, independently: the models' own logits at the positions that predict a label.
    with torch.no_grad():
        zt, zs = [], []
        for ex in exs:
            ids = torch.tensor([ex["input_ids"]])
            keep = torch.tensor(ex["labels"][1:]) != -100
            zt.append(teacher(ids).logits[0, :-1][keep])
            zs.append(student(ids).logits[0, :-1][keep])
        want = forward_kl(torch.cat(zs)[:max_rows], torch.cat(zt)[:max_rows]).mean()
    assert out["dense_loss"] == pytest.approx(float(want), rel=1e-5)
    rows = {row["k"]: row for row in out["candidates"]}
    # k = V is the dense signal: the losses differ by float32 rounding of log-probs of size log V (eps * log V
    # < 1e-6 absolute; the random models are near uniform, so the loss itself is small).
    assert abs(rows[vocab]["loss"] - out["dense_loss"]) <= 1e-6 and rows[vocab]["grad_error"] <= 1e-6
    assert rows[4]["loss_bias"] < 0
    assert teacher.training is False and student.training is False

    sampled = certify_models(
        teacher, student, exs, "forward_kl", kind="sampled", candidates=[8], max_rows=max_rows, seeds=[0, 1]
    )
    assert sampled["seeds"] == 2 and sampled["candidates"][0]["grad_std"] > 0
    # Rows of two examples or more: judged in the head gradient, with the student's hidden states as features.
    assert out["criterion"] == "head" and sampled["candidates"][0]["noise_ratio"] > 0
    one = certify_models(teacher, student, exs[:1], "forward_kl", kind="topk", candidates=[4], pad_id=tok.pad_token_id)
    assert one["criterion"] == "logits" and "noise_ratio" not in one["candidates"][0]


def test_certify_models_draws_what_the_cache_holds(
    tmp_path, _tiny_teacher_session, _tiny_student_session, _tiny_tokenizer_session
):
    """With the cache's seed, the probe's rows are keyed by (example id, row) as the cache's are: its one
    sampled signal is the cached one, so its loss is the loss from the cache."""
    teacher, student, tok = _tiny_teacher_session, _tiny_student_session, _tiny_tokenizer_session
    exs = encode(tok)[:3]
    spec = CacheSpec(kind="sampled", draws=6, dtype="fp16", temperature=2.0, seed=5, batch_size=1)
    write_cache(teacher, tok, exs, tmp_path / "c", spec, progress=False)
    cache = CachedSignal(tmp_path / "c")
    collate = PadCollator(tok.pad_token_id)
    with torch.no_grad():
        per_row = []
        for ex in exs:
            batch = collate([ex])
            keep = batch["labels"][0, 1:] != -100
            zs = student(batch["input_ids"]).logits[0, :-1][keep]
            per_row.append(sparse_divergence("forward_kl", zs, cache.signal(batch), temperature=2.0))
        want = torch.cat(per_row).mean()
    out = certify_models(
        teacher,
        student,
        exs,
        "forward_kl",
        kind="sampled",
        candidates=[spec.draws],
        batch_size=1,
        pad_id=tok.pad_token_id,
        dtype=spec.dtype,
        temperature=spec.temperature,
        seeds=[spec.seed],
    )
    assert out["rows"] == sum(len(r) for r in per_row) and out["seeds"] == 1
    assert out["candidates"][0]["loss"] == pytest.approx(float(want), rel=1e-5)
