"""Verdicts between arms (potstill.eval.verdict): Holm by hand, the crossed bootstrap's draws, no difference for
identical arms, better / worse for a planted gap, no verdict from one seed, and the interval's coverage of a known
difference in a seeded simulation of seeds x shared held-out examples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import t as student_t

from potstill.errors import PotstillError
from potstill.eval.verdict import (
    NOT_FINITE,
    ONE_SEED,
    compare_arms,
    crossed_bootstrap,
    holm,
    satterthwaite_df,
    set_verdicts,
)


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_crossed_bootstrap_shares_the_example_draw_across_seeds():
    """With a difference that depends on the example only, every resample is the mean over one example draw:
    the same value whichever seeds are drawn, so the draws equal those of the examples alone."""
    x = np.arange(6, dtype=float)
    diff = np.tile(x, (4, 1))  # [S=4, E=6], identical rows
    boot = crossed_bootstrap(diff, np.zeros_like(diff), n_boot=50, rng=np.random.default_rng(3))
    gen = np.random.default_rng(3)
    gen.integers(0, 4, size=(50, 4))  # the seeds' draw comes first
    examples = gen.integers(0, 6, size=(50, 6))
    np.testing.assert_allclose(boot, x[examples].mean(axis=1))


def _arms(gap: float, seeds: int, rng: np.random.Generator, examples: int = 40) -> dict[str, np.ndarray]:
    base = rng.normal(5.0, 1.0, size=(seeds, examples)) + rng.normal(0, 0.3, size=(1, examples))
    arm = base + gap + rng.normal(0, 0.05, size=(seeds, 1)) + rng.normal(0, 0.1, size=(seeds, examples))
    return {"kd": base, "new": arm}


def test_identical_arms_are_no_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 30))
    (c,) = compare_arms({"fkl": {"kd": base, "same": base.copy()}}, "kd", lower_better={"fkl": True})
    assert c.verdict == "no difference" and c.difference == 0.0 and c.p == 1.0 and c.low == c.high == 0.0


@pytest.mark.parametrize(("lower_better", "want"), [(True, "better"), (False, "worse")])
def test_a_planted_gap_gets_its_direction(lower_better, want):
    arms = _arms(-0.5, 3, np.random.default_rng(1))
    (c,) = compare_arms({"m": arms}, "kd", lower_better={"m": lower_better})
    assert c.verdict == want
    assert c.low < -0.5 < c.high and c.p_holm < 0.05
    assert len(c.per_seed) == 3


def test_a_gap_within_the_noise_is_no_difference_and_holm_counts_every_comparison():
    rng = np.random.default_rng(2)
    arms = _arms(0.0, 3, rng)
    arms["big"] = arms["kd"] - 0.5 + rng.normal(0, 0.05, size=(3, 1))
    rows = {c.arm: c for c in compare_arms({"m": arms}, "kd", lower_better={"m": True})}
    assert rows["new"].verdict == "no difference" and rows["big"].verdict == "better"
    # Holm over the two: the smaller p doubled, the larger one kept but never below that
    assert rows["big"].p_holm == pytest.approx(min(1.0, 2 * rows["big"].p))
    assert rows["new"].p_holm == pytest.approx(max(rows["new"].p, rows["big"].p_holm))


def test_pairs_compare_an_arm_with_several_references_under_one_holm():
    """``pairs``: a method against two baselines and a baseline against another. Each row's estimate is the
    paired mean difference with its own reference; Holm runs over the three rows together."""
    rng = np.random.default_rng(4)
    arms = _arms(0.0, 4, rng)  # kd, new: no gap
    arms["method"] = arms["kd"] - 0.5 + rng.normal(0, 0.05, size=(4, 1))  # 0.5 below kd, about 0.5 below new
    pairs = [("method", "kd"), ("method", "new"), ("new", "kd")]
    rows = compare_arms({"m": arms}, "unused", lower_better={"m": True}, pairs=pairs)
    assert [(c.arm, c.baseline) for c in rows] == pairs
    for c in rows:
        want = (arms[c.arm] - arms[c.baseline]).mean()
        assert c.difference == pytest.approx(want)
    assert [c.verdict for c in rows] == ["better", "better", "no difference"]
    assert [c.p_holm for c in rows] == pytest.approx(holm([c.p for c in rows]))
    with pytest.raises(PotstillError, match="'other'"):
        compare_arms({"m": arms}, "kd", lower_better={"m": True}, pairs=[("method", "other")])


def test_one_seed_gives_no_verdict():
    arms = _arms(-2.0, 1, np.random.default_rng(3))
    (c,) = compare_arms({"m": arms}, "kd", lower_better={"m": True})
    assert c.verdict == ONE_SEED and c.seeds == 1


def test_bad_input_is_refused_in_one_line():
    good = np.zeros((2, 3))
    with pytest.raises(PotstillError, match="seeds, examples"):
        compare_arms({"m": {"kd": good, "x": np.zeros((2, 4))}}, "kd", lower_better={"m": True})
    with pytest.raises(PotstillError, match="not finite"):
        compare_arms({"m": {"kd": good, "x": np.full((2, 3), np.nan)}}, "kd", lower_better={"m": True})
    with pytest.raises(PotstillError, match="no direction"):
        compare_arms({"m": {"kd": good, "x": good}}, "kd", lower_better={})
    with pytest.raises(PotstillError, match="baseline"):
        compare_arms({"m": {"x": good}}, "kd", lower_better={"m": True})


@pytest.mark.parametrize("df", ["seeds", "satterthwaite"])
@pytest.mark.parametrize(
    ("seeds", "sd_seed", "sd_example"),
    [
        (3, 0.3, 0.3),
        (5, 0.0, 0.5),
        (5, 0.5, 0.0),
        (10, 0.3, 0.3),
        (10, 0.0, 0.5),
        (3, 0.0, 0.5),
        (2, 0.5, 0.0),
        (2, 0.0, 0.5),
        (3, 0.0, 0.0),
    ],
    ids=[
        "3 seeds",
        "examples dominate",
        "seeds dominate",
        "10 seeds",
        "10 seeds, examples dominate",
        "3 seeds, examples dominate",
        "2 seeds, seeds dominate",
        "2 seeds, examples dominate",
        "3 seeds, noise alone",
    ],
)
def test_interval_covers_a_known_difference_at_the_stated_level(seeds, sd_seed, sd_example, df):
    """d[s, e] = 0.2 + seed effect + shared example effect + noise; the 90 % interval must contain 0.2 in at
    least 90 % of 200 seeded replications, up to 2.5 binomial standard errors (0.053), under either rule for
    the degrees of freedom."""
    rng = np.random.default_rng(seeds * 100 + int(10 * sd_seed) + int(100 * sd_example))
    covered, reps, level = 0, 200, 0.9
    for _ in range(reps):
        diff = (
            0.2
            + rng.normal(0, sd_seed, size=(seeds, 1))
            + rng.normal(0, sd_example, size=(1, 40))
            + rng.normal(0, 0.5, size=(seeds, 40))
        )
        (c,) = compare_arms(
            {"m": {"kd": np.zeros_like(diff), "x": diff}},
            "kd",
            lower_better={"m": True},
            level=level,
            n_boot=300,
            df=df,
        )
        covered += c.low <= 0.2 <= c.high
    assert covered / reps >= level - 2.5 * np.sqrt(level * (1 - level) / reps)


def _mean_squares_by_loops(d: np.ndarray) -> tuple[float, float, float]:
    """MS_seeds, MS_examples, MS_interaction of a two-way table without replication, written out cell by cell."""
    s, e = d.shape
    grand = sum(d[i, j] for i in range(s) for j in range(e)) / (s * e)
    row = [sum(d[i, j] for j in range(e)) / e for i in range(s)]
    col = [sum(d[i, j] for i in range(s)) / s for j in range(e)]
    ss_s = e * sum((row[i] - grand) ** 2 for i in range(s))
    ss_e = s * sum((col[j] - grand) ** 2 for j in range(e))
    ss_r = sum((d[i, j] - row[i] - col[j] + grand) ** 2 for i in range(s) for j in range(e))
    return ss_s / (s - 1), ss_e / (e - 1), ss_r / ((s - 1) * (e - 1))


def test_satterthwaite_df_closed_forms():
    rng = np.random.default_rng(5)
    seed_effect, example_effect = rng.normal(size=(3, 1)), rng.normal(size=(1, 12))
    # one factor alone: its own degrees of freedom
    assert satterthwaite_df(np.tile(seed_effect, (1, 12))) == pytest.approx(2.0)
    assert satterthwaite_df(np.tile(example_effect, (3, 1))) == pytest.approx(11.0)
    # both and noise: Satterthwaite's formula over the mean squares of the table
    d = seed_effect + example_effect + rng.normal(0, 0.3, size=(3, 12))
    ms_s, ms_e, ms_r = _mean_squares_by_loops(d)
    want = (ms_s + ms_e - ms_r) ** 2 / (ms_s**2 / 2 + ms_e**2 / 11 + ms_r**2 / 22)
    assert satterthwaite_df(d) == pytest.approx(want)
    assert 2.0 < satterthwaite_df(d) < 11.0
    # a combination <= 0 (an interaction larger than both effects): the interaction's term is left out, never a
    # negative variance; with no example effect left, the seeds' degrees of freedom remain
    r, c = np.array([1.0, -2.0, 1.0]), np.tile([1.0, -1.0], 6)
    table = 0.01 * seed_effect + np.outer(r, c)  # every column mean constant, every row mean the seed effect's
    ms_s, ms_e, ms_r = _mean_squares_by_loops(table)
    assert ms_e == pytest.approx(0.0, abs=1e-20) and ms_s + ms_e - ms_r < 0
    assert satterthwaite_df(table) == pytest.approx(2.0)
    assert satterthwaite_df(np.zeros((4, 5))) == 3.0  # nothing varies: S - 1
    assert satterthwaite_df(rng.normal(size=(3, 1))) == 2.0  # one example: the seeds only
    with pytest.raises(PotstillError, match="two seeds"):
        satterthwaite_df(np.zeros((1, 5)))


def test_satterthwaite_decides_a_gap_the_seeds_rule_cannot_when_examples_dominate():
    """3 seeds that agree closely, 40 examples that vary a lot: t with 2 degrees of freedom (4.30 at 95 %) leaves
    the gap undecided; the crossed design's degrees of freedom (tens) decide it, with the same standard error."""
    rng = np.random.default_rng(6)
    base = rng.normal(5.0, 1.0, size=(3, 40))
    arm = base - 0.3 + rng.normal(0, 0.02, size=(3, 1)) + rng.normal(0, 0.6, size=(1, 40))
    rows = {
        rule: compare_arms({"m": {"kd": base, "x": arm}}, "kd", lower_better={"m": True}, df=rule)[0]
        for rule in ("seeds", "satterthwaite")
    }
    assert rows["seeds"].df == 2.0 and rows["satterthwaite"].df > 10
    assert rows["seeds"].verdict == "no difference" and rows["satterthwaite"].verdict == "better"
    se = [(r.high - r.low) / (2 * student_t.ppf(0.975, r.df)) for r in rows.values()]
    assert se[0] == pytest.approx(se[1])
    with pytest.raises(PotstillError, match="df="):
        compare_arms({"m": {"kd": base, "x": arm}}, "kd", lower_better={"m": True}, df="welch")


def test_set_verdicts_count_shared_baselines_once_and_leave_non_finite_scores_out():
    """Two sets sharing their baseline subsets (one group) and a third of its own: each set is judged against
    both baselines, k_center against random once per group. An example whose score is nan in one arm is left
    out of that comparison (the row equals compare_arms on the other examples); a comparison with no finite
    example gets NOT_FINITE and is not counted in Holm."""
    rng = np.random.default_rng(7)

    def arms(gap: float) -> dict[str, np.ndarray]:
        base = rng.normal(size=(3, 20))
        return {"random": base, "k_center": base - 0.1, "set": base - gap + rng.normal(0, 0.05, size=(3, 20))}

    a, b, c = arms(1.0), arms(0.0), arms(0.5)
    a["set"][1, 4] = np.nan  # one example of one seed of one arm
    c_bad = {k: np.full_like(v, np.nan) if k == "set" else v for k, v in c.items()}
    sets = [
        ("a", "g1", {"hard": {"m": a}}),
        ("b", "g1", {"hard": {"m": b}}),
        ("c", "g2", {"hard": {"m": c, "bad": c_bad}}),
    ]
    rows, base = set_verdicts(sets, ["random", "k_center"], {"m": True, "bad": True})
    assert [len(r) for r in rows] == [2, 2, 4] and len(base) == 3  # g1: m; g2: m and bad (k_center vs random)
    assert {(r["group"], r["metric"]) for r in base} == {("g1", "m"), ("g2", "m"), ("g2", "bad")}
    counted = [r for r in rows[0] + rows[1] + rows[2] + base if r["verdict"] != NOT_FINITE]
    assert len(counted) == 9  # 8 set rows less the two "bad" ones (no finite example), and the 3 baseline rows
    assert [r["p_holm"] for r in counted] == pytest.approx(holm([r["p"] for r in counted]))
    row = next(r for r in rows[0] if r["baseline"] == "random")
    keep = np.isfinite(a["set"]).all(axis=0)
    (alone,) = compare_arms({"m": {"r": a["random"][:, keep], "s": a["set"][:, keep]}}, "r", lower_better={"m": True})
    assert row["examples"] == 19 and row["difference"] == pytest.approx(alone.difference)
    assert row["verdict"] == "better" and row["facet"] == "hard"
    assert {r["verdict"] for r in rows[2] if r["metric"] == "bad"} == {NOT_FINITE}
