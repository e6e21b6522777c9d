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
