"""lm-evaluation-harness in the evaluation (potstill.eval.harness): the shipped offline task configs read the
local data, a distill run scores the teacher and its students on a tiny task, and a missing package or task is
refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import recipe

from potstill.errors import PotstillError
from potstill.eval.harness import SHIPPED_TASKS, shipped_task
from potstill.paths import data_root


@pytest.mark.parametrize("name", [t for t in SHIPPED_TASKS if t != "potstill_gsm8k"])
def test_shipped_multiple_choice_tasks_read_the_local_data(name, tmp_path):
    cfg = shipped_task(name, data_root(), tmp_path)
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    rows = [json.loads(line) for line in Path(cfg["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    labels = {r["label"] for r in rows}
    assert labels == set(range(len(cfg["doc_to_choice"])))
    if name == "potstill_pubmedqa":  # the 500 test ids, 55.2 % yes (Jin et al. 2019)
        assert len(rows) == 500 and sum(r["label"] == 0 for r in rows) == 276
    # `limit` takes the first documents: they hold every class (the ground-truth file is ordered by label),
    # in the same order on every call
    assert {r["label"] for r in rows[:50]} == labels
    again = shipped_task(name, data_root(), tmp_path / "again")
    assert (
        Path(again["dataset_kwargs"]["data_files"]["test"]).read_text()
        == Path(cfg["dataset_kwargs"]["data_files"]["test"]).read_text()
    )


def test_gsm8k_is_lm_evals_own_task_on_the_local_files(tmp_path):
    pytest.importorskip("lm_eval")
    cfg = shipped_task("potstill_gsm8k", data_root(), tmp_path)
    assert cfg["task"] == "potstill_gsm8k" and cfg["output_type"] == "generate_until"
    assert cfg["dataset_kwargs"]["data_files"]["test"].endswith("gsm8k/test.jsonl")
    assert {f["name"] for f in cfg["filter_list"]} == {"strict-match", "flexible-extract"}


def test_unknown_shipped_task_and_missing_package_are_refused(tmp_path, monkeypatch):
    with pytest.raises(PotstillError, match="not a task potstill ships"):
        shipped_task("potstill_nope", data_root(), tmp_path)
    from potstill.eval.harness import harness_scores

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(PotstillError, match=r"pip install 'potstill\[harness\]'"):
        harness_scores({}, ["potstill_sms_spam"], limit=1, work_dir=tmp_path, data_root=data_root())


def test_distill_reports_harness_scores_for_every_model(assets, tmp_path):
    pytest.importorskip("lm_eval")
    from potstill.recipes.distill import Recipe
    from potstill.runners.distill import distill

    out = tmp_path / "out"
    harness = {"tasks": ["potstill_sms_spam"], "limit": 4, "batch_size": 4}
    metrics = distill(Recipe.model_validate(recipe(assets, out, **{"eval.harness": harness})), progress=False)
    for name in ("teacher", "student_init", "sft", "kd"):
        acc = metrics[name]["harness/potstill_sms_spam/acc"]
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0), (name, acc)  # 4 examples
    assert "potstill_sms_spam" in (out / "report.md").read_text()
