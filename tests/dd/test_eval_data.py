"""`potstill eval-data` (potstill.runners.eval_data): sets vs random / coreset subsets under one protocol.

The toy of tests/dd/test_condense_recipe.py: a 2-layer, 32-wide random BERT over a word vocabulary,
sentences of filler words plus one class word. The SST-2 loader and the encoder loader are
monkeypatched, so nothing is read from disk but the sets and recipes written here.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import DD_FILLER, NEGATIVE, POSITIVE, dd_bert, dd_tokenizer, dd_toy_examples

import potstill.runners.common as cr
import potstill.runners.eval_data as ed
from potstill.cli import main
from potstill.data.classification import Example, read_set_rows
from potstill.dd.selection_io import selection_for_pool
from potstill.errors import PotstillError
from potstill.eval.verdict import holm
from potstill.recipes.eval_data import load_eval_data_recipe
from potstill.runners.common import draw as _draw
from potstill.runners.eval_data import run_eval_data, summary_line
from potstill.runners.eval_data_sets import load_set as _load_set

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SEEDS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _patch(mp: pytest.MonkeyPatch) -> list[str]:
    tok, loads = dd_tokenizer(), []

    def fake_encoder(name):
        loads.append(name)
        return dd_bert(tok, seed=1), tok

    mp.setattr(cr, "load_encoder", fake_encoder)
    mp.setattr(
        cr,
        "load_sst2",
        lambda split="train", path=None: dd_toy_examples(200 if split == "train" else 60, 0 if split == "train" else 1),
    )
    return loads


@pytest.fixture
def toy(monkeypatch):
    return _patch(monkeypatch)


def write_rows(path: Path, rows: list[Example], key=("sentence", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key[0]: e.text, key[1]: e.label}) + "\n" for e in rows))
    return path


def informative(n: int, seed: int) -> list[Example]:
    """Class words only: every sentence says its label."""
    rng = random.Random(seed)
    return [Example(" ".join(rng.choice(POSITIVE if i % 2 else NEGATIVE) for _ in range(3)), i % 2) for i in range(n)]


def uninformative(n: int, seed: int) -> list[Example]:
    """Filler words only: the labels cannot be learned from the text."""
    rng = random.Random(seed)
    return [Example(" ".join(rng.choice(DD_FILLER) for _ in range(4)), i % 2) for i in range(n)]


def recipe_dict(out: Path, sets: list[dict], **extra) -> dict:
    return {
        "dataset": "sst2",
        "output_dir": str(out),
        "data": {"pool_size": 80, "eval_size": 60},
        "learner": {"encoder": "tiny", "max_length": 16, "steps": 30, "lr": 5e-2, "batch_size": 8, "seeds": SEEDS},
        "teacher": {"steps": 100},
        **extra,
        "sets": sets,
    }


def pool_of(data: dict) -> list[Example]:
    """The recipe's pool, as run_eval_data draws it (the sets do not matter for it)."""
    return cr.load_pool(load_eval_data_recipe({**data, "sets": [{"name": "x", "path": "x", "format": "jsonl"}]}))[0]


# ------------------------------------------------------------------------------- one full run, many checks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_data")
    with pytest.MonkeyPatch.context() as mp:
        loads = _patch(mp)
        write_rows(tmp / "good" / "condensed.jsonl", informative(8, 3))
        (tmp / "good" / "condense_report.json").write_text(json.dumps({"construction_s": 12.5}))
        write_rows(tmp / "bad" / "bad.jsonl", uninformative(8, 3), key=("text", "labels"))
        for i, seed in ((0, 4), (1, 5), (10, 6)):  # a DiLM-style directory: three replicas
            write_rows(tmp / "dilm" / f"set_{i}.json", informative(6, seed), key=("sentence", "labels"))
        sets = [
            {"name": "good", "path": str(tmp / "good" / "condensed.jsonl"), "format": "jsonl"},
            {"name": "bad", "path": str(tmp / "bad" / "bad.jsonl"), "format": "jsonl"},
            {"name": "given", "path": str(tmp / "bad" / "bad.jsonl"), "format": "jsonl", "construction_seconds": 1.5},
            {"name": "dilm", "path": str(tmp / "dilm"), "format": "dilm"},
        ]
        data = recipe_dict(tmp / "out", sets, baselines=["random", "k_center", "herding", "kmeans_medoids"])
        report = run_eval_data(load_eval_data_recipe(data))
    return tmp, report, {s["name"]: s for s in report["sets"]}, loads


def test_informative_set_beats_uninformative_and_random(run):
    _, report, sets, loads = run
    assert loads == ["tiny"]  # the encoder is built once for every set
    for kind in ("hard", "soft"):
        good, bad = sets["good"]["arms"]["set"][kind]["accuracy"], sets["bad"]["arms"]["set"][kind]["accuracy"]
        assert good["mean"] > bad["mean"] + 0.1, (kind, good, bad)
        assert good["mean"] > sets["good"]["arms"]["random"][kind]["accuracy"]["mean"], kind
    assert 0.7 < report["teacher"]["accuracy"] <= 1.0 and report["n_pool"] == 80 and report["n_eval"] == 60


def test_baselines_have_the_sets_size_and_class_balance(run):
    _, _, sets, _ = run
    for name, size, counts in (("good", 8, {"0": 4, "1": 4}), ("dilm", 6, {"0": 3, "1": 3})):
        st = sets[name]
        assert st["size"] == size and st["class_counts"] == counts
        assert set(st["arms"]) == {"set", "random", "k_center", "herding", "kmeans_medoids"}
        for arm, row in st["arms"].items():
            assert row["size"] == size and row["class_counts"] == counts, (name, arm)
    rows = sets["good"]["arms"]
    assert rows["random"]["distinct_draws"] == SEEDS  # one random draw per seed
    assert rows["herding"]["distinct_draws"] == 1  # herding is deterministic
    assert rows["random"]["construction_seconds"] > 0 and rows["herding"]["construction_seconds"] > 0


def test_hard_and_soft_rows_values_and_gain(run):
    _, report, sets, _ = run
    assert report["labels"] == ["hard", "soft"]
    for st in sets.values():
        reps = st["replicas"]
        for arm, row in st["arms"].items():
            for kind in ("hard", "soft"):
                acc = row[kind]["accuracy"]
                assert acc["n"] == len(acc["values"]) == (reps * SEEDS if arm == "set" else SEEDS), (arm, kind)
                assert acc["mean"] == statistics.fmean(acc["values"]) and acc["std"] == statistics.stdev(acc["values"])
                assert 0.0 <= row[kind]["macro_f1"]["mean"] <= 1.0
                rnd = st["arms"]["random"][kind]["accuracy"]["mean"]
                assert row[kind]["gain_vs_random_pts"] == 100.0 * (acc["mean"] - rnd)
            # hard and soft labels really train differently (teacher targets are not one-hot)
            assert row["hard"]["accuracy"]["values"] != row["soft"]["accuracy"]["values"], arm
    assert sets["dilm"]["replicas"] == 3
    assert sets["good"]["arms"]["random"]["hard"]["gain_vs_random_pts"] == 0.0


def test_verdicts_pair_each_set_with_its_baselines_by_learner_seed(run):
    """Every set against each baseline, and each baseline against random once per group of sets that share
    their baseline subsets (same class counts), per label kind and metric, under one Holm. The accuracy rows'
    per-seed differences are read back from the report's own per-learner values: seed s of a set is the mean
    over its replicas at that seed (replica-major order), paired with the baseline's seed s."""
    _, report, sets, _ = run
    baselines = report["baselines"]
    set_rows = [v for st in report["sets"] for v in st["verdicts"]]
    base_rows = report["verdicts"]["baselines"]
    groups = {json.dumps(st["class_counts"], sort_keys=True) for st in sets.values()}
    assert len(groups) == 2  # 4 + 4 (good, bad, given) and 3 + 3 (dilm)
    assert len(set_rows) == len(sets) * 2 * 2 * len(baselines)
    assert len(base_rows) == len(groups) * 2 * 2 * (len(baselines) - 1)
    assert report["verdicts"]["rows"] == len(set_rows) + len(base_rows)
    family = set_rows + base_rows
    ps = holm([v["p"] for v in family])
    assert [v["p_holm"] for v in family] == pytest.approx(ps)

    def check(v: dict, st: dict, arm: str, base: str, kind: str) -> None:
        reps = st["replicas"] if arm == "set" else 1
        a = st["arms"][arm][kind]["accuracy"]["values"]
        b = st["arms"][base][kind]["accuracy"]["values"]
        a_seed = [statistics.fmean(a[r * SEEDS + s] for r in range(reps)) for s in range(SEEDS)]
        assert v["per_seed"] == pytest.approx([a_seed[s] - b[s] for s in range(SEEDS)]), (arm, base, kind)
        assert v["difference"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
        assert v["seeds"] == SEEDS and v["examples"] == report["n_eval"] and v["df"] >= 1
        assert v["verdict"] in ("better", "worse", "no difference")
        assert (v["verdict"] == "no difference") == (v["p_holm"] >= 0.05)

    for st in sets.values():
        got = {(v["arm"], v["baseline"], v["labels"], v["metric"]): v for v in st["verdicts"]}
        assert set(got) == {("set", b, k, m) for b in baselines for k in ("hard", "soft") for m in ("accuracy", "nll")}
        for kind in ("hard", "soft"):
            for b in baselines:
                check(got[("set", b, kind, "accuracy")], st, "set", b, kind)
    for v in base_rows:
        assert v["baseline"] == "random" and v["arm"] in baselines
        if v["metric"] == "accuracy":
            st = next(x for x in sets.values() if json.dumps(x["class_counts"], sort_keys=True) == v["group"])
            check(v, st, v["arm"], "random", v["labels"])


def test_a_set_far_from_random_gets_a_verdict_in_the_metrics_direction(tmp_path, monkeypatch):
    """One set, one baseline, 5 seeds, 300 held-out sentences: the Holm family is the two metrics. A set of
    class words only against random real sentences (filler around one class word) is better: higher
    accuracy, lower NLL (the NLL verdict reads lower as better)."""
    _patch(monkeypatch)
    monkeypatch.setattr(
        cr,
        "load_sst2",
        lambda split="train", path=None: dd_toy_examples(
            200 if split == "train" else 300, 0 if split == "train" else 1
        ),
    )
    write_rows(tmp_path / "good.jsonl", informative(8, 3))
    data = recipe_dict(tmp_path / "out", [{"name": "good", "path": str(tmp_path / "good.jsonl"), "format": "jsonl"}])
    data["learner"]["seeds"], data["data"]["eval_size"] = 5, 300
    report = run_eval_data(load_eval_data_recipe({**data, "labels": ["hard"], "baselines": ["random"]}))
    rows = {v["metric"]: v for v in report["sets"][0]["verdicts"]}
    assert set(rows) == {"accuracy", "nll"} and report["verdicts"]["rows"] == 2
    assert rows["accuracy"]["difference"] > 0 and rows["accuracy"]["verdict"] == "better"
    assert rows["nll"]["difference"] < 0 and rows["nll"]["verdict"] == "better"
    assert ", better; random " in summary_line(report)


def test_construction_seconds_passed_through_or_null(run):
    tmp, _, sets, _ = run
    assert sets["given"]["construction_seconds"] == 1.5 and sets["given"]["construction_source"] == "recipe"
    assert sets["good"]["construction_seconds"] == 12.5
    assert sets["good"]["construction_source"] == str(tmp / "good" / "condense_report.json")
    assert sets["good"]["arms"]["set"]["construction_seconds"] == 12.5
    for name in ("bad", "dilm"):  # nothing known: null, not 0
        assert sets[name]["construction_seconds"] is None and sets[name]["construction_source"] is None
        assert sets[name]["arms"]["set"]["construction_seconds"] is None


def test_report_file_and_summary_line(run):
    tmp, report, _, _ = run
    path = tmp / "out" / "eval_data.json"
    assert json.loads(path.read_text()) == report and report["path"] == str(path)
    assert not list(path.parent.glob(".*.tmp"))
    line = summary_line(report)
    assert "\n" not in line and line.startswith("eval-data: good (n=8, 1x3): hard ")
    g = report["sets"][0]["arms"]["set"]["hard"]
    assert f"{g['accuracy']['mean']:.3f}" in line and f"{g['gain_vs_random_pts']:+.1f} pts" in line


# ------------------------------------------------------------------------------- baselines and sets


@pytest.mark.parametrize("kind", ["random", "k_center", "herding", "kmeans_medoids"])
def test_draw_matches_the_class_counts(kind):
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)
    emb = torch.nn.functional.normalize(torch.randn(22, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    counts = {0: 3, 2: 2}
    draws = [_draw(kind, counts, labels, emb, seed=s) for s in range(4)]
    for idx in draws:
        assert len(set(idx.tolist())) == len(idx) == 5
        assert Counter(labels[idx].tolist()) == Counter(counts)
    distinct = len({tuple(sorted(i.tolist())) for i in draws})
    assert distinct == 1 if kind == "herding" else distinct > 1


def test_selection_round_trip(tmp_path, toy):
    data = recipe_dict(tmp_path / "out", [], labels=["hard"], baselines=["random"])
    data["sets"] = [{"name": "sel", "path": str(tmp_path / "sel"), "format": "selection"}]
    pool = pool_of(data)
    ids = [i for i, e in enumerate(pool) if e.label == 0][:3] + [i for i, e in enumerate(pool) if e.label == 1][:2]
    (tmp_path / "sel").mkdir()
    (tmp_path / "sel" / "selection.json").write_text(json.dumps(selection_for_pool(pool, ids)))
    recipe = load_eval_data_recipe(data)
    _, replicas = _load_set(recipe.sets[0], pool)
    assert replicas == [[pool[i] for i in sorted(ids)]]
    report = run_eval_data(recipe)
    st = report["sets"][0]
    assert st["size"] == 5 and st["class_counts"] == {"0": 3, "1": 2} and list(st["arms"]) == ["set", "random"]
    assert st["arms"]["random"]["class_counts"] == {"0": 3, "1": 2} and "soft" not in st["arms"]["set"]
    # a selection made over another pool (another seed) is refused
    with pytest.raises(PotstillError, match="set 'sel'.*other data"):
        run_eval_data(load_eval_data_recipe({**data, "seed": 1}))


def test_read_set_rows_accepts_both_key_spellings(tmp_path):
    rows = [Example('a "quoted" ünïcode line', 1), Example("b", 0)]
    assert read_set_rows(write_rows(tmp_path / "a.jsonl", rows)) == rows
    assert read_set_rows(write_rows(tmp_path / "b.jsonl", rows, key=("text", "labels"))) == rows


# ------------------------------------------------------------------------------- errors


def _bad_sets(tmp: Path, pool: list[Example]) -> dict:
    ok = [e for e in pool if e.label == 0][:2] + [e for e in pool if e.label == 1][:2]
    write_rows(tmp / "empty.jsonl", [])
    (tmp / "emptydir").mkdir()
    write_rows(tmp / "label7.jsonl", ok + [Example("good movie", 7)])
    write_rows(tmp / "big.jsonl", [Example("x", i % 2) for i in range(81)])
    write_rows(tmp / "lopsided.jsonl", [Example("x", 0)] * 60 + [Example("y", 1)])
    (tmp / "badrow.jsonl").write_text('{"sentence": "x", "label": "positive"}\n')
    write_rows(tmp / "uneven" / "set_0.json", ok)
    write_rows(tmp / "uneven" / "set_1.json", ok[:3])
    sel = selection_for_pool(pool, [0, 1])
    sel["example_ids"].append(500)
    (tmp / "outside.json").write_text(json.dumps(sel))
    return {
        "missing": ({"path": str(tmp / "nope.jsonl"), "format": "jsonl"}, "does not exist"),
        "empty set": ({"path": str(tmp / "empty.jsonl"), "format": "jsonl"}, "holds no examples"),
        "empty dir": ({"path": str(tmp / "emptydir"), "format": "dilm"}, "holds no examples"),
        "unknown label": ({"path": str(tmp / "label7.jsonl"), "format": "jsonl"}, "label 7, which the pool does not"),
        "larger than pool": (
            {"path": str(tmp / "big.jsonl"), "format": "jsonl"},
            "81 examples, more than the pool's 80",
        ),
        "class beyond pool": ({"path": str(tmp / "lopsided.jsonl"), "format": "jsonl"}, "60 examples of label 0"),
        "bad row": ({"path": str(tmp / "badrow.jsonl"), "format": "jsonl"}, "badrow.jsonl:1: not a set row"),
        "uneven replicas": ({"path": str(tmp / "uneven"), "format": "dilm"}, "differ in class counts"),
        "ids outside pool": ({"path": str(tmp / "outside.json"), "format": "selection"}, "not in the pool"),
        "jsonl dir": ({"path": str(tmp / "emptydir"), "format": "jsonl"}, "is a directory"),
    }


def test_bad_sets_fail_fast_with_one_line(tmp_path, toy):
    data = recipe_dict(tmp_path / "out", [])
    cases = _bad_sets(tmp_path, pool_of(data))
    for case, (entry, needle) in cases.items():
        bad = {**data, "sets": [{"name": "s", **entry}]}
        with pytest.raises(PotstillError) as err:
            run_eval_data(load_eval_data_recipe(bad))
        msg = str(err.value)
        assert needle in msg and "\n" not in msg, (case, msg)
    assert toy == []  # every problem was found before the encoder was loaded
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"baselines": ["random", "coreset"]}, "'baselines.1'"),
        ({"baselines": ["k_center"]}, "must include random"),
        ({"baselines": ["random", "random"]}, "listed twice"),
        ({"labels": ["kd"]}, "'labels.0'"),
        ({"sets": []}, "'sets'"),
        ({"sets": [{"name": "a", "path": "p", "format": "csv"}]}, "'sets.0.format'"),
        ({"sets": [{"name": "a", "path": "p", "format": "jsonl"}] * 2}, "'a' is listed twice"),
        (
            {"sets": [{"name": "a", "path": "p", "format": "jsonl", "construction_seconds": -1}]},
            "'sets.0.construction_seconds'",
        ),
        ({"setz": 1}, "'setz' is not a known option"),
    ],
)
def test_recipe_errors_name_the_key(change, needle):
    data = {"dataset": "sst2", "sets": [{"name": "a", "path": "p", "format": "jsonl"}], **change}
    with pytest.raises(PotstillError) as err:
        load_eval_data_recipe(data)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_shipped_recipe_and_overrides():
    r = load_eval_data_recipe(RECIPES / "eval_data_sst2.yaml")
    assert r.dataset == "sst2" and r.labels == ["hard", "soft"] and r.baselines == ["random", "k_center"]
    assert r.learner.seeds == 3 and [(s.format, s.path) for s in r.sets] == [("dilm", "$POTSTILL_DATA/dilm_sst2/dpc_5")]
    r = load_eval_data_recipe(RECIPES / "eval_data_sst2.yaml", ["learner.steps=5", "baselines=[random, herding]"])
    assert r.learner.steps == 5 and r.baselines == ["random", "herding"]
    with pytest.raises(PotstillError, match="'sets' is a list"):
        load_eval_data_recipe(RECIPES / "eval_data_sst2.yaml", ["sets.0.path=x"])
    with pytest.raises(PotstillError, match="sets"):
        load_eval_data_recipe({"dataset": "sst2"})


# ------------------------------------------------------------------------------- CLI


def test_cli_verb_end_to_end(tmp_path, toy, capsys, monkeypatch):
    import yaml

    import potstill.io

    written = []
    real = potstill.io.atomic_write_json

    def spy(path, obj, **kw):
        written.append(Path(path))
        return real(path, obj, **kw)

    monkeypatch.setattr(ed, "atomic_write_json", spy)
    write_rows(tmp_path / "good.jsonl", informative(6, 1))
    p = tmp_path / "r.yaml"
    p.write_text(
        yaml.safe_dump(
            recipe_dict(tmp_path / "out", [{"name": "good", "path": str(tmp_path / "good.jsonl"), "format": "jsonl"}])
        )
    )
    assert main(["eval-data", str(p), "learner.seeds=2", "labels=[hard]"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[0].startswith("eval-data: good (n=6, 1x2): hard ")
        and out[-1] == f"eval-data: results in {tmp_path / 'out'}"
    )
    report = json.loads((tmp_path / "out" / "eval_data.json").read_text())
    assert written == [tmp_path / "out" / "eval_data.json"]  # through the atomic writer
    assert report["protocol"]["seeds"] == [0, 1] and report["labels"] == ["hard"]
    assert summary_line(report) == out[0]
    # a bad set: one line on stderr, exit 2
    assert main(["eval-data", str(p), "sets=[{name: x, path: " + str(tmp_path / "no.jsonl") + ", format: jsonl}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: set 'x'") and "does not exist" in err[0]
