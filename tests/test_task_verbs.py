"""The task verbs (classify, select, synthesize) through the CLI: bad input is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_bert, tiny_bert_tokenizer, toy_examples

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


@pytest.mark.parametrize(
    "verb, recipe, override, key",
    [
        ("condense", "condense_sst2.yaml", "method.iterations=[1", "method.iterations"),
        ("classify", "classify_sms_spam.yaml", "kd.temperature=[1", "kd.temperature"),
        ("eval-data", "eval_data_sst2.yaml", "learner.steps=[1", "learner.steps"),
        ("classify", "classify_sms_spam.yaml", "kd.temperature=.inf", "kd.temperature"),
        ("synthesize", "synthesize_self_instruct.yaml", f"seed={2**70}", "seed"),
        (
            "synthesize",
            "synthesize_self_instruct.yaml",
            "instruction_generation.temperature=1e-45",
            "instruction_generation.temperature",
        ),
    ],
)
def test_overrides_yaml_cannot_read_or_out_of_range_are_one_line(
    verb, recipe, override, key, capsys, tmp_path, monkeypatch
):
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


def test_classify_verb_runs_a_tiny_recipe(tmp_path, capsys, monkeypatch, one_thread):
    """The verb runs the real runner on the recipe with the CLI's overrides applied: the three models are
    trained and evaluated, metrics.json / report.md land in the recipe's output_dir, and the printed summary
    is those metrics. Only the encoder and the data are stand-ins (a tiny BERT, a separable toy set)."""
    import json

    import potstill.runners.classify as clf

    tok = tiny_bert_tokenizer()
    monkeypatch.setattr(clf, "load_encoder", lambda name: (tiny_bert(tok, layers=2, hidden=16, seed=2), tok))
    monkeypatch.setattr(clf, "load_sms_spam", lambda: toy_examples(40, 8))
    out = tmp_path / "out"
    p = tmp_path / "r.yaml"
    p.write_text(
        f"dataset: sms_spam\noutput_dir: {out}\nteacher: {{model: tiny, steps: 2, batch_size: 8}}\n"
        "student: {layers: [0]}\ntrain: {batch_size: 8, max_length: 16}\n"
        "eval: {latency_batch_size: 4, latency_repeats: 1}\n"
    )
    assert main(["classify", str(p), "train.steps=3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["n_train"] + m["n_eval"] == 40 and m["n_eval"] == 8
    assert set(m["models"]) == {"teacher", "kd_student", "no_teacher"}
    assert m["models"]["teacher"]["layers"] == 2 and m["models"]["kd_student"]["layers"] == 1
    assert (out / "report.md").is_file() and (out / "recipe.yaml").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    brief = json.loads(printed[0])
    assert brief == {k: v for k, v in m.items() if isinstance(v, (int, float, str))} and brief["steps"] == 3
    assert printed[-1] == f"classify: results in {out}"
