"""Data valuation (potstill.dd.valuation) and the ``knn_shapley`` / ``tmc_shapley`` select scorers.

References are written here from the definitions, in float64, never by calling the production maths:
the K-NN utility of Jia et al. 2019 (Sec. 3: ``U(S) = 1/K sum_{k <= min(K,|S|)} 1[y_{alpha_k(S)} = y_test]``)
and the Shapley value itself, by enumerating permutations (N = 5) or subsets (N = 7)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import dd_bert, dd_tokenizer, dd_toy_examples

import potstill.runners.common as cr
from potstill.cli import main
from potstill.dd.selection_io import SELECTION
from potstill.dd.valuation import NearestCentroidUtility, knn_shapley, lowest, per_class_top, tmc_shapley
from potstill.errors import PotstillError
from potstill.recipes.select import load_cls_select_recipe
from potstill.runners.select import run_select

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ independent references


def knn_utility(subset, x, y, tx, ty, k: int) -> float:
    """Mean over test points of the fraction of the K nearest (ties: lower index) with the test label."""
    if not subset:
        return 0.0
    total = 0.0
    for j in range(len(tx)):
        near = sorted(subset, key=lambda i: (math.dist(x[i].tolist(), tx[j].tolist()), i))[:k]
        total += sum(1.0 for i in near if int(y[i]) == int(ty[j])) / k
    return total / len(tx)


def shapley_by_permutations(n: int, u) -> list[float]:
    vals = [0.0] * n
    for perm in itertools.permutations(range(n)):
        before = []
        for i in perm:
            vals[i] += u(before + [i]) - u(before)
            before = before + [i]
    return [v / math.factorial(n) for v in vals]


def shapley_by_subsets(n: int, u) -> list[float]:
    """``phi_i = sum_{S not containing i} |S|! (n - |S| - 1)! / n! (U(S + i) - U(S))``."""
    cache = {}

    def uu(s):
        key = tuple(sorted(s))
        if key not in cache:
            cache[key] = u(list(key))
        return cache[key]

    vals = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        phi = 0.0
        for r in range(n):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            phi += sum(w * (uu(list(s) + [i]) - uu(list(s))) for s in itertools.combinations(others, r))
        vals.append(phi)
    return vals


def toy(n: int, m: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    tx = torch.randn(m, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g), tx, torch.randint(0, classes, (m,), generator=g)


# ------------------------------------------------------------------ KNN-Shapley


@pytest.mark.parametrize("n,exact", [(5, shapley_by_permutations), (7, shapley_by_subsets)])
@pytest.mark.parametrize("k", [1, 2, 3, 6, 9])
def test_knn_shapley_equals_brute_force_shapley(n, exact, k):
    x, y, tx, ty = toy(n, 3, 3 if k % 2 else 2, seed=10 * n + k)
    ref = exact(n, lambda s: knn_utility(s, x, y, tx, ty, k))
    got = knn_shapley(x, y, tx, ty, k)
    assert got.dtype == torch.float64 and got.shape == (n,)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
    # efficiency: the values share out U(all) - U(empty), U(empty) = 0 (K > N included: k = 9)
    assert float(got.sum()) == pytest.approx(knn_utility(list(range(n)), x, y, tx, ty, k), abs=1e-12)


def test_knn_shapley_by_hand():
    # one test point at 0; training points at distances 1, 2, 3 with labels matching, not, matching; K = 1:
    # s3 = 1/3, s2 = 1/3 + (0 - 1) * 1/2 = -1/6, s1 = -1/6 + (1 - 0) * 1 = 5/6 (sum 1 = U(all))
    x = torch.tensor([[3.0], [1.0], [2.0]], dtype=torch.float64)
    got = knn_shapley(x, torch.tensor([1, 1, 0]), torch.zeros(1, 1), torch.tensor([1]), 1)
    torch.testing.assert_close(got, torch.tensor([1 / 3, 5 / 6, -1 / 6], dtype=torch.float64), rtol=0, atol=1e-15)


def separable(n_per: int, flips: int, seed: int):
    """Two well-separated blobs (centres +-4 on the first axis); the first ``flips`` of each blob mislabelled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n_per, 4, generator=g, dtype=torch.float64)
    y = torch.cat([torch.zeros(n_per), torch.ones(n_per)]).long()
    x[:, 0] += torch.where(y == 0, -4.0, 4.0)
    bad = torch.cat([torch.arange(flips), n_per + torch.arange(flips)])
    noisy = y.clone()
    noisy[bad] = 1 - noisy[bad]
    vx = torch.randn(40, 4, generator=g, dtype=torch.float64)
    vy = torch.arange(40) % 2
    vx[:, 0] += torch.where(vy == 0, -4.0, 4.0)
    return x, noisy, vx, vy, set(bad.tolist())


def test_planted_flips_get_the_lowest_values():
    x, y, vx, vy, bad = separable(30, 3, seed=0)
    knn = knn_shapley(x, y, vx, vy, 5)
    assert set(lowest(knn, len(bad) / len(y)).tolist()) == bad
    assert float(knn.sum()) > 0.9  # efficiency: U(all) of a 5-NN on well separated blobs is near 1
    tmc, info = tmc_shapley(NearestCentroidUtility(x, y, vx, vy), permutations=300, tolerance=0.0, seed=0)
    assert set(lowest(tmc, len(bad) / len(y)).tolist()) == bad and info["permutations"] == 300


def test_per_class_top_and_lowest_by_hand():
    v = torch.tensor([0.5, -1.0, 2.0, 2.0, 0.0, 3.0])
    lab = torch.tensor([0, 0, 0, 1, 1, 1])
    assert per_class_top(v, lab, {0: 2, 1: 1}).tolist() == [2, 0, 5]
    assert lowest(v, 0.5).tolist() == [1, 4, 0] and lowest(torch.tensor([1.0, 1.0]), 0.5).tolist() == [0]


# ------------------------------------------------------------------ TMC-Shapley


class KnnUtility:
    """The K-NN utility of Jia et al. as an incremental :class:`~potstill.dd.valuation.Utility`: each test
    point's training ranks are sorted once, so an ``add`` only walks the members."""

    def __init__(self, x, y, tx, ty, k):
        self.n, self.k, self.calls = len(y), k, 0
        self.rank = [
            {i: r for r, i in enumerate(sorted(range(len(y)), key=lambda i: (math.dist(x[i].tolist(), t.tolist()), i)))}
            for t in tx
        ]
        self.match = [[int(y[i]) == int(label) for i in range(len(y))] for label in ty]

    def utility(self, members) -> float:
        total = 0.0
        for rank, match in zip(self.rank, self.match):
            near = sorted(members, key=rank.__getitem__)[: self.k]
            total += sum(match[i] for i in near) / self.k
        return total / len(self.rank)

    def empty(self):
        return 0.0

    def full(self):
        return self.utility(range(self.n))

    def start(self):
        self.members = []

    def add(self, i):
        self.calls += 1
        self.members.append(i)
        return self.utility(self.members)


def test_tmc_shapley_converges_to_exact_shapley():
    x, y, tx, ty = toy(5, 2, 2, seed=3)
    exact = torch.tensor(shapley_by_permutations(5, lambda s: knn_utility(s, x, y, tx, ty, 2)), dtype=torch.float64)
    util = KnnUtility(x, y, tx, ty, 2)
    assert util.full() == pytest.approx(knn_utility(list(range(5)), x, y, tx, ty, 2), abs=1e-15)
    est, info = tmc_shapley(util, permutations=4000, tolerance=0.0, seed=1)
    # marginals lie in [-1, 1]: Hoeffding gives P(|err| > 0.06) <= 2 exp(-4000 * 0.06^2 / 2) < 0.2 % per value
    assert float((est - exact).abs().max()) < 0.06
    # tolerance 0 never truncates, so each permutation shares out exactly U(all) - U(empty)
    assert float(est.sum()) == pytest.approx(util.full(), abs=1e-12)
    assert info["evaluations"] == util.calls == 4000 * 5 and not info["converged"]


def test_tmc_truncation_skips_a_saturated_tail_and_stays_exact():
    class FirstTwo:  # U(S) = min(|S|, 2) / 2: symmetric, so every Shapley value is 1/n
        n = 6

        def empty(self):
            return 0.0

        def full(self):
            return 1.0

        def start(self):
            self.size = 0

        def add(self, i):
            self.size += 1
            return min(self.size, 2) / 2

    est, info = tmc_shapley(FirstTwo(), permutations=3000, tolerance=0.01, seed=0)
    assert info["evaluations"] == 2 * 3000  # truncated after the second point of every permutation
    assert float((est - 1 / 6).abs().max()) < 0.04  # Hoeffding, marginals in [0, 1/2]
    _, stopped = tmc_shapley(FirstTwo(), permutations=5000, tolerance=0.01, convergence=0.05, window=100, seed=0)
    assert stopped["converged"] and stopped["permutations"] < 5000


def test_nearest_centroid_utility_against_direct_accuracy():
    x, y, vx, vy = toy(8, 10, 3, seed=4)
    util = NearestCentroidUtility(x, y, vx, vy, num_classes=3)

    def direct(members):
        cents = {c: x[[i for i in members if int(y[i]) == c]].mean(0) for c in {int(y[i]) for i in members}}
        pred = [min(sorted(cents), key=lambda c: float(((v - cents[c]) ** 2).sum())) for v in vx]
        return sum(int(p == int(t)) for p, t in zip(pred, vy)) / len(vy)

    assert util.empty() == pytest.approx(1 / 3)
    assert util.full() == pytest.approx(direct(list(range(8))), abs=1e-12)
    util.start()
    order = [5, 2, 7, 0, 1, 3, 6, 4]
    for j, i in enumerate(order):
        assert util.add(i) == pytest.approx(direct(order[: j + 1]), abs=1e-12)


def test_tmc_refuses_a_large_pool_in_one_line():
    x, y, vx, vy = toy(12, 3, 2, seed=0)
    with pytest.raises(PotstillError, match="max_pool=10") as err:
        tmc_shapley(NearestCentroidUtility(x, y, vx, vy), max_pool=10)
    assert "\n" not in str(err.value) and "knn_shapley" in str(err.value)


# ------------------------------------------------------------------ the select recipe, end to end


@pytest.fixture
def dd_toy(monkeypatch):
    tok = dd_tokenizer()
    monkeypatch.setattr(cr, "load_encoder", lambda name: (dd_bert(tok, seed=1), tok))
    monkeypatch.setattr(
        cr,
        "load_sst2",
        lambda split="train", path=None: dd_toy_examples(200, 0) if split == "train" else dd_toy_examples(60, 1),
    )


def recipe(out: Path, scorer: str, **valuation) -> dict:
    return {
        "kind": "classification",
        "dataset": "sst2",
        "output_dir": str(out),
        "seed": 0,
        "data": {"pool_size": 200, "eval_size": 60},
        "learner": {"encoder": "tiny", "max_length": 16, "lr": 5e-2},
        "select": {
            "per_class": 5,
            "scorer": scorer,
            "teacher_confident": None,
            "valuation": {"val_size": 50, **valuation},
        },
    }


def full_utility(scorer: str, emb, labels, train: list[int], val: list[int]) -> float:
    """``U(valued rows) - U(empty)``, what the values must add up to (efficiency), from the definitions:
    5-NN label agreement (Jia et al.) or nearest-centroid validation accuracy minus chance (1/2)."""
    x, vx = emb[train].double(), emb[val].double()
    y, vy = labels[train], labels[val]
    d = torch.cdist(vx, x)
    if scorer == "knn_shapley":
        near = torch.sort(d, dim=1, stable=True).indices[:, :5]
        return float((y[near] == vy[:, None]).double().mean())
    cents = torch.stack([x[y == c].mean(0) for c in (0, 1)])
    return float((torch.cdist(vx, cents).argmin(1) == vy).double().mean()) - 0.5


@pytest.mark.parametrize("scorer", ["knn_shapley", "tmc_shapley"])
def test_select_recipe_runs_end_to_end(dd_toy, tmp_path, scorer):
    # tolerance 0: no truncation, so the TMC values add up to U(all) - U(empty) exactly, as K-NN's do
    extra = {"permutations": 30, "tolerance": 0.0, "convergence": None} if scorer == "tmc_shapley" else {"k": 5}
    r = load_cls_select_recipe(recipe(tmp_path / "o", scorer, **extra))
    rep = run_select(r)
    pool = cr.load_pool(r)[0]
    rows = rep["examples"]
    val = [x["example_id"] for x in rows if x["reason_key"] == "valuation set, held out"]
    assert len(val) == 50 and all(x["value"] is None and not x["kept"] for x in rows if x["example_id"] in val)
    valued = {x["example_id"]: x["value"] for x in rows if x["value"] is not None}
    train = sorted(valued)
    assert len(valued) == 150 and rep["kept"] == 10 and rep["class_counts"] == {"0": 5, "1": 5}
    # the values are Shapley values of the learner's coreset space against the held-out rows: they add up
    _, feats_of = cr.build_learner(r, num_labels=2)
    emb = cr.coreset_space(feats_of(pool))
    labels = torch.tensor([e.label for e in pool])
    total = full_utility(scorer, emb, labels, train, sorted(val))
    assert math.fsum(valued.values()) == pytest.approx(total, abs=1e-9)
    # the picks are the highest values of each class; the suspects the lowest 10 % of the valued rows
    ids = json.loads((tmp_path / "o" / SELECTION).read_text())["example_ids"]
    best = per_class_top([valued[i] for i in train], labels[train], {0: 5, 1: 5})
    assert ids == sorted(train[j] for j in best.tolist())
    assert rep["suspects"] == sorted(train, key=lambda i: (valued[i], i))[:15]
    assert rep["valuation"]["method"].startswith(scorer) and rep["dropped"]["budget cut"] == 140


def test_recipe_errors_are_one_line(dd_toy, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(tmp_path / "o", "tmc_shapley", max_pool=100)))
    cases = {
        "": "max_pool=100",
        "select.scorer=herding": "select.valuation applies to scorers knn_shapley, tmc_shapley",
        "select.valuation.val_size=200": "val_size=200 leaves no pool examples",
        "select.valuation.k=0": "select.valuation.k",
    }
    for override, needle in cases.items():
        assert main(["select", str(path), *([override] if override else [])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
