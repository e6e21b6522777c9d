"""The `potstill condense` recipe and runner (potstill.runners.condense) on a tiny toy.

The encoder is a 2-layer, 32-wide BERT over a word-level vocabulary; sentences are filler
words plus one class word (linearly separable). Data loaders and the encoder loader are
monkeypatched, so nothing is read from disk but the recipe file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import DD_FILLER, NEGATIVE, POSITIVE, dd_bert, dd_tokenizer, dd_toy_examples

import potstill.runners.common as cr
from potstill.data.classification import Example
from potstill.dd.condense import load_condensed
from potstill.errors import PotstillError
from potstill.recipes.condense import GradientMethod, TrajectoryMethod, load_condense_recipe
from potstill.runners.condense import load_condensed_jsonl, run_condense, write_condensed_jsonl

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


TOY = {
    "dataset": "sst2",
    "per_class": 3,
    "seed": 0,
    "data": {"pool_size": 80, "eval_size": 40},
    "learner": {"encoder": "tiny", "max_length": 16, "steps": 20, "lr": 5e-2, "batch_size": 8, "seeds": 2},
    "method": {
        "kind": "trajectory",
        "iterations": 8,
        "syn_steps": 5,
        "expert_span": 2,
        "syn_lr": 0.5,
        "experts": 2,
        "expert_steps": 20,
        "save_every": 5,
        "expert_lr": 0.5,
        "expert_batch": 16,
    },
}


@pytest.fixture
def toy(monkeypatch):
    tok = dd_tokenizer()
    loads = []

    def fake_encoder(name):
        loads.append(name)
        return dd_bert(tok, seed=1), tok

    def fake_sst2(split="train", path=None):
        return dd_toy_examples(200 if split == "train" else 60, 0 if split == "train" else 1)

    monkeypatch.setattr(cr, "load_encoder", fake_encoder)
    monkeypatch.setattr(cr, "load_sst2", fake_sst2)
    monkeypatch.setattr(cr, "load_sms_spam", lambda path=None: dd_toy_examples(120, 2))
    return loads


# ------------------------------------------------------------------------------- recipe


def test_shipped_recipe_validates():
    r = load_condense_recipe(RECIPES / "condense_sst2.yaml")
    assert r.dataset == "sst2" and r.per_class == 10 and isinstance(r.method, TrajectoryMethod)
    assert r.learner.encoder == "all-minilm-l6-v2" and r.learner.trainable_layers == 0
    r2 = load_condense_recipe(RECIPES / "condense_sst2.yaml", ["method.iterations=5", "per_class=5"])
    assert r2.method.iterations == 5 and r2.per_class == 5


def test_defaults_and_method_kind():
    r = load_condense_recipe({"dataset": "sms_spam"})
    assert isinstance(r.method, TrajectoryMethod) and r.output_dir == "runs/condense"
    r = load_condense_recipe({"dataset": "sst2", "method": {"iterations": 3}})  # kind defaults to trajectory
    assert isinstance(r.method, TrajectoryMethod) and r.method.iterations == 3
    r = load_condense_recipe({"dataset": "sst2"}, ["method.kind=gradient", "method.n_inits=4", "method.params=[head]"])
    assert isinstance(r.method, GradientMethod) and r.method.n_inits == 4 and r.method.params == ["head"]


@pytest.mark.parametrize(
    "data, overrides, key",
    [
        ({}, (), "'dataset' is required"),
        ({"dataset": "imdb"}, (), "'dataset'"),
        ({"dataset": "sst2", "per_clas": 3}, (), "'per_clas' is not a known option"),
        ({"dataset": "sst2"}, ["per_class=0"], "'per_class'"),
        ({"dataset": "sst2"}, ["learner.lr=-1"], "'learner.lr'"),
        ({"dataset": "sst2"}, ["learner.bogus=1"], "'learner.bogus' is not a known option"),
        ({"dataset": "sst2"}, ["method.kind=evolution"], "'method.kind'"),
        ({"dataset": "sst2"}, ["method.syn_steps=0"], "'method.syn_steps'"),
        ({"dataset": "sst2"}, ["method.kind=gradient", "method.syn_steps=3"], "'method.syn_steps' is not a known"),
        ({"dataset": "sst2"}, ["method.kind=gradient", "method.real_batch=0"], "'method.real_batch'"),
        ({"dataset": "sst2"}, ["method.reg_kind=manhattan"], "'method.reg_kind'"),
        ({"dataset": "sst2"}, ["method.expert_steps=10", "method.save_every=10"], "'method'"),
        ({"dataset": "sst2"}, ["data.pool_size=10", "per_class=10"], "data.pool_size=10"),
        ({"dataset": "sst2"}, ["iterations"], "not key=value"),
    ],
)
def test_recipe_errors_name_the_key(data, overrides, key):
    with pytest.raises(PotstillError) as err:
        load_condense_recipe(data, overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg, msg


def test_recipe_file_errors(tmp_path):
    with pytest.raises(PotstillError, match="does not exist"):
        load_condense_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [sst2\n")
    with pytest.raises(PotstillError, match="not valid YAML"):
        load_condense_recipe(bad)
    bad.write_text("- sst2\n")
    with pytest.raises(PotstillError, match="YAML mapping"):
        load_condense_recipe(bad)


def test_jsonl_round_trip(tmp_path):
    rows = [Example('a ünïcode "quoted" line', 0), Example("", 1), Example("tab\there", 1)]
    soft = torch.tensor([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]])
    write_condensed_jsonl(tmp_path / "c.jsonl", rows, soft)
    back, soft_back = load_condensed_jsonl(tmp_path / "c.jsonl")
    assert back == rows and torch.equal(soft_back, soft)
    with pytest.raises(PotstillError, match="one per example"):
        write_condensed_jsonl(tmp_path / "d.jsonl", rows, soft[:2])
    (tmp_path / "e.jsonl").write_text('{"sentence": "x"}\n')
    with pytest.raises(PotstillError, match="e.jsonl:1"):
        load_condensed_jsonl(tmp_path / "e.jsonl")


# ------------------------------------------------------------------------------- run


@pytest.mark.parametrize("kind", ["trajectory", "gradient"])
def test_run_condense_end_to_end(tmp_path, toy, kind):
    data = json.loads(json.dumps(TOY))
    data["output_dir"] = str(tmp_path / "run")
    if kind == "gradient":
        data["method"] = {"kind": "gradient", "iterations": 8, "inner_steps": 2, "real_batch": 16, "lr_net": 0.05}
    recipe = load_condense_recipe(data)
    report = run_condense(recipe)
    out = tmp_path / "run"
    assert toy == ["tiny"]
    for name in ("condensed.safetensors", "condensed.json", "condensed.jsonl", "recipe.yaml", "condense_report.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "condense_report.json").read_text()) == report
    assert report["method"] == kind and report["n_condensed"] == 6 and report["n_pool"] == 80
    assert report["n_eval"] == 40
    assert report["match"]["iterations"] == 8 and report["match_last"] < report["match_first"], report["match"]
    assert report["construction_s"] > 0 and report["total_s"] >= report["construction_s"]
    for arm in ("condensed_emb", "condensed_emb_learned", "condensed_text", "random"):
        acc = report["accuracy"][arm]
        assert len(acc["values"]) == 2 and 0.0 <= acc["mean"] <= 1.0
        assert report[f"accuracy_{arm}"] == acc["mean"]
    # the saved set and its text projection agree with each other and the report
    cs = load_condensed(out)
    assert len(cs) == 6 and cs.classes.tolist() == [0, 0, 0, 1, 1, 1]
    assert cs.history["match"] == pytest.approx(report["match"]["history"], abs=1e-5)
    assert cs.meta["method"] == ("trajectory_matching" if kind == "trajectory" else "gradient_matching")
    text, soft = load_condensed_jsonl(out / "condensed.jsonl")
    assert [e.label for e in text] == cs.classes.tolist()
    assert torch.allclose(soft, cs.soft_labels(), atol=1e-6)
    assert all(set(e.text.split()) <= set(DD_FILLER + POSITIVE + NEGATIVE) for e in text)
    assert load_condense_recipe(out / "recipe.yaml") == recipe


def test_run_condense_sms_spam_and_layer_check(tmp_path, toy):
    data = json.loads(json.dumps(TOY))
    data.update(dataset="sms_spam", output_dir=str(tmp_path / "sms"))
    data["method"]["iterations"] = 2
    data["data"] = {"pool_size": 60, "eval_size": 20}
    report = run_condense(load_condense_recipe(data))
    assert report["dataset"] == "sms_spam" and report["n_eval"] == 20 and report["n_pool"] == 60
    data["learner"]["trainable_layers"] = 5
    with pytest.raises(PotstillError, match="learner.trainable_layers"):
        run_condense(load_condense_recipe(data))
