"""``potstill eval-data`` with ``kind: causal_lm`` on tiny local models: a selection is judged against
random and coreset subsets of the same size under one KD protocol; the arms train exactly as the
distill verb would (parity with ``distill`` on ``data.selection``); equal epochs give the steps; the
gain over random and the ratio to the 100% student follow their definitions; a rerun resumes; bad
recipes give one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import recipe, srecipe, write

from potstill.cli import main
from potstill.dd.selection_io import REPORT, SELECTED, SELECTION
from potstill.eval.verdict import holm, satterthwaite_df
from potstill.recipes import eval_data as eval_data_recipes
from potstill.recipes.distill import recipe_from_dict
from potstill.recipes.eval_data import load_eval_data_recipe
from potstill.recipes.select import select_recipe_from_dict
from potstill.runners import eval_data_lm
from potstill.runners.eval_data import run_eval_data, summary_line
from potstill.runners.select import run_select

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = [{"name": "hard", "alpha": 1.0}, {"name": "soft", "alpha": 0.0, "divergence": {"name": "forward_kl"}}]


def lm_recipe(assets, data_file, out: Path, sel: Path, **patch) -> dict:
    r = {
        "kind": "causal_lm",
        "output_dir": str(out),
        "teacher": {"model": str(assets[1])},
        "student": {"kind": "from_teacher", "layers": 1},
        "data": {"source": {"kind": "file", "path": str(data_file)}, "eval_size": 4, "max_length": 64},
        "train": {"batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1},
        "runs": RUNS,
        "epochs": 1.0,
        "seeds": 2,
        "baselines": ["random", "k_center"],
        "embeddings": "student_hidden",
        "device": "cpu",
        "sets": [{"name": "kd_top", "path": str(sel)}],
    }
    r.update(patch)
    return r


@pytest.fixture(scope="module")
def selection(assets, data_file, tmp_path_factory):
    """A KD-aware selection of 5 pool examples (the highest teacher-student divergence)."""
    out = tmp_path_factory.mktemp("sel") / "kd"
    run_select(select_recipe_from_dict(srecipe(assets, data_file, out, scorer={"kind": "kd_divergence"}, budget=5)))
    return out / SELECTION


@pytest.fixture(scope="module")
def judged(assets, data_file, selection, tmp_path_factory):
    out = tmp_path_factory.mktemp("evlm") / "out"
    rec = load_eval_data_recipe(lm_recipe(assets, data_file, out, selection))
    return out, run_eval_data(rec)


def test_arms_share_size_and_steps_and_the_set_is_the_selection(judged, selection):
    out, rep = judged
    assert rep["kind"] == "causal_lm" and rep["runs"] == ["hard", "soft"]
    (st,) = rep["sets"]
    ids = json.loads(selection.read_text())["example_ids"]
    assert st["size"] == len(ids) == 5 and set(st["arms"]) == {"set", "random", "k_center"}
    # equal epochs: 5 examples, batch 2, 1 epoch -> 3 steps for every arm of the set's size
    assert {a["steps"] for a in st["arms"].values()} == {3} and {a["examples"] for a in st["arms"].values()} == {5}
    assert rep["full"]["steps"] == math.ceil(rep["n_pool"] / 2) and rep["full"]["examples"] == rep["n_pool"]
    # two random draws (one per seed), each of 5 pool examples, drawn by `potstill select`
    draws = [
        json.loads((out / "baselines" / f"random_n5_s{i}" / SELECTION).read_text())["example_ids"] for i in range(2)
    ]
    assert all(len(d) == 5 for d in draws) and draws[0] != draws[1]
    for run in ("hard", "soft"):
        fkl = st["arms"]["set"]["runs"][run]["forward_kl"]
        assert fkl["n"] == 2 and all(math.isfinite(v) and v > 0 for v in fkl["values"])
    assert not (out / "students").exists()  # scratch students are removed


def test_gain_and_ratio_follow_their_definitions(judged):
    _, rep = judged
    (st,) = rep["sets"]
    for run in ("hard", "soft"):
        rnd = st["arms"]["random"]["runs"][run]["forward_kl"]["mean"]
        full = rep["full"]["runs"][run]["forward_kl"]
        for arm in st["arms"].values():
            per = arm["runs"][run]
            m = per["forward_kl"]["mean"]
            assert m == pytest.approx(sum(per["forward_kl"]["values"]) / 2)
            assert per["gain_vs_random_pct"] == pytest.approx(100 * (rnd - m) / rnd)
            assert per["ratio_to_full"] == pytest.approx(m / full)
        assert st["arms"]["random"]["runs"][run]["gain_vs_random_pct"] == pytest.approx(0.0)
    # the untrained student and the teacher's own row are reported; the teacher is at KL 0
    assert rep["teacher"]["forward_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rep["student_init"]["forward_kl"] > 0
    line = summary_line(rep)
    assert line.startswith("eval-data: kd_top (n=5): hard FKL") and "x full" in line and "\n" not in line


def test_verdicts_pair_each_arm_with_its_baselines_per_seed_and_held_out_example(judged):
    """The set against each baseline, and k_center against random once for the set's size, per run and metric,
    under one Holm: each row's per-seed differences are the held-out examples' mean differences kept in
    arms.json (seed i of every arm; random's own draw at seed i), and its degrees of freedom are Satterthwaite's
    on the example-by-example difference table (so examples are paired by position); the per-example scores
    stay out of the report."""
    out, rep = judged
    (st,) = rep["sets"]
    done = json.loads((out / "arms.json").read_text())["arms"]
    keys = {"set": "set_kd_top_s{}", "random": "random_n5_s{}", "k_center": "k_center_n5_s{}"}
    runs, metrics = ("hard", "soft"), ("forward_kl", "top1_agreement")
    own = {(v["arm"], v["baseline"], v["run"], v["metric"]): v for v in st["verdicts"]}
    base = {(v["arm"], v["baseline"], v["run"], v["metric"]): v for v in rep["verdicts"]["baselines"]}
    assert set(own) == {("set", b, r, m) for b in ("random", "k_center") for r in runs for m in metrics}
    assert set(base) == {("k_center", "random", r, m) for r in runs for m in metrics}
    assert {v["group"] for v in base.values()} == {"n5"} and rep["verdicts"]["rows"] == 12
    family = st["verdicts"] + rep["verdicts"]["baselines"]
    assert [v["p_holm"] for v in family] == pytest.approx(holm([v["p"] for v in family]))
    for (arm, ref, run, metric), v in (own | base).items():
        table = []
        for i in range(2):
            a = done[keys[arm].format(i)]["runs"][run]["per_example"][metric]
            b = done[keys[ref].format(i)]["runs"][run]["per_example"][metric]
            assert len(a) == len(b) == rep["n_eval"]
            table.append([x - y for x, y in zip(a, b, strict=True)])
        assert v["per_seed"] == pytest.approx([sum(row) / len(row) for row in table]) and v["seeds"] == 2
        assert v["df"] == pytest.approx(satterthwaite_df(np.array(table)))
    assert "per_example" not in json.dumps(rep)
    for run in runs:
        verdict = own[("set", "random", run, "forward_kl")]["verdict"]
        assert f"{run} FKL" in summary_line(rep) and f"% vs random, {verdict}, " in summary_line(rep)


def test_set_arm_trains_exactly_as_distill_on_the_selection(assets, data_file, selection, judged, tmp_path):
    """Independent reference: `potstill distill` with data.selection, the same steps and seed."""
    from potstill.runners.distill import distill

    _, rep = judged
    d = recipe(
        assets,
        tmp_path / "d",
        **{
            "data.source.path": str(data_file),
            "data.eval_size": 4,
            "data.max_length": 64,
            "data.selection": str(selection),
        },
    )
    d.update(
        student={"kind": "from_teacher", "layers": 1},
        runs=RUNS,
        train={"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1, "seed": 0},
        eval={"max_new_tokens": 1, "batch_size": 8, "include_untrained": True},
    )
    metrics = distill(recipe_from_dict(d), progress=False)
    arm = rep["sets"][0]["arms"]["set"]["runs"]
    for run in ("hard", "soft"):
        assert arm[run]["forward_kl"]["values"][0] == pytest.approx(metrics[run]["forward_kl"], rel=1e-5)
        assert arm[run]["top1_agreement"]["values"][0] == pytest.approx(metrics[run]["top1_agreement"])
    assert rep["student_init"]["forward_kl"] == pytest.approx(metrics["student_init"]["forward_kl"], rel=1e-5)


def test_a_rerun_resumes_and_a_changed_recipe_starts_over(assets, data_file, selection, tmp_path, monkeypatch):
    out = tmp_path / "out"
    base = lm_recipe(assets, data_file, out, selection, seeds=1, baselines=["random"], full=False, runs=RUNS[1:])
    first = run_eval_data(load_eval_data_recipe(base))
    calls, draws = [], []
    real = __import__("potstill.runners.train", fromlist=["train_run"]).train_run
    monkeypatch.setattr("potstill.runners.train.train_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_select = __import__("potstill.runners.select", fromlist=["run_select"]).run_select
    monkeypatch.setattr("potstill.runners.select.run_select", lambda *a, **k: draws.append(1) or real_select(*a, **k))
    again = run_eval_data(load_eval_data_recipe(base))
    assert calls == [] and draws == []  # everything came from arms.json and the baselines' own files
    assert again["sets"] == first["sets"] and again["fingerprint"] == first["fingerprint"]
    # an interrupted run: one arm missing from arms.json is trained, the others are kept
    arms = json.loads((out / "arms.json").read_text())
    arms["arms"].pop("random_n5_s0")
    (out / "arms.json").write_text(json.dumps(arms))
    run_eval_data(load_eval_data_recipe(base))
    assert len(calls) == 1
    # a changed recipe (other epochs) is not mixed with the old results
    calls.clear()
    changed = run_eval_data(load_eval_data_recipe({**base, "epochs": 2.0}))
    assert len(calls) == 2 and changed["fingerprint"] != first["fingerprint"]
    assert changed["sets"][0]["arms"]["set"]["steps"] == 5
    # steps count optimizer steps: 5 examples, micro-batch 2 x accumulation 2, 1 epoch -> ceil(5 / 4) = 2
    accum = run_eval_data(load_eval_data_recipe({**base, "train": {**base["train"], "gradient_accumulation_steps": 2}}))
    assert accum["sets"][0]["arms"]["set"]["steps"] == 2 and accum["protocol"]["batch_size"] == 4


def test_construction_seconds_from_the_selection_report(judged, selection):
    _, rep = judged
    arms = rep["sets"][0]["arms"]
    report = json.loads((selection.parent / REPORT).read_text())
    assert arms["set"]["construction_seconds"] == pytest.approx(report["timings_s"]["total_s"])
    assert arms["set"]["construction_source"].endswith(REPORT)
    assert arms["random"]["construction_source"] == "measured" and arms["random"]["construction_seconds"] >= 0


def _bad_cases(assets, data_file, selection, tmp_path):
    out = tmp_path / "out"
    base = lm_recipe(assets, data_file, out, selection)
    other = tmp_path / "other"
    run_select(
        select_recipe_from_dict(
            {
                **srecipe(assets, data_file, other, scorer={"kind": "random"}, budget=3),
                "data": {**base["data"], "seed": 1},
            }
        )
    )
    return {
        "missing set": ({**base, "sets": [{"name": "a", "path": str(tmp_path / "none.json")}]}, "does not exist"),
        "selection of another pool": ({**base, "sets": [{"name": "a", "path": str(other)}]}, "set 'a':"),
        "no random baseline": ({**base, "baselines": ["k_center"]}, "must include random"),
        "reserved set name": ({**base, "sets": [{"name": "full", "path": str(selection)}]}, "reserved"),
        "data.selection": ({**base, "data": {**base["data"], "selection": str(selection)}}, "remove data.selection"),
        "unknown key": ({**base, "epoch": 2}, "'epoch' is not a known option"),
        "bad run": ({**base, "runs": [{"name": "kd", "alpha": 2.0}]}, "runs.0.alpha"),
        "run named teacher": ({**base, "runs": [{"name": "teacher", "alpha": 0.0}]}, "row of the report"),
        "jsonl set with a cache": (
            {
                **base,
                "cache": {"signal": {"kind": "topk", "k": 8}},
                "sets": [{"name": "syn", "path": str(selection), "format": "jsonl"}],
            },
            "set 'syn' holds new examples that the cache does not cover",
        ),
        "jsonl set missing a column": (
            {
                **base,
                "sets": [
                    {
                        "name": "syn",
                        "path": str(selection.parent / SELECTED),
                        "format": "jsonl",
                        "response_field": "answer",
                    }
                ],
            },
            "set 'syn'",
        ),
    }


BAD = [
    "missing set",
    "selection of another pool",
    "no random baseline",
    "reserved set name",
    "data.selection",
    "unknown key",
    "bad run",
    "run named teacher",
    "jsonl set with a cache",
    "jsonl set missing a column",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_recipes_give_one_line_through_the_cli(assets, data_file, selection, tmp_path, case, capsys):
    cases = _bad_cases(assets, data_file, selection, tmp_path)
    assert sorted(cases) == sorted(BAD)
    rec, expected = cases[case]
    capsys.readouterr()  # the bars of building the cases
    assert main(["eval-data", str(write(tmp_path / "r.yaml", rec))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # nothing is written before the input is checked


def test_the_cli_runs_an_lm_recipe(assets, data_file, selection, tmp_path, capsys):
    out = tmp_path / "out"
    rec = lm_recipe(assets, data_file, out, selection, seeds=1, baselines=["random"], full=False, runs=RUNS[1:])
    assert main(["eval-data", str(write(tmp_path / "r.yaml", rec)), "epochs=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "kd_top (n=5): soft FKL" in printed and "eval-data: results in" in printed
    rep = json.loads((out / "eval_data.json").read_text())
    assert rep["protocol"]["epochs"] == 0.5 and rep["sets"][0]["arms"]["set"]["steps"] == 2
    assert rep["full"] is None and "ratio_to_full" in rep["sets"][0]["arms"]["set"]["runs"]["soft"]
    assert isinstance(eval_data_recipes.load_lm_recipe(rec), eval_data_recipes.EvalDataLMRecipe)


def test_soft_arms_from_an_exact_cache_equal_the_live_teacher(assets, data_file, selection, tmp_path):
    """A top-k cache with k = the whole vocabulary (fp32) is the teacher's distribution: the arms
    trained from it, a subset of the pool read by example id, end where the live teacher's do."""
    from transformers import AutoConfig

    from potstill.runners.cache import cache

    vocab = AutoConfig.from_pretrained(assets[1]).vocab_size
    common = {"seeds": 1, "baselines": ["random"], "full": False, "runs": RUNS[1:]}
    live = run_eval_data(load_eval_data_recipe(lm_recipe(assets, data_file, tmp_path / "live", selection, **common)))
    cached_rec = load_eval_data_recipe(
        lm_recipe(
            assets,
            data_file,
            tmp_path / "cached",
            selection,
            **common,
            cache={"dir": str(tmp_path / "tc"), "signal": {"kind": "topk", "k": vocab}, "dtype": "fp32"},
        )
    )
    cache(cached_rec.distill_recipe(), progress=False)
    cached = run_eval_data(cached_rec)
    for arm in ("set", "random"):
        a = live["sets"][0]["arms"][arm]["runs"]["soft"]["forward_kl"]["mean"]
        b = cached["sets"][0]["arms"][arm]["runs"]["soft"]["forward_kl"]["mean"]
        assert b == pytest.approx(a, rel=1e-3), arm
    assert cached["protocol"]["cache"] is True and live["protocol"]["cache"] is False


def test_a_jsonl_set_of_the_selected_rows_trains_as_the_selection(assets, data_file, selection, tmp_path):
    """``format: jsonl`` (new examples, e.g. synthetic.jsonl): the selection's own rows written as
    prompt/response lines give the selection's metrics; its seconds come from synthesis_report.json."""
    syn = tmp_path / "syn"
    syn.mkdir()
    rows = [json.loads(x) for x in (selection.parent / SELECTED).read_text().splitlines()]
    (syn / "synthetic.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows)
    )
    (syn / "synthesis_report.json").write_text(json.dumps({"round_seconds": 42.5, "wall_seconds": 3.0}))
    sets = [
        {"name": "sel", "path": str(selection)},
        {"name": "syn", "path": str(syn / "synthetic.jsonl"), "format": "jsonl"},
    ]
    rep = run_eval_data(
        load_eval_data_recipe(
            lm_recipe(
                assets, data_file, tmp_path / "out", selection, seeds=1, baselines=["random"], full=False, sets=sets
            )
        )
    )
    sel, new = rep["sets"]
    assert new["format"] == "jsonl" and new["size"] == sel["size"] == len(rows)
    for run in ("hard", "soft"):
        a, b = sel["arms"]["set"]["runs"][run], new["arms"]["set"]["runs"][run]
        assert b["forward_kl"]["values"] == pytest.approx(a["forward_kl"]["values"], rel=1e-6)
        # one size, one set of random baselines: the same random arm judges both
        assert new["arms"]["random"]["runs"][run]["forward_kl"] == sel["arms"]["random"]["runs"][run]["forward_kl"]
    assert new["arms"]["set"]["construction_seconds"] == 42.5
    assert new["arms"]["set"]["construction_source"].endswith("synthesis_report.json")


def test_non_finite_metrics_are_counted_not_averaged_and_the_line_still_prints():
    st = eval_data_lm._stats([1.0, None, 3.0, float("nan")])
    assert st["mean"] == 2.0 and st["n"] == 2 and st["non_finite"] == 2
    assert math.isnan(eval_data_lm._stats([None])["mean"])
    row = {"forward_kl": {"mean": None}, "gain_vs_random_pct": None, "ratio_to_full": None}
    report = {
        "kind": "causal_lm",
        "runs": ["soft"],
        "baselines": ["random"],
        "total_s": 1.0,
        "path": "x",
        "sets": [{"name": "s", "size": 3, "arms": {"set": {"runs": {"soft": row}}, "random": {"runs": {"soft": row}}}}],
    }
    assert summary_line(report) == "eval-data: s (n=3): soft FKL n/a (n/a% vs random; random n/a); 1 s  report: x"


def test_data_paths_resolve_as_in_distill_and_select(assets, data_file, selection, tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_DATA", str(data_file.parent))
    rec = lm_recipe(assets, data_file, tmp_path / "o", selection)
    rec["data"]["source"]["path"] = f"$POTSTILL_DATA/{data_file.name}"
    assert Path(load_eval_data_recipe(rec).data.source.path) == data_file
    # a relative data path is relative to the recipe file, as a distill or select recipe's is
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pool.jsonl").write_text(data_file.read_text())
    rec["data"]["source"]["path"] = "pool.jsonl"
    loaded = load_eval_data_recipe(write(tmp_path / "sub" / "r.yaml", rec))
    assert Path(loaded.data.source.path).resolve() == (tmp_path / "sub" / "pool.jsonl").resolve()


def test_one_teacher_pass_per_arm_serves_every_run(assets, data_file, selection, tmp_path, monkeypatch):
    import potstill.eval as ev

    calls = []
    real = ev.evaluate_runs
    monkeypatch.setattr(
        ev, "evaluate_runs", lambda students, *a, **k: calls.append(sorted(students)) or real(students, *a, **k)
    )
    run_eval_data(
        load_eval_data_recipe(
            lm_recipe(assets, data_file, tmp_path / "o", selection, seeds=1, baselines=["random"], full=False)
        )
    )
    # the untrained student, then the set's and random's hard + soft students, each pair in one call
    assert calls == [["student"], ["hard", "soft"], ["hard", "soft"]]
