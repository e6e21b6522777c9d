"""``potstill select`` on tiny local models: the pool is distill's split, every scorer runs end to
end, filters and budget give the right counts with a reason for every drop, KD scores from the
cache equal those from the live teacher, and a selection round-trips into a distill recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import DUP, NEAR, recipe, srecipe, write

from potstill.dd.select import IFD_ABOVE_ONE, example_stats, ifd_loss_ratio
from potstill.dd.selection_io import REPORT, SELECTED, SELECTION, load_selection
from potstill.errors import PotstillError
from potstill.fingerprints import pool_fingerprint
from potstill.recipes.distill import recipe_from_dict
from potstill.recipes.select import distill_recipe, load_select_recipe, select_recipe_from_dict
from potstill.runners.prepare import Prepared
from potstill.runners.select import BUDGET_CUT, LESS_TARGET, run_select, summary_line

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def select(assets, data_file, out, **sel) -> dict:
    return run_select(select_recipe_from_dict(srecipe(assets, data_file, out, **sel)))


def check_outputs(rep: dict, out: Path) -> dict:
    """Invariants of every selection: files agree, counts add up, every drop has a reason."""
    sel = json.loads((out / SELECTION).read_text())
    disk = json.loads((out / REPORT).read_text())
    assert disk["kept"] == rep["kept"] == len(sel["example_ids"])
    assert rep["kept"] + sum(rep["dropped"].values()) == rep["pool"]
    ids = sel["example_ids"]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for row in rep["examples"]:
        assert row["kept"] == (row["example_id"] in set(ids))
        assert (row["reason"] is None) == row["kept"], row
    counted: dict[str, int] = {}
    for row in rep["examples"]:
        if row["reason"] is not None:
            counted[row["reason_key"]] = counted.get(row["reason_key"], 0) + 1
    assert counted == rep["dropped"]
    lines = [json.loads(x) for x in (out / SELECTED).read_text().splitlines()]
    assert [x["example_id"] for x in lines] == ids
    assert all(x["prompt"] and x["response"] and x["messages"][-1]["role"] == "assistant" for x in lines)
    assert (out / "select_recipe.resolved.yaml").is_file()
    return sel


# --------------------------------------------------------------------------- the pool


def test_pool_is_distills_train_split(assets, data_file, tmp_path):
    sr = select_recipe_from_dict(srecipe(assets, data_file, tmp_path / "s", scorer={"kind": "random"}))
    # A distill recipe with the same data section but another student and runs.
    d = recipe_from_dict(
        recipe(
            assets, tmp_path / "d", **{"data.source.path": str(data_file), "data.eval_size": 4, "data.max_length": 64}
        )
    )
    train = Prepared(d).train_examples
    pool = Prepared(distill_recipe(sr)).pool_examples
    assert [x["example_id"] for x in pool] == [x["example_id"] for x in train] == list(range(len(train)))
    assert [x["input_ids"] for x in pool] == [x["input_ids"] for x in train]
    assert [x["labels"] for x in pool] == [x["labels"] for x in train]
    rep = run_select(sr)
    assert rep["pool"] == len(train) and rep["data_fingerprint"] == pool_fingerprint(train)
    # the example ids of the report are the pool's, in pool order
    assert [r["example_id"] for r in rep["examples"]] == list(range(len(train)))


# ------------------------------------------------------------------- every scorer kind


SCORERS = {
    "random": {"kind": "random"},
    "perplexity": {"kind": "perplexity"},
    "perplexity_teacher": {"kind": "perplexity", "model": "teacher"},
    "ifd_loss_ratio": {"kind": "ifd_loss_ratio"},
    "ifd_ppl_ratio": {"kind": "ifd_ppl_ratio", "model": "student"},
    "kd_divergence": {"kind": "kd_divergence"},
    "kd_divergence_jsd": {
        "kind": "kd_divergence",
        "divergence": {"name": "generalized_jsd", "beta": 0.5},
        "temperature": 2.0,
    },
    "confident_teacher_unsure_student": {"kind": "confident_teacher_unsure_student"},
    "less_pool": {"kind": "less", "proj_dim": 32, "warmup_steps": 2, "target_size": 3},
    "less_eval": {"kind": "less", "proj_dim": 32, "warmup_steps": 1, "target": "eval", "adam": False},
    "k_center": {"kind": "k_center"},
    "kmeans_medoids": {"kind": "kmeans_medoids", "embeddings": "student_hidden"},
    "herding": {"kind": "herding"},
    "deita": {"kind": "deita", "score": {"kind": "ifd_loss_ratio"}, "threshold": 0.95, "embeddings": "student_hidden"},
}


@pytest.mark.parametrize("name", list(SCORERS))
def test_each_scorer_runs_through_run_select(assets, data_file, tmp_path, name):
    out = tmp_path / name
    rep = select(assets, data_file, out, scorer=SCORERS[name])
    sel = check_outputs(rep, out)
    n = rep["pool"]
    held = rep["dropped"].get(LESS_TARGET, 0)
    assert held == (3 if name == "less_pool" else 0)
    k = math.ceil(0.25 * n)
    assert rep["budget"]["count"] == k
    if name == "deita":  # DEITA may skip near-identical examples and fill less than the budget
        assert 1 <= rep["kept"] <= k
    else:
        assert rep["kept"] == k and rep["dropped"][BUDGET_CUT] == n - k - held
    assert sel["scorer"]["kind"] == SCORERS[name]["kind"]
    scored = [r for r in rep["examples"] if r["score"] is not None]
    if name in ("random", "k_center", "kmeans_medoids", "herding"):
        assert not scored and rep["scores"] is None
    else:
        assert len(scored) == n - held and rep["scores"]["name"] in (SCORERS[name]["kind"], "less", "ifd_loss_ratio")
    if name not in ("random", "deita") and scored:  # largest: every kept score >= every cut score
        kept = [r["score"] for r in scored if r["kept"]]
        cut = [r["score"] for r in scored if not r["kept"]]
        assert min(kept) >= max(cut)
    if name in ("k_center", "kmeans_medoids", "herding", "deita"):
        assert rep["coverage"]["max_distance_to_kept"] >= 0
    t = rep["timings_s"]
    assert t["total_s"] >= t["scoring_s"] >= 0
    if name.startswith(("kd_", "confident")):
        assert t["teacher_s"] > 0 and t["student_s"] > 0 and rep["teacher_signal"] == "live teacher"
    if name in ("k_center", "herding"):
        assert t["embedding_s"] > 0
    assert "kept" in summary_line(rep)


def test_lowest_scores_with_largest_false(assets, data_file, tmp_path):
    rep = select(assets, data_file, tmp_path / "o", scorer={"kind": "perplexity"}, largest=False, budget=4)
    scored = [r for r in rep["examples"]]
    assert max(r["score"] for r in scored if r["kept"]) <= min(r["score"] for r in scored if not r["kept"])
    assert all(r["reason"].startswith("budget cut (score above cut") for r in scored if not r["kept"])


# ---------------------------------------------------------------- filters and budget


def test_filters_then_budget_give_the_right_counts(assets, data_file, tmp_path):
    out = tmp_path / "f"
    sr = select_recipe_from_dict(
        srecipe(
            assets,
            data_file,
            out,
            scorer={"kind": "kd_divergence"},
            budget=5,
            filters=[{"kind": "minhash_dedup", "threshold": 0.5}, {"kind": "drop_ifd_above_one", "model": "student"}],
        )
    )
    rep = run_select(sr)
    check_outputs(rep, out)
    prep = Prepared(distill_recipe(sr))
    pool = prep.pool_examples
    # the exact duplicate and the near duplicate are dropped, naming the kept one
    fox = [i for i, x in enumerate(pool) if x["reference"] in (DUP, DUP.lower(), NEAR)]
    assert len(fox) >= 2, "the seeded split should keep at least two fox texts in the pool"
    reasons = {r["example_id"]: r["reason"] for r in rep["examples"]}
    assert reasons[fox[0]] is None or not reasons[fox[0]].startswith(("exact", "near"))
    for i in fox[1:]:
        assert reasons[i].startswith((f"exact duplicate (of #{fox[0]})", f"near-duplicate (of #{fox[0]}")), reasons[i]
    dup_drops = rep["dropped"].get("exact duplicate", 0) + rep["dropped"].get("near-duplicate", 0)
    assert dup_drops == len(fox) - 1
    # IFD > 1, computed independently on the dedup survivors
    after_dedup = [i for i in range(len(pool)) if i not in fox[1:]]
    st = example_stats(prep.student0, [pool[i] for i in after_dedup], batch_size=3)
    n_ifd = int((ifd_loss_ratio(st) > 1).sum())
    assert rep["dropped"].get(IFD_ABOVE_ONE, 0) == n_ifd
    survivors = len(pool) - dup_drops - n_ifd
    assert survivors > 5, "the tiny student should leave more than the budget after IFD > 1"
    assert rep["kept"] == 5 and rep["dropped"][BUDGET_CUT] == survivors - 5
    assert rep["filter_report"] == {
        "total": len(pool),
        "kept": survivors,
        "dropped": {k: v for k, v in rep["dropped"].items() if k != BUDGET_CUT},
    }
    # a budget larger than what the filters leave keeps every survivor and says so
    rep2 = run_select(
        select_recipe_from_dict(
            srecipe(
                assets,
                data_file,
                tmp_path / "g",
                scorer={"kind": "random"},
                budget=len(pool),
                filters=[{"kind": "minhash_dedup"}],
            )
        )
    )
    assert rep2["budget"]["unmet"] and rep2["kept"] == len(pool) - dup_drops and BUDGET_CUT not in rep2["dropped"]


# ---------------------------------------------------------------- cache == live teacher


def _cache_for(sr_dict: dict, cache: dict) -> None:
    from potstill.runners.cache import cache as write_cache

    sr = select_recipe_from_dict({**sr_dict, "cache": cache})
    write_cache(distill_recipe(sr), progress=False)


def test_kd_divergence_from_the_cache_equals_the_live_teacher(assets, data_file, tmp_path):
    cache = {"dir": str(tmp_path / "tc"), "signal": {"kind": "dense"}, "dtype": "fp32"}
    base = srecipe(assets, data_file, tmp_path / "live", scorer={"kind": "kd_divergence"}, budget=0.3)
    _cache_for(base, cache)
    live = run_select(select_recipe_from_dict(base))
    cached = run_select(select_recipe_from_dict({**base, "output_dir": str(tmp_path / "cached"), "cache": cache}))
    assert live["teacher_signal"] == "live teacher" and cached["teacher_signal"].startswith("cache ")
    a = torch.tensor([r["score"] for r in live["examples"]], dtype=torch.float64)
    b = torch.tensor([r["score"] for r in cached["examples"]], dtype=torch.float64)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    sel_live = json.loads((tmp_path / "live" / SELECTION).read_text())
    sel_cached = json.loads((tmp_path / "cached" / SELECTION).read_text())
    assert sel_live["example_ids"] == sel_cached["example_ids"]
    # a sparse (top-k) cache also scores the data, on its coarsened space
    topk = {"dir": str(tmp_path / "tk"), "signal": {"kind": "topk", "k": 8}}
    _cache_for(base, topk)
    rep = run_select(
        select_recipe_from_dict(
            {
                **base,
                "output_dir": str(tmp_path / "topk"),
                "cache": topk,
                "select": {**base["select"], "scorer": {"kind": "confident_teacher_unsure_student"}},
            }
        )
    )
    assert rep["kept"] == live["kept"] and rep["teacher_signal"].startswith("cache ")


# ----------------------------------------------------------- load_selection round trip


def test_load_selection_round_trip_and_distill_hook(assets, data_file, tmp_path):
    out = tmp_path / "s"
    cache = {"dir": str(tmp_path / "tc"), "signal": {"kind": "topk", "k": 8}}
    sd = srecipe(assets, data_file, out, scorer={"kind": "kd_divergence"}, budget=6)
    _cache_for(sd, cache)
    rep = run_select(select_recipe_from_dict({**sd, "cache": cache}))
    ids = json.loads((out / SELECTION).read_text())["example_ids"]
    data = {"data.source.path": str(data_file), "data.eval_size": 4, "data.max_length": 64}
    d = recipe_from_dict(recipe(assets, tmp_path / "d", **data))
    pool = Prepared(d).train_examples
    for where in (out / SELECTION, out):  # the file or its directory
        sub = load_selection(where, pool)
        assert [x["example_id"] for x in sub] == ids and len(sub) == rep["kept"] == 6
        assert all(x is pool[x["example_id"]] for x in sub)
    # the distill hook: data.selection trains on the subset, the cache is keyed by the original ids
    from potstill.runners.distill import distill

    dd = recipe(
        assets,
        tmp_path / "d2",
        **data,
        **{"data.selection": str(out / SELECTION)},
        runs=[{"name": "kd", "alpha": 0.0}],
        cache=cache,
    )
    dd["train"]["max_steps"] = 2
    dr = recipe_from_dict(dd)
    prep = Prepared(dr)
    assert [x["example_id"] for x in prep.train_examples] == ids and len(prep.pool_examples) == rep["pool"]
    metrics = distill(dr, progress=False)
    assert math.isfinite(metrics["kd"]["forward_kl"])


def test_load_selection_refuses_other_data(assets, data_file, tmp_path):
    out = tmp_path / "s"
    run_select(select_recipe_from_dict(srecipe(assets, data_file, out, scorer={"kind": "random"})))
    other = recipe_from_dict(
        recipe(assets, tmp_path / "d", **{"data.source.path": str(data_file), "data.eval_size": 4, "data.seed": 1})
    )
    with pytest.raises(PotstillError, match="made for other data") as e:
        load_selection(out / SELECTION, Prepared(other).train_examples)
    assert "\n" not in str(e.value)
    with pytest.raises(PotstillError, match="run `potstill select"):
        load_selection(tmp_path / "nowhere" / SELECTION, [])
    bad = write(tmp_path / "bad.json", json.dumps({"format": "something else"}))
    with pytest.raises(PotstillError, match="not a potstill selection"):
        load_selection(bad, [])


# ------------------------------------------------------------------------ bad recipes


def _bad(assets, data_file, tmp_path):
    out = tmp_path / "out"
    base = srecipe(assets, data_file, out)
    return {
        "unknown scorer": ({**base, "select": {"scorer": {"kind": "magic"}}}, "select.scorer"),
        "budget 0": ({**base, "select": {"budget": 0}}, "select.budget"),
        "budget fraction above 1": ({**base, "select": {"budget": 1.5}}, "select.budget"),
        "budget above the pool": ({**base, "select": {"budget": 1000}}, "more than the pool"),
        "missing cache dir": ({**base, "cache": {"dir": str(tmp_path / "no_cache")}}, "run `potstill cache` first"),
        "unknown key": ({**base, "selct": {}}, "'selct' is not a known option"),
        "selection inside a select recipe": (
            {**base, "data": {**base["data"], "selection": "x.json"}},
            "data.selection belongs in the distill recipe",
        ),
        "cache temperature differs": (
            {**base, "cache": {"signal": {"kind": "topk"}, "temperature": 2.0}},
            "cache.temperature=2.0",
        ),
        "black-box teacher with a KD scorer": (
            {**base, "teacher": {"model": None}, "student": {"kind": "pretrained", "model": str(assets[1])}},
            "black-box teacher",
        ),
        "LESS target takes the whole pool": (
            {**base, "select": {"scorer": {"kind": "less", "target_size": 1000}}},
            "target_size=1000",
        ),
        "unknown filter": ({**base, "select": {"filters": [{"kind": "bloom"}]}}, "select.filters.0"),
    }


BAD_CASES = [
    "unknown scorer",
    "budget 0",
    "budget fraction above 1",
    "budget above the pool",
    "missing cache dir",
    "unknown key",
    "selection inside a select recipe",
    "cache temperature differs",
    "black-box teacher with a KD scorer",
    "LESS target takes the whole pool",
    "unknown filter",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_recipes_give_one_line_and_write_nothing(assets, data_file, tmp_path, case):
    cases = _bad(assets, data_file, tmp_path)
    assert sorted(cases) == sorted(BAD_CASES)
    rec, expected = cases[case]
    with pytest.raises(PotstillError) as e:
        run_select(select_recipe_from_dict(rec))
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_yaml_loading_and_the_example_recipe(assets, data_file, tmp_path):
    p = write(
        tmp_path / "s.yaml",
        {**srecipe(assets, data_file, tmp_path / "o"), "kind": "causal_lm", "select": {"budget": 3}},
    )  # kind: absent is classification, the one default of every verb with flavours
    sr = load_select_recipe(p, ["select.scorer={kind: herding}", "select.seed=3"])
    assert sr.select.scorer.kind == "herding" and sr.select.seed == 3 and sr.select.budget == 3
    with pytest.raises(PotstillError, match="does not exist"):
        load_select_recipe(tmp_path / "nope.yaml")
    with pytest.raises(PotstillError, match="not valid YAML"):
        load_select_recipe(write(tmp_path / "b.yaml", "select: [1, 2\n"))
    ex = load_select_recipe(REPO / "recipes" / "select_kd.yaml")
    assert ex.select.scorer.kind == "kd_divergence" and ex.select.budget == 0.1 and ex.select.largest
    assert ex.cache is not None and distill_recipe(ex).cache.temperature == 1.0
