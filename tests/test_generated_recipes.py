"""Recipes that learn from generated text: rationale data sources and on-policy runs, end to end."""

from __future__ import annotations

import json

import pytest
from helpers import recipe, write

from potstill.cli import main
from potstill.data.rationale import ANSWER_PREFIX, RATIONALE_PREFIX, arithmetic_problems
from potstill.recipes.distill import Recipe
from potstill.runners.prepare import rationale_split


def test_rationale_split_is_by_problem_and_nested():
    r = Recipe.model_validate(
        {
            "data": {
                "source": {"kind": "arithmetic", "num_problems": 40, "level": 2, "mode": "multitask"},
                "eval_size": 8,
            }
        }
    )
    train, held = rationale_split(r)
    assert len(held) == 8 and len(train) == 2 * 32
    assert [p["task"] for p in train[:4]] == ["answer", "rationale", "answer", "rationale"]
    problems = {p.question: p for p in arithmetic_problems(40, level=2)}
    held_q = {h["messages"][0]["content"].removeprefix(ANSWER_PREFIX) for h in held}
    train_q = {t["messages"][0]["content"].removeprefix(ANSWER_PREFIX).removeprefix(RATIONALE_PREFIX) for t in train}
    assert held_q.isdisjoint(train_q) and held_q | train_q == set(problems)
    for h in held:  # multitask is evaluated on the answer prompt, against the answer
        q = h["messages"][0]["content"]
        assert q.startswith(ANSWER_PREFIX) and h["response"] == h["answer"] == problems[q[len(ANSWER_PREFIX) :]].answer
    half = rationale_split(
        r.model_copy(
            update={"data": r.data.model_copy(update={"source": r.data.source.model_copy(update={"fraction": 0.5})})}
        )
    )
    assert half[1] == held and len(half[0]) == 2 * 16
    assert {json.dumps(p, sort_keys=True) for p in half[0]} <= {json.dumps(p, sort_keys=True) for p in train}


def test_cot_holds_out_the_rationale_and_answer():
    r = Recipe.model_validate(
        {"data": {"source": {"kind": "arithmetic", "num_problems": 10, "mode": "cot"}, "eval_size": 3}}
    )
    train, held = rationale_split(r)
    assert len(train) == 7 and all(t["response"].endswith(".") and "The answer is" in t["response"] for t in train)
    for h in held:
        assert h["response"].endswith(f"The answer is {h['answer']}.")
        assert not h["messages"][0]["content"].startswith("[")


def test_arithmetic_gkd_distillm_recipe_end_to_end(assets, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = recipe(
        assets,
        out,
        **{"data.source": {"kind": "arithmetic", "num_problems": 20, "level": 2, "mode": "cot"}, "data.eval_size": 4},
    )
    r["runs"] = [
        {"name": "sft", "alpha": 1.0},
        {
            "name": "gkd",
            "alpha": 0.0,
            "divergence": {"name": "generalized_jsd", "beta": 0.5},
            "on_policy": {"lmbda": 1.0, "max_new_tokens": 4},
        },
        {
            "name": "distillm",
            "alpha": 0.0,
            "divergence": {"name": "skew_forward_kl", "alpha": 0.1},
            "on_policy": {
                "lmbda": 0.0,
                "adaptive": True,
                "adaptive_every": 1,
                "adaptive_step": 0.5,
                "validation_size": 3,
                "replay_size": 4,
                "replay_reuse": 0.5,
                "max_new_tokens": 4,
            },
        },
    ]
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(metrics) == {"teacher", "student_init", "sft", "gkd", "distillm"}
    assert all(0.0 <= m["exact_match"] <= 1.0 for m in metrics.values())
    gkd = json.loads((out / "runs" / "gkd" / "train_info.json").read_text())["on_policy"]
    assert gkd["modes"] == ["student"] * 3 and gkd["gen_tokens"] > 0
    dl = json.loads((out / "runs" / "distillm" / "train_info.json").read_text())["on_policy"]
    assert len(dl["modes"]) == 3 and [h[0] for h in dl["lmbda_history"]][:1] == [0]
    assert "exact match" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["alpha one", "cache", "replay", "fraction", "gsm8k path", "level"])
def test_bad_generated_recipes_give_one_line(assets, tmp_path, capsys, case):  # noqa: F811
    out = tmp_path / "out"
    r = recipe(assets, out)
    want = {
        "alpha one": ("runs.0", "set alpha < 1"),
        "cache": ("cache", "needs the live teacher"),
        "replay": ("runs.1.on_policy", "replay_size"),
        "fraction": ("data.source.fraction", "greater than 0"),
        "gsm8k path": ("gsm8k", "does not exist"),
        "level": ("data.source.level", "less than or equal to 5"),
    }[case]
    if case == "alpha one":
        r["runs"][0]["on_policy"] = {"lmbda": 0.5}
    elif case == "cache":
        r["runs"][1]["on_policy"] = {"lmbda": 0.5}
        r["cache"] = {"signal": {"kind": "dense"}}
    elif case == "replay":
        r["runs"][1]["on_policy"] = {"replay_reuse": 0.5}
    elif case == "fraction":
        r["data"]["source"] = {"kind": "arithmetic", "fraction": 0.0}
    elif case == "gsm8k path":
        r["data"]["source"] = {"kind": "gsm8k", "path": str(tmp_path / "gsm8k.jsonl")}
    else:
        r["data"]["source"] = {"kind": "arithmetic", "level": 9}
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in want), err
    assert not out.exists()


def test_multitask_batches_carry_prefixes_and_response_only_masks(tiny_tokenizer):
    from potstill.data import PadCollator
    from potstill.runners.prepare import encode_pairs

    r = Recipe.model_validate(
        {
            "data": {
                "source": {"kind": "arithmetic", "num_problems": 12, "level": 2, "mode": "multitask"},
                "eval_size": 2,
            }
        }
    )
    train, _ = rationale_split(r)
    enc = encode_pairs(train[:4], tiny_tokenizer, 256)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(enc)
    for i, (pair, ex) in enumerate(zip(train[:4], enc)):
        prefix = ANSWER_PREFIX if pair["task"] == "answer" else RATIONALE_PREFIX
        assert pair["messages"][0]["content"].startswith(prefix)
        n_prompt = len(ex["prompt_ids"])
        assert tiny_tokenizer.decode(ex["prompt_ids"]).count(prefix.strip()) == 1
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == -100).all()
        k = len(ex["input_ids"])
        assert labels[n_prompt:k].tolist() == ex["response_ids"] and (labels[k:] == -100).all()
        assert pair["response"] in tiny_tokenizer.decode(ex["response_ids"])


def test_black_box_recipe_runs_with_no_teacher_weights(assets, tmp_path, monkeypatch):  # noqa: F811
    import potstill.models as models
    from potstill.models import load_model as real_load

    root, teacher_dir, _, _, data = assets
    loaded = []

    def spy(name, *a, **k):
        loaded.append(str(name))
        return real_load(name, *a, **k)

    monkeypatch.setattr(models, "load_model", spy)
    out = tmp_path / "out"
    r = recipe(assets, out, teacher={"model": None}, student={"kind": "pretrained", "model": str(teacher_dir)})
    r["runs"] = [{"name": "seq_kd", "alpha": 1.0}]
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    assert loaded == [str(teacher_dir)]  # the student only: there is no teacher to load
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(metrics) == {"student_init", "seq_kd"}
    for m in metrics.values():
        assert m["forward_kl"] is None and m["top1_agreement"] is None  # nan: no logits to compare
        assert m["perplexity"] > 1 and 0 <= m["rouge_l"] <= 1
    assert metrics["seq_kd"]["perplexity"] < metrics["student_init"]["perplexity"]
    assert "black box" in (out / "report.md").read_text()


def test_black_box_student_is_cut_to_its_layers(assets, tmp_path):  # noqa: F811
    _, teacher_dir, *_ = assets
    out = tmp_path / "out"
    student = {"kind": "pretrained", "model": str(teacher_dir), "layers": 1}
    r = recipe(assets, out, teacher={"model": None}, student=student)
    r["runs"] = [{"name": "seq_kd", "alpha": 1.0}]
    r["eval"]["include_untrained"] = False
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    config = json.loads((out / "runs" / "seq_kd" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1  # the 2-layer checkpoint, cut as the recipe says


@pytest.mark.parametrize("case", ["kd run", "built student", "demo data", "cache"])
def test_black_box_refusals(assets, tmp_path, capsys, case):  # noqa: F811
    root, teacher_dir, _, _, data = assets
    out = tmp_path / "out"
    r = recipe(assets, out, teacher={"model": None}, student={"kind": "pretrained", "model": str(teacher_dir)})
    r["runs"] = [{"name": "seq_kd", "alpha": 1.0}]
    want = {
        "kd run": "alpha 1",
        "built student": "student.kind pretrained",
        "demo data": "kind file",
        "cache": "cannot be cached",
    }[case]
    if case == "kd run":
        r["runs"].append({"name": "kd", "alpha": 0.0})
    elif case == "built student":
        r["student"] = {"kind": "scaled", "num_layers": 1}
    elif case == "demo data":
        r["data"]["source"] = {"kind": "demo"}
    else:
        r["cache"] = {"signal": {"kind": "dense"}}
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not out.exists()
