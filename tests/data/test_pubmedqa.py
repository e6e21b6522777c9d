"""PubMedQA (PQA-L) pairs: the official id split, decision-first responses, the majority baseline."""

from __future__ import annotations

import json
import math

import pytest

from potstill.data.pubmedqa import CHOICES, load_pubmedqa, majority_baseline
from potstill.errors import PotstillError
from potstill.paths import data_root

FOLDER = data_root() / "pubmedqa"
needs_data = pytest.mark.skipif(not (FOLDER / "ori_pqal.json").is_file(), reason="needs $POTSTILL_DATA/pubmedqa")


@needs_data
def test_split_follows_the_ground_truth_ids():
    train, test = load_pubmedqa(FOLDER)
    truth = json.loads((FOLDER / "test_ground_truth.json").read_text())
    assert len(train) == 500 and len(test) == 500
    assert {p["pmid"] for p in test} == set(truth)
    assert not {p["pmid"] for p in train} & set(truth)
    assert all(p["answer"] == truth[p["pmid"]] for p in test)
    # 552 yes / 338 no / 110 maybe over all 1,000 (the data README)
    both = train + test
    assert [sum(p["answer"] == c for p in both) for c in CHOICES] == [552, 338, 110]


@needs_data
def test_response_starts_with_the_decision_and_prompt_is_cut():
    train, _ = load_pubmedqa(FOLDER, context_words=20)
    p = train[0]
    assert p["response"].startswith(p["answer"] + ". ")
    assert p["choices"] == ["yes", "no", "maybe"]
    abstract = p["messages"][0]["content"].split("\nQuestion:")[0]
    assert len(abstract.split()) == 1 + 20 + 1  # "Abstract:", 20 words, "..."


@needs_data
def test_majority_baseline_is_yes_at_the_test_share():
    train, test = load_pubmedqa(FOLDER)
    m = majority_baseline(train, test)
    share = sum(p["answer"] == "yes" for p in test) / len(test)
    assert m["decision"] == "yes" and m["accuracy"] == share
    assert math.isclose(m["macro_f1"], 2 * share / (1 + share) / 3)


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(PotstillError, match="not found; set POTSTILL_DATA"):
        load_pubmedqa(tmp_path)


def test_unknown_decision_is_refused(tmp_path):
    (tmp_path / "ori_pqal.json").write_text(
        json.dumps(
            {
                "1": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "yes", "LONG_ANSWER": "a"},
                "2": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "no", "LONG_ANSWER": "a"},
                "3": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "perhaps", "LONG_ANSWER": "a"},
            }
        )
    )
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"1": "yes", "2": "no"}))
    with pytest.raises(PotstillError, match="expected yes, no or maybe"):
        load_pubmedqa(tmp_path)


@needs_data
def test_a_distill_run_on_pubmedqa_reports_decisions_for_teacher_and_students(assets, tmp_path):
    import torch
    from helpers import recipe

    from potstill.data import pad_id
    from potstill.eval.choice import choice_metrics, choice_scores
    from potstill.models import load_model
    from potstill.recipes.distill import recipe_from_dict
    from potstill.runners.distill import distill

    r = recipe(assets, tmp_path / "out")
    r["data"] = {"source": {"kind": "pubmedqa", "context_words": 12, "limit": 8}, "eval_size": 6, "max_length": 256}
    metrics = distill(recipe_from_dict(r), progress=False)
    assert {"teacher", "sft", "kd"} <= set(metrics)
    # the teacher's row, recomputed from its own files by the same rule: likeliest of yes / no / maybe
    teacher, tok = load_model(str(assets[1]))
    _, test = load_pubmedqa(FOLDER, context_words=12)
    from potstill.data import encode_prompt

    prompts = [encode_prompt(tok, p["messages"]) for p in test[:6]]
    tokens = [tok(c, add_special_tokens=False)["input_ids"] for c in CHOICES]
    with torch.no_grad():
        scores = choice_scores(teacher, prompts, tokens, pad_id=pad_id(tok))
    want = choice_metrics(scores, [CHOICES.index(p["answer"]) for p in test[:6]])
    assert metrics["teacher"]["decision_accuracy"] == want["accuracy"]
    assert metrics["teacher"]["decision_macro_f1"] == want["macro_f1"]
    for name in ("sft", "kd"):
        assert 0.0 <= metrics[name]["decision_accuracy"] <= 1.0
        assert "exact_match" not in metrics[name]  # decisions are scored by choice, not by a parsed number
