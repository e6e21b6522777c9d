"""Bayesian KD for an LLM student (potstill.kd.bayesian_lm): the token-level BKD potential and its SGLD step over
LoRA parameters against a float64 full-logit reference, the posterior predictive's token calibration against a
by-hand loop, the point estimate against the evaluator, the recipe's refusals and an end-to-end distill run that
writes, reports and reuses its posterior."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import pair_examples, recipe

from potstill.kd.bayesian_lm import lm_posterior_predict, sample_lm_posterior, sampled_parameters

LAMBDA, TAU = 3.0, 2.0


def _lora(model):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero B, so that every adapter tensor has a gradient
        for n, p in m.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return m


def _full_logits(model, ex: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 next-token logits at the response positions of one example, and their reference tokens."""
    ids = torch.tensor([ex["prompt_ids"] + ex["response_ids"]])
    logits = model(ids).logits[0].double()
    start = len(ex["prompt_ids"])
    return logits[start - 1 : -1], torch.tensor(ex["response_ids"])


def _reference_potential(student, teacher, examples, vocab: int) -> torch.Tensor:
    """U = sum over response tokens of -log q(y) - log Dir(softmax(z_S / tau); 1 + lambda softmax(z_T / tau))."""
    total = torch.zeros((), dtype=torch.float64)
    for ex in examples:
        zs, y = _full_logits(student, ex)
        with torch.no_grad():
            zt, _ = _full_logits(teacher, ex)
        zs, zt = zs[:, :vocab], zt[:, :vocab]
        for t in range(len(y)):
            nll = -torch.log_softmax(zs[t], -1)[y[t]]
            a = 1.0 + LAMBDA * torch.softmax(zt[t] / TAU, -1)
            log_q = torch.log_softmax(zs[t] / TAU, -1)
            log_dir = ((a - 1) * log_q).sum() - torch.lgamma(a).sum() + torch.lgamma(a.sum())
            total = total + nll - log_dir
    return total


def test_potential_and_sgld_step_match_a_float64_reference(tiny_teacher, tiny_student, tiny_tokenizer):
    """One noiseless SGLD step over the whole set: U is the token-level BKD potential and the LoRA update is
    -eps/2 grad U (plain KD's loss or gradient would differ: it has no Dirichlet normaliser and no CE term)."""
    tok, examples, vocab = tiny_tokenizer, pair_examples(tiny_tokenizer), len(tiny_tokenizer)
    student = _lora(tiny_student)
    ref = copy.deepcopy(student)
    params = sampled_parameters(ref)
    u_ref = _reference_potential(ref, tiny_teacher, examples, vocab)
    u_ref.backward()
    lr = 1e-3
    before = {n: p.detach().clone() for n, p in sampled_parameters(student).items()}
    log = sample_lm_posterior(
        student,
        tiny_teacher,
        examples,
        vocab=vocab,
        pad_id=tok.pad_token_id,
        prior_strength=LAMBDA,
        temperature=TAU,
        lr=lr,
        burn_in=0,
        samples=1,
        noise_scale=0.0,
        batch_size=len(examples),  # one batch is the whole set: no N / n_B rescaling
    )
    assert log.tokens == sum(len(ex["response_ids"]) for ex in examples)
    assert log.potential[0] == pytest.approx(float(u_ref), rel=1e-5)
    for n, p in sampled_parameters(student).items():
        expected = before[n] - lr / 2 * params[n].grad.to(before[n].dtype)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-7)
    assert len(log.snapshots) == 1
    torch.testing.assert_close(log.snapshots[0][n], p.detach())


def test_batch_potential_is_scaled_to_the_whole_set(tiny_teacher, tiny_student, tiny_tokenizer):
    """With batches smaller than the set, each potential is the batch's token sum times N / n_B."""
    examples = pair_examples(tiny_tokenizer)
    log = sample_lm_posterior(
        _lora(tiny_student),
        tiny_teacher,
        examples,
        vocab=len(tiny_tokenizer),
        pad_id=tiny_tokenizer.pad_token_id,
        prior_strength=LAMBDA,
        temperature=TAU,
        lr=1e-9,
        burn_in=0,
        samples=1,
        noise_scale=0.0,
        batch_size=1,
        seed=0,
    )
    from potstill.schedule import reshuffled_batches

    first = examples[next(reshuffled_batches(len(examples), 1, 0))[0]]
    n, n_b = log.tokens, len(first["response_ids"])
    u_one = _reference_potential(_lora(tiny_student), tiny_teacher, [first], len(tiny_tokenizer))
    assert log.potential[0] == pytest.approx(float(u_one) * n / n_b, rel=1e-5)


def _by_hand(student, snapshots, examples, vocab: int, level: float) -> dict:
    """The posterior predictive's token metrics by explicit loops over tokens and bins."""
    params = sampled_parameters(student)
    per_sample = []
    for state in snapshots:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
            rows, ys = [], []
            for ex in examples:
                z, y = _full_logits(student, ex)
                rows.append(torch.softmax(z[:, :vocab], -1))
                ys.append(y)
        per_sample.append(torch.cat(rows))
    probs, y = torch.stack(per_sample), torch.cat(ys)
    mean = probs.mean(0)
    toks = []
    for t in range(len(y)):
        c = int(mean[t].argmax())
        vals = sorted(float(probs[s, t, c]) for s in range(len(snapshots)))
        lo_q, hi_q = (1 - level) / 2, (1 + level) / 2

        def quant(q, vals=vals):  # linear interpolation between order statistics
            pos = q * (len(vals) - 1)
            k = math.floor(pos)
            return vals[k] + (pos - k) * (vals[min(k + 1, len(vals) - 1)] - vals[k])

        toks.append(
            {
                "conf": float(mean[t, c]),
                "right": c == int(y[t]),
                "lo": quant(lo_q),
                "hi": quant(hi_q),
                "brier": sum((float(mean[t, v]) - float(v == int(y[t]))) ** 2 for v in range(vocab)),
                "nll": -math.log(float(mean[t, y[t]])),
            }
        )
    bins: dict[int, list[dict]] = {}
    for r in toks:
        b = max(0, math.ceil(r["conf"] * 15) - 1)
        bins.setdefault(b, []).append(r)
    ece, covered = 0.0, 0
    for members in bins.values():
        acc = sum(r["right"] for r in members) / len(members)
        conf = sum(r["conf"] for r in members) / len(members)
        ece += len(members) / len(toks) * abs(acc - conf)
        covered += sum(r["lo"] <= acc <= r["hi"] for r in members)
    n = len(toks)
    return {
        "accuracy": sum(r["right"] for r in toks) / n,
        "ece": ece,
        "brier": sum(r["brier"] for r in toks) / n,
        "perplexity": math.exp(sum(r["nll"] for r in toks) / n),
        "coverage": covered / n,
        "mean_width": sum(r["hi"] - r["lo"] for r in toks) / n,
        "tokens": n,
    }


def test_posterior_predict_matches_a_loop(tiny_student, tiny_tokenizer):
    examples, vocab = pair_examples(tiny_tokenizer), len(tiny_tokenizer)
    student = _lora(tiny_student)
    base = {n: p.detach().clone() for n, p in sampled_parameters(student).items()}
    g = torch.Generator().manual_seed(1)
    snapshots = [{n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(3)]
    got = lm_posterior_predict(
        student, snapshots, examples, vocab=vocab, pad_id=tiny_tokenizer.pad_token_id, level=0.9, batch_size=3
    )
    want = _by_hand(copy.deepcopy(student), snapshots, examples, vocab, 0.9)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert got["mean_width"] > 0 and got["samples"] == 3
    # the student is left at the last sample
    for n, p in sampled_parameters(student).items():
        torch.testing.assert_close(p.detach(), snapshots[-1][n])


def test_a_point_estimate_has_zero_width_and_the_evaluators_figures(tiny_teacher, tiny_student, tiny_tokenizer):
    """One state through the same code: intervals of width 0, and the evaluator's perplexity and token ECE."""
    from potstill.eval import evaluate_runs

    examples, vocab = pair_examples(tiny_tokenizer), len(tiny_tokenizer)
    student = _lora(tiny_student)
    state = {n: p.detach().clone() for n, p in sampled_parameters(student).items()}
    got = lm_posterior_predict(student, [state], examples, vocab=vocab, pad_id=tiny_tokenizer.pad_token_id)
    merged = copy.deepcopy(student).merge_and_unload()
    ev = evaluate_runs(
        {"s": merged}, tiny_teacher, tiny_tokenizer, examples, vocab_size=vocab, max_new_tokens=0, progress=False
    )["s"]
    assert got["mean_width"] == 0.0
    assert got["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-4)
    assert got["ece"] == pytest.approx(ev["ece"], abs=1e-5)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({}, "add train.lora"),
        ({"train.lora": {"r": 2}, "cache": {}}, "live teacher"),
        ({"train.lora": {"r": 2}, "train.distributed": "ddp"}, "one process"),
    ],
)
def test_recipe_refuses_what_the_chain_cannot_run(assets, tmp_path, patch, needle):
    from potstill.recipes.distill import Recipe

    r = recipe(assets, tmp_path / "out", **patch)
    r["runs"] = [{"name": "b", "alpha": 0.5, "method": {"kind": "kd", "bayesian": {}}}]
    with pytest.raises(ValueError, match=needle):
        Recipe.model_validate(r)


def test_distill_run_reports_and_reuses_its_posterior(assets, tmp_path, monkeypatch):
    from potstill.recipes.distill import Recipe
    from potstill.runners import bayesian_lm as runner
    from potstill.runners.distill import distill

    out = tmp_path / "out"
    bayes = {"prior_strength": 2.0, "sgld": {"lr": 1e-6, "burn_in": 1, "samples": 2, "thin": 1}}
    r = recipe(
        assets,
        out,
        **{"train.lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}, "eval.max_new_tokens": 2},
    )
    r["student"] = {"kind": "from_teacher", "layers": 1}
    r["runs"] = [{"name": "kd", "alpha": 0.5, "method": {"kind": "kd", "bayesian": bayes}}]
    metrics = distill(Recipe.model_validate(r), progress=False)
    summary = json.loads((out / "runs" / "kd" / "bayesian.json").read_text())
    assert summary["sgld_steps"] == 3 and summary["posterior"]["samples"] == 2
    assert summary["point"]["mean_width"] == 0.0 and summary["posterior"]["mean_width"] > 0.0
    for k in runner.REPORTED:
        assert metrics["kd"][f"bkd_{k}"] == summary["posterior"][k]
    assert "Bayesian KD posterior" in (out / "report.md").read_text()
    # a rerun reuses the finished student and its posterior: no chain is sampled again
    monkeypatch.setattr(runner, "sample_lm_posterior", lambda *a, **k: pytest.fail("sampled again"))
    again = distill(Recipe.model_validate(r), progress=False)
    assert again["kd"]["bkd_ece"] == metrics["kd"]["bkd_ece"]
