"""A cross-tokenizer recipe through `potstill distill`: trains with ULD and with the vocabulary
map; the same recipe without a cross-tokenizer method is refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
from helpers import make_metaspace_tokenizer, random_llama, recipe, write

from potstill.cli import main


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """A teacher with a SentencePiece-style tokenizer (the CLI assets' tiny model is the student)."""
    path = tmp_path_factory.mktemp("xtok") / "teacher"
    tok = make_metaspace_tokenizer()
    random_llama(len(tok), seed=3, hidden=48, layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cross_recipe(assets, out, teacher, runs):  # noqa: F811
    _, student, *_ = assets  # the CLI assets' teacher dir serves as a pretrained student here
    r = recipe(assets, out, runs=runs)
    r["teacher"] = {"model": str(teacher)}
    r["student"] = {"kind": "pretrained", "model": str(student), "layers": 1}
    return r


def test_cross_tokenizer_recipe_trains_with_uld_and_vocab_map(assets, other_teacher, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    runs = [
        {"name": "sft", "alpha": 1.0},
        {"name": "uld", "alpha": 0.5, "cross_tokenizer": {"method": "uld"}},
        {"name": "vmap", "alpha": 0.5, "cross_tokenizer": {"method": "vocab_map", "kinds": ["exact", "mined"]}},
    ]
    r = _cross_recipe(assets, out, other_teacher, runs)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert "teacher" not in metrics  # no token-level comparison across tokenizers
    assert {"sft", "uld", "vmap"} <= set(metrics)
    for name in ("uld", "vmap"):
        info = json.loads((out / "runs" / name / "train_info.json").read_text())
        cov = info["cross_tokenizer"]
        assert 0 < cov["aligned_row_share"] <= 1
        assert info["loss_curve"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "runs" / "vmap")
    assert model.config.num_hidden_layers == 1


def test_without_a_cross_tokenizer_method_the_recipe_is_refused(assets, other_teacher, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    runs = [{"name": "kd", "alpha": 0.5}]
    r = _cross_recipe(assets, out, other_teacher, runs)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) != 0
    err = capsys.readouterr().err
    assert "cross_tokenizer" in err and "['kd']" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cross_tokenizer_needs_a_pretrained_student(assets, tmp_path, capsys):  # noqa: F811
    r = recipe(assets, tmp_path / "out", runs=[{"name": "x", "alpha": 0.5, "cross_tokenizer": {}}])
    assert main(["distill", str(write(tmp_path / "a.yaml", r))]) != 0
    assert "student.kind pretrained" in capsys.readouterr().err


@pytest.mark.real_model
def test_gemma_teacher_trains_a_smollm2_student_end_to_end(tmp_path):
    """recipes/cross_tokenizer.yaml on the real pair, shrunk to a few steps."""
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / "cross_tokenizer.yaml"
    out = tmp_path / "out"
    args = [
        "distill",
        str(recipe),
        f"output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=2",
        "data.eval_size=2",
        "data.max_length=512",
        "eval.max_new_tokens=4",
        "eval.include_untrained=false",
        "runs=[{name: vmap, alpha: 0.5, cross_tokenizer: {method: vocab_map}}, "
        "{name: uld, alpha: 0.5, cross_tokenizer: {method: uld}}]",
    ]
    assert main(args) == 0
    for name in ("vmap", "uld"):
        cov = json.loads((out / "runs" / name / "train_info.json").read_text())["cross_tokenizer"]
        assert cov["aligned_row_share"] > 0.5
        if name == "vmap":
            assert cov["teacher_mass_used"] > 0.9
    # and the same recipe with plain KD is refused
    assert main(["distill", str(recipe), f"output_dir={tmp_path / 'no'}", "runs=[{name: kd, alpha: 0.5}]"]) == 2
    assert not (tmp_path / "no").exists()


def test_an_extra_teacher_with_another_tokenizer_joins_a_multi_teacher_run(assets, other_teacher, tmp_path):  # noqa: F811
    _, teacher, *_ = assets
    out = tmp_path / "out"
    runs = [
        {"name": "mean", "alpha": 0.0, "multi_teacher": {"mode": "confidence"}},
        {"name": "pick", "alpha": 0.0, "multi_teacher": {"mode": "select", "cross_kinds": ["exact"]}},
    ]
    r = recipe(assets, out, runs=runs, extra_teachers=[{"model": str(other_teacher)}])
    r["eval"]["include_untrained"] = False
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert {"teacher", "mean", "pick"} == set(metrics)  # the main teacher shares the student's tokenizer
    for name in ("mean", "pick"):
        info = json.loads((out / "runs" / name / "train_info.json").read_text())
        cov = info["cross_tokenizer_coverage"]
        assert set(cov) == {"1"}  # the extra teacher, second source
        assert 0 < cov["1"]["valid_row_share"] <= cov["1"]["aligned_row_share"] < 1
        assert 0 < cov["1"]["teacher_mass_used"] <= 1
    assert sum(json.loads((out / "runs" / "pick" / "train_info.json").read_text())["teacher_selected_examples"]) > 0


@pytest.mark.parametrize("signal", [{"kind": "topk", "k": 8}, {"kind": "sampled", "draws": 8}])
def test_a_cache_in_the_teachers_tokens_trains_a_student_of_another_family(assets, other_teacher, tmp_path, signal):  # noqa: F811
    """`potstill cache` on a cross-tokenizer recipe stores the teacher's signal in its own tokens; `distill`
    reads it through the vocabulary map (issue 20: cross-tokenizer KD from disk)."""
    from transformers import AutoTokenizer

    from potstill.fingerprints import tokenizer_fingerprint
    from potstill.signals.cache import read_manifest

    out, cache = tmp_path / "out", tmp_path / "cache"
    vmap = {"kind": "cross_tokenizer", "align": "vocab_map"}
    runs = [{"name": "sft", "alpha": 1.0}, {"name": "vmap", "alpha": 0.5, "method": vmap}]
    r = _cross_recipe(assets, out, other_teacher, runs)
    r["cache"] = {"dir": str(cache), "signal": signal}
    path = write(tmp_path / "r.yaml", r)
    assert main(["cache", str(path)]) == 0
    manifest = read_manifest(cache)
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(other_teacher))
    assert manifest["vocab_size"] == len(AutoTokenizer.from_pretrained(other_teacher))
    assert main(["distill", str(path)]) == 0
    info = json.loads((out / "runs" / "vmap" / "train_info.json").read_text())
    cov = info["cross_tokenizer"]
    assert info["teacher_signal"] == "cache" and info["teacher_tokens"] == 0
    assert 0.5 < cov["aligned_row_share"] <= 1 and 0 < cov["kd_row_share"] <= cov["aligned_row_share"]
    assert 0.5 < cov["teacher_mass_used"] <= 1 + 1e-6
    curve = [loss for _, loss in info["loss_curve"]]
    assert curve and all(math.isfinite(x) for x in curve)
    sft = json.loads((out / "runs" / "sft" / "train_info.json").read_text())["loss_curve"]
    assert [x for _, x in sft] != curve  # the teacher's half of the loss was there


def test_a_cross_tokenizer_cache_refuses_uld(assets, other_teacher, tmp_path, capsys):  # noqa: F811
    r = _cross_recipe(
        assets,
        tmp_path / "out",
        other_teacher,
        [{"name": "u", "alpha": 0.5, "method": {"kind": "cross_tokenizer", "align": "uld"}}],
    )
    r["cache"] = {"dir": str(tmp_path / "cache"), "signal": {"kind": "topk"}}
    assert main(["distill", str(write(tmp_path / "a.yaml", r))]) == 2
    err = capsys.readouterr().err
    assert "align uld" in err and "vocab_map" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_certify_a_cache_in_the_teachers_tokens_for_a_student_of_another_family(
    assets,
    other_teacher,
    tmp_path,
    capsys,  # noqa: F811
):
    """`potstill cache --certify` on a cross-tokenizer recipe certifies each vocab_map run's divergence in what
    its student trains on (both signals projected onto its vocabulary with the run's kinds)."""
    from transformers import AutoTokenizer

    vmap = {"kind": "cross_tokenizer", "align": "vocab_map"}
    runs = [
        {"name": "sft", "alpha": 1.0},
        {"name": "v", "alpha": 0.5, "method": vmap},
        {"name": "v_exact", "alpha": 0.5, "method": {**vmap, "kinds": ["exact"]}},
    ]
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = _cross_recipe(assets, out, other_teacher, runs)
    r["cache"] = {
        "dir": str(cache),
        "signal": {"kind": "sampled", "draws": 8},
        "certify": {"probe_examples": 4, "candidates": [4, 64]},
    }
    assert main(["cache", str(write(tmp_path / "r.yaml", r)), "--certify"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cert = json.loads((cache / "manifest.json").read_text())["certificate"]
    assert set(cert["divergences"]) == {"forward_kl", "forward_kl kinds ['exact']"}
    full, exact = cert["divergences"]["forward_kl"], cert["divergences"]["forward_kl kinds ['exact']"]
    assert full["runs"] == ["v"] and exact["runs"] == ["v_exact"] and exact["kinds"] == ["exact"]
    assert full["vocab"] == len(AutoTokenizer.from_pretrained(other_teacher)) and full["student_vocab"] < full["vocab"]
    assert full["criterion"] == "head" and [row["draws"] for row in full["candidates"]] == [4, 8, 64]
    # a sampled signal's noise falls with the draws; the debiased bias stays small against it
    ratios = [row["noise_ratio"] for row in full["candidates"]]
    assert ratios[2] < ratios[1] < ratios[0]
    assert full["dense_loss"] != exact["dense_loss"]  # another projection, another teacher distribution
    assert any(line.startswith("certificate forward_kl (v): draws=8 ") for line in lines)


def test_teacher_view_own_reads_the_teachers_own_encoding_live(assets, other_teacher, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    own = {"kind": "cross_tokenizer", "align": "vocab_map", "teacher_view": "own"}
    r = _cross_recipe(assets, out, other_teacher, [{"name": "own", "alpha": 0.5, "method": own}])
    r["eval"]["include_untrained"] = False
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    info = json.loads((out / "runs" / "own" / "train_info.json").read_text())
    assert info["teacher_view"] == "own" and "teacher_signal" not in info and info["teacher_tokens"] > 0
    assert 0.5 < info["cross_tokenizer"]["aligned_row_share"] <= 1
    capsys.readouterr()  # the training run's progress bars
    # the view a cache cannot give, and uld with the own view, are refused in one line
    r["runs"] = [{"name": "t", "alpha": 0.5, "method": dict(own, teacher_view="student_text")}]
    r["cache"] = {"dir": str(tmp_path / "cache"), "signal": {"kind": "topk"}}
    assert main(["distill", str(write(tmp_path / "a.yaml", r))]) == 2
    err = capsys.readouterr().err
    assert "teacher_view student_text" in err and len(err.strip().splitlines()) == 1
    del r["cache"]
    r["runs"] = [{"name": "u", "alpha": 0.5, "method": dict(own, align="uld")}]
    assert main(["distill", str(write(tmp_path / "b.yaml", r))]) == 2
    assert "vocab_map" in capsys.readouterr().err
