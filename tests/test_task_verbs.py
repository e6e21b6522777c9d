"""The task verbs (classify, select, synthesize) through the CLI: bad input is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from potstill.cli import TASKS, main


@pytest.mark.parametrize("verb", sorted(TASKS))
def test_missing_recipe_is_one_line(verb, tmp_path, capsys):
    assert main([verb, str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


@pytest.mark.parametrize("verb", sorted(TASKS))
def test_unknown_key_is_one_line(verb, tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("not_a_section: 1\n")
    assert main([verb, str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "key" in err[0]


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("verb, recipe, override, key", [
    ("condense", "condense_sst2.yaml", "method.iterations=[1", "method.iterations"),
    ("classify", "classify_sms_spam.yaml", "kd.temperature=[1", "kd.temperature"),
    ("eval-data", "eval_data_sst2.yaml", "learner.steps=[1", "learner.steps"),
    ("classify", "classify_sms_spam.yaml", "kd.temperature=.inf", "kd.temperature"),
    ("synthesize", "synthesize_self_instruct.yaml", f"seed={2**70}", "seed"),
    ("synthesize", "synthesize_self_instruct.yaml", "instruction_generation.temperature=1e-45",
     "instruction_generation.temperature"),
])
def test_overrides_yaml_cannot_read_or_out_of_range_are_one_line(verb, recipe, override, key, capsys, tmp_path,
                                                                  monkeypatch):
    """An override value YAML cannot read (``[1``) stays a string the schema refuses, naming the key."""
    monkeypatch.chdir(tmp_path)  # were the value accepted, the recipe's relative output_dir lands here
    assert main([verb, str(RECIPES / recipe), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: recipe key '{key}'") and "; " in err[0], err


@pytest.mark.parametrize("verb", sorted(TASKS))
def test_a_recipe_that_is_not_utf8_is_one_line(verb, tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"output_dir: caf\xe9\n")
    assert main([verb, str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "save it as UTF-8" in err[0], err


def test_classify_verb_runs_a_tiny_recipe(tmp_path, capsys, monkeypatch):
    """The verb wires the loader to the runner (the runner itself is tested in tests/kd/test_classifier.py)."""
    import potstill.kd.classifier as clf

    seen = {}

    def fake_run(recipe, output_dir=None):
        seen["recipe"] = recipe
        return {"teacher_accuracy": 0.9}

    monkeypatch.setattr(clf, "run_classifier_recipe", fake_run)
    p = tmp_path / "r.yaml"
    p.write_text(f"dataset: sms_spam\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["classify", str(p), "train.steps=3"]) == 0
    assert seen["recipe"].train.steps == 3
    assert "teacher_accuracy" in capsys.readouterr().out
