"""`potstill compare`: per-example teacher-forced scores against the evaluator's aggregates, and an end-to-end run
on the tiny assets over two seeds: two identical runs are "no difference" with a zero interval, the table and
costs are written, a rerun reuses every seed, and what compare cannot judge is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import pair_examples, recipe

from potstill.errors import PotstillError
from potstill.eval.verdict import satterthwaite_df


def test_per_example_scores_average_to_the_evaluators_figures(tiny_teacher, tiny_student, tiny_tokenizer):
    """Token-weighted means of the per-example scores are evaluate_runs' forward KL, agreement and perplexity."""
    import math

    from potstill.eval import evaluate_runs, per_example_scores

    examples = pair_examples(tiny_tokenizer)
    per = per_example_scores({"s": tiny_student}, tiny_teacher, tiny_tokenizer, examples, batch_size=3)["s"]
    ev = evaluate_runs({"s": tiny_student}, tiny_teacher, tiny_tokenizer, examples, max_new_tokens=0, progress=False)
    n = [len(ex["response_ids"]) for ex in examples]
    total = sum(n)

    def weighted(key):
        return sum(v * k for v, k in zip(per[key], n, strict=True)) / total

    assert len(per["forward_kl"]) == len(examples)
    assert weighted("forward_kl") == pytest.approx(ev["s"]["forward_kl"], rel=1e-5)
    assert weighted("top1_agreement") == pytest.approx(ev["s"]["top1_agreement"], rel=1e-9)
    assert math.exp(weighted("nll")) == pytest.approx(ev["s"]["perplexity"], rel=1e-5)


def test_compare_end_to_end_identical_runs_and_resume(assets, tmp_path, monkeypatch):
    from potstill.recipes.distill import Recipe
    from potstill.runners import compare as runner
    from potstill.runners import distill as distill_runner

    out = tmp_path / "cmp"
    r = recipe(assets, out, **{"compare": {"seeds": [0, 1], "baseline": "kd", "n_boot": 200}})
    r["runs"] = [
        {"name": "kd", "alpha": 0.0, "divergence": {"name": "forward_kl"}},
        {"name": "kd_again", "alpha": 0.0, "divergence": {"name": "forward_kl"}},  # the same run: no difference
        {"name": "sft", "alpha": 1.0},
    ]
    result = runner.compare(Recipe.model_validate(r), progress=False)
    rows = {(c["arm"], c["metric"]): c for c in result["comparisons"]}
    assert set(rows) == {(a, m) for a in ("kd_again", "sft") for m in ("forward_kl", "top1_agreement", "nll")}
    for m in ("forward_kl", "top1_agreement", "nll"):
        same = rows[("kd_again", m)]
        assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0 and same["verdict"] == "no difference"
        assert len(rows[("sft", m)]["per_seed"]) == 2
    for seed in (0, 1):
        per = json.loads((out / f"seed_{seed}" / "per_example.json").read_text())
        assert len(per["scores"]["kd"]["forward_kl"]) == 3  # eval_size 3
        assert per["costs"]["sft"]["loss_tokens"] > 0 and per["costs"]["sft"]["generated_tokens"] == 0
        assert (out / f"seed_{seed}" / "runs" / "sft" / "train_info.json").is_file()
    assert "| forward_kl | sft |" in (out / "compare.md").read_text()
    # the default degrees of freedom are the crossed design's, recorded per row; from per_example.json's scores
    assert result["df"] == "satterthwaite" and "Satterthwaite" in (out / "compare.md").read_text()
    seeds_x_examples = [json.loads((out / f"seed_{s}" / "per_example.json").read_text())["scores"] for s in (0, 1)]
    diff = np.array([[a - b for a, b in zip(sc["sft"]["nll"], sc["kd"]["nll"])] for sc in seeds_x_examples])
    assert rows[("sft", "nll")]["df"] == pytest.approx(satterthwaite_df(diff))
    # the seeds differ: seed 1's students are not seed 0's
    s0 = json.loads((out / "seed_0" / "per_example.json").read_text())["scores"]["sft"]["forward_kl"]
    s1 = json.loads((out / "seed_1" / "per_example.json").read_text())["scores"]["sft"]["forward_kl"]
    assert s0 != s1
    # a rerun trains and scores nothing again
    monkeypatch.setattr(distill_runner, "distill", lambda *a, **k: pytest.fail("trained again"))
    again = runner.compare(Recipe.model_validate(r), progress=False)
    assert again["comparisons"] == result["comparisons"]
    # a seed scored for other runs is not reused: changing a run sends compare back to training
    r["runs"][2]["max_steps"] = 5
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        runner.compare(Recipe.model_validate(r), progress=False)


def test_compare_refuses_what_it_cannot_judge(assets, tmp_path):
    from potstill.recipes.distill import Recipe
    from potstill.runners.compare import check_compare

    r = recipe(assets, tmp_path / "x")
    r["runs"] = r["runs"][:1]
    with pytest.raises(PotstillError, match="at least two runs"):
        check_compare(Recipe.model_validate(r))
    with pytest.raises(ValueError, match="compare.baseline 'nope' is not a run"):
        Recipe.model_validate(recipe(assets, tmp_path / "y", **{"compare": {"baseline": "nope"}}))
    with pytest.raises(ValueError, match="repeats a seed"):
        Recipe.model_validate(recipe(assets, tmp_path / "z", **{"compare": {"seeds": [1, 1]}}))


def test_cli_compare_prints_the_table_and_refuses_bad_input(assets, tmp_path, capsys):
    from helpers import write

    from potstill.cli import main

    r = recipe(assets, tmp_path / "one", **{"compare": {"seeds": [3], "n_boot": 200}})
    assert main(["compare", str(write(tmp_path / "c.yaml", r))]) == 0
    text = capsys.readouterr().out
    assert "one seed: no verdict" in text and "compare.md" in text
    assert json.loads((tmp_path / "one" / "compare.json").read_text())["note"] == "one seed gives no verdict"
    bad = recipe(assets, tmp_path / "bad")
    bad["runs"] = bad["runs"][:1]
    assert main(["compare", str(write(tmp_path / "b.yaml", bad))]) == 2
    assert "at least two runs" in capsys.readouterr().err


def test_compare_judges_harness_task_scores_per_seed(assets, tmp_path):
    pytest.importorskip("lm_eval")
    from potstill.recipes.distill import Recipe
    from potstill.runners.compare import compare

    harness = {"tasks": ["potstill_sms_spam"], "limit": 4, "batch_size": 4}
    r = recipe(assets, tmp_path / "h", **{"compare": {"seeds": [0, 1], "n_boot": 200}, "eval.harness": harness})
    result = compare(Recipe.model_validate(r), progress=False)
    (row,) = [c for c in result["comparisons"] if c["metric"] == "harness/potstill_sms_spam/acc"]
    assert row["arm"] == "kd" and row["examples"] == 1 and len(row["per_seed"]) == 2
    per = [json.loads((tmp_path / "h" / f"seed_{s}" / "per_example.json").read_text()) for s in (0, 1)]
    want = sum(p["harness"]["kd"][row["metric"]] - p["harness"]["sft"][row["metric"]] for p in per) / 2
    assert row["difference"] == pytest.approx(want)


def test_compare_costs_equal_hand_counted_tokens_and_match_flops(assets, tmp_path):
    """With one batch holding every training example, a run reads exactly steps x (the examples' tokens): the
    student tokens, the teacher tokens (KD only), the tokens that carried loss and the FLOPs estimate equal that
    hand count. Under match: flops the SFT run trains the steps that equalise its compute with the KD run's."""
    from potstill.recipes.distill import Recipe
    from potstill.runners import compare as runner
    from potstill.runners.prepare import Prepared

    base = recipe(assets, tmp_path / "probe")
    prep = Prepared(Recipe.model_validate(base))
    tokens = sum(len(ex["input_ids"]) for ex in prep.train_examples)
    loss = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in prep.train_examples)
    n_s, n_t = runner.compute_params(prep.student0), runner.compute_params(prep.teacher)
    assert n_s < n_t
    sft_steps = round(3 * (6 * n_s + 2 * n_t) / (6 * n_s))
    assert sft_steps > 3

    out = tmp_path / "cmp"
    r = recipe(
        assets,
        out,
        **{"compare": {"seeds": [0], "baseline": "sft", "n_boot": 200, "match": "flops"}},
        **{"train.batch_size": len(prep.train_examples)},
    )
    result = runner.compare(Recipe.model_validate(r), progress=False)
    assert result["steps"] == {"sft": sft_steps, "kd": 3}
    costs = {n: {k: v[0] for k, v in c.items()} for n, c in result["costs"].items()}
    for name, steps in result["steps"].items():
        c = costs[name]
        assert c["student_tokens"] == steps * tokens
        assert c["loss_tokens"] == steps * loss
        assert c["teacher_tokens"] == (steps * tokens if name == "kd" else 0)
        assert c["generated_tokens"] == 0
        assert c["flops"] == 6 * n_s * c["student_tokens"] + 2 * n_t * c["teacher_tokens"]
    # matched: the two runs' compute differs by less than one SFT step's
    assert abs(costs["sft"]["flops"] - costs["kd"]["flops"]) <= 6 * n_s * tokens
    info = json.loads((out / "seed_0" / "runs" / "sft" / "train_info.json").read_text())
    assert info["run"]["max_steps"] == sft_steps and info["loss_curve"][-1][0] == sft_steps
    # the costliest run keeps train.max_steps unset: a student trained at equal steps is the same run
    kd_info = json.loads((out / "seed_0" / "runs" / "kd" / "train_info.json").read_text())
    assert kd_info["run"]["max_steps"] is None and kd_info["loss_curve"][-1][0] == 3
    assert "compute-matched" in (out / "compare.md").read_text()


def test_compare_match_flops_refuses_runs_it_cannot_price(assets, tmp_path):
    from potstill.recipes.distill import Recipe
    from potstill.runners.compare import check_compare

    r = recipe(assets, tmp_path / "x", **{"compare": {"match": "flops"}})
    r["runs"][0]["max_steps"] = 5
    with pytest.raises(PotstillError, match="set their own max_steps"):
        check_compare(Recipe.model_validate(r))


def test_a_runs_own_steps_are_part_of_its_fingerprint(assets, tmp_path):
    """A student trained for other steps is another student: never reused; unset, the fingerprint is unchanged."""
    from potstill.finished import run_fingerprint
    from potstill.recipes.distill import Recipe

    plain = Recipe.model_validate(recipe(assets, tmp_path / "x"))
    r = recipe(assets, tmp_path / "x")
    r["runs"][0]["max_steps"] = 7
    longer = Recipe.model_validate(r)
    assert "max_steps" not in run_fingerprint(plain, plain.runs[0])["run"]
    assert run_fingerprint(longer, longer.runs[0])["run"]["max_steps"] == 7
    assert run_fingerprint(longer, longer.runs[0]) != run_fingerprint(plain, plain.runs[0])
    assert run_fingerprint(longer, longer.runs[1]) == run_fingerprint(plain, plain.runs[1])


def test_on_policy_runs_count_the_teacher_tokens_of_the_students_samples(assets, tmp_path):
    """Every step of these runs trains on the student's own samples (GKD at lmbda 1, MiniLLM), or on them and
    the data (DistiLLM-2), all scored by the teacher: the teacher reads exactly the tokens the student trains on
    (the samples' scorer is counted beside the data source, and each trainer counts what its student read)."""
    from potstill.recipes.distill import Recipe
    from potstill.runners.distill import distill

    out = tmp_path / "op"
    r = recipe(assets, out)
    r["runs"] = [
        {
            "name": "gkd",
            "alpha": 0.0,
            "divergence": {"name": "generalized_jsd", "beta": 0.5},
            "method": {"kind": "on_policy", "lmbda": 1.0, "max_new_tokens": 4},
        },
        {
            "name": "distillm2",
            "alpha": 0.0,
            "divergence": {"name": "skew_forward_kl", "alpha": 0.1},
            "method": {
                "kind": "distillm2",
                "max_new_tokens": 4,
                "student_divergence": {"name": "skew_reverse_kl", "alpha": 0.1},
            },
        },
        {
            "name": "minillm",
            "alpha": 0.0,
            "divergence": {"name": "reverse_kl"},
            "method": {"kind": "minillm", "max_new_tokens": 4},
        },
    ]
    distill(Recipe.model_validate(r), progress=False)
    for name in ("gkd", "distillm2", "minillm"):
        info = json.loads((out / "runs" / name / "train_info.json").read_text())
        assert info["on_policy"]["gen_tokens"] > 0, name
        assert info["teacher_tokens"] == info["student_tokens"] > 0, name
