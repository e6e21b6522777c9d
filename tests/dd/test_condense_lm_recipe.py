"""``potstill condense`` with ``kind: causal_lm`` (potstill.runners.condense) on the tiny local
teacher: the verb condenses, saves a set that loads back, exports one text line per sequence,
lowers its matching loss at the student's own weights, and evaluates the set against random real
subsets of its size; bad recipes give one line and write nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import write

from potstill.cli import main
from potstill.dd.condense_lm import load_soft_prompts
from potstill.recipes.condense import CondenseLMRecipe, load_condense_recipe
from potstill.runners.condense import run_condense

pytestmark = pytest.mark.usefixtures("one_thread")


def lm_condense(assets, data_file, out: Path, **condense) -> dict:
    return {
        "kind": "causal_lm",
        "output_dir": str(out),
        "teacher": {"model": str(assets[1])},
        # a fresh student of the teacher's width: far from the (near-uniform) tiny teacher, so training moves it
        "student": {
            "kind": "scaled",
            "num_layers": 1,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "data": {"source": {"kind": "file", "path": str(data_file)}, "eval_size": 4, "max_length": 64},
        "condense": {
            "sequences": 3,
            "length": 12,
            "outer_steps": 12,
            "lr_embed": 3e-3,
            "reg_weight": 0.0,
            "real_batch": 32,
            **condense,
        },  # one real batch: the matching target is fixed
        "evaluate": {"steps": 8, "lr": 1e-2, "seeds": 2},
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def condensed(assets, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("clm") / "out"
    rec = load_condense_recipe(lm_condense(assets, data_file, out))
    assert isinstance(rec, CondenseLMRecipe)
    return out, run_condense(rec)


def test_the_set_is_saved_exported_and_reported(condensed):
    out, rep = condensed
    sp = load_soft_prompts(out)
    assert tuple(sp.embeddings.shape[:2]) == (3, 12) and sp.meta["method"] == "gradient_matching_lm"
    assert sp.meta["construction_s"] == pytest.approx(rep["construction_s"]) and rep["construction_s"] > 0
    lines = [json.loads(x) for x in (out / "condensed_text.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(isinstance(x["text"], str) and x["text"] for x in lines)
    disk = json.loads((out / "condense_report.json").read_text())
    assert disk["match_first"] == rep["match_first"] and len(sp.history["match"]) == 12
    assert disk["paths"]["set"].endswith("soft_prompts.safetensors")


def test_matching_at_the_students_own_weights_lowers_the_loss(condensed):
    """theta: student matches at one fixed point, so the distance must fall (no init noise)."""
    out, rep = condensed
    hist = load_soft_prompts(out).history["match"]
    assert rep["match_last"] < rep["match_first"] and min(hist[-3:]) < hist[0]


def test_evaluation_arms_and_gain(condensed):
    _, rep = condensed
    ev = rep["evaluation"]
    rnd = ev["random_real_forward_kl"]
    assert len(rnd["values"]) == 2 and rnd["mean"] == pytest.approx(sum(rnd["values"]) / 2)
    for k in ("untrained_forward_kl", "condensed_forward_kl", "start_forward_kl"):
        assert math.isfinite(ev[k]) and ev[k] > 0
    assert ev["gain_vs_random_pct"] == pytest.approx(100 * (rnd["mean"] - ev["condensed_forward_kl"]) / rnd["mean"])
    # training on the set moves the student toward the teacher
    assert ev["condensed_forward_kl"] < ev["untrained_forward_kl"]


def test_random_init_and_learned_labels(assets, data_file, tmp_path):
    rep = run_condense(
        load_condense_recipe(
            lm_condense(
                assets, data_file, tmp_path / "o", init="random", labels="learned", theta="fresh", outer_steps=2
            ),
            ["evaluate=null"],
        )
    )
    sp = load_soft_prompts(tmp_path / "o")
    assert sp.labels == "learned" and sp.label_logits is not None and rep["evaluation"] is None
    assert torch.all(sp.attention_mask == 1)


def test_cli_and_one_line_errors(assets, data_file, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", lm_condense(assets, data_file, tmp_path / "o", outer_steps=1))
    assert main(["condense", str(path), "evaluate=null"]) == 0
    assert "condense: results in" in capsys.readouterr().out
    narrow = {"kind": "scaled", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    bad = lm_condense(assets, data_file, tmp_path / "o2", outer_steps=1)
    cases = {
        "condense.sequences=500": (bad, "more than the pool"),
        "condense.init=magic": (bad, "condense.init"),
        "condense.lenght=3": (bad, "'condense.lenght' is not a known option"),
        "narrow student": ({**bad, "student": narrow}, "embedding width 32 != teacher's 64"),
    }
    for case, (rec, needle) in cases.items():
        overrides = [case] if "=" in case else []
        assert main(["condense", str(write(tmp_path / "bad.yaml", rec)), *overrides]) == 2, case
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, (case, err)
    assert not (tmp_path / "o2").exists()  # nothing is written before the input is checked


def test_teacher_labels_are_differentiated_so_fixed_theta_matching_falls(assets, data_file, tmp_path):
    """A student cut from the teacher (shared embeddings), matched at its own weights, with the
    teacher's labels: the labels move with the embeddings, and with them held fixed in the gradient
    the distance grew at every step (260 -> 440 here); through the frozen teacher it falls."""
    rec = lm_condense(assets, data_file, tmp_path / "o", outer_steps=8, lr_embed=1e-3)
    rec.update(student={"kind": "from_teacher", "layers": 1}, evaluate=None)
    run_condense(load_condense_recipe(rec))
    h = load_soft_prompts(tmp_path / "o").history["match"]
    assert all(b < a for a, b in zip(h, h[1:])), h


def test_windows_keep_the_end_or_the_start():
    from potstill.runners.condense import pad_sequences as _pad

    ids, mask = _pad([[1, 2, 3, 4, 5], [6, 7]], pad_id=0, length=3, window="end")
    assert ids.tolist() == [[3, 4, 5], [6, 7, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    ids, _ = _pad([[1, 2, 3, 4, 5], [6, 7]], pad_id=0, length=3, window="start")
    assert ids.tolist() == [[1, 2, 3], [6, 7, 0]]
    ids, mask = _pad([[1, 2, 3], [6]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [6, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
