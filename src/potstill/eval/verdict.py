"""Verdicts between training arms that users can trust: a paired difference per metric with a confidence interval
from a bootstrap over seeds and held-out examples, Holm-corrected across every comparison, and *better / worse /
no difference* at the stated level.

Data: for one metric, ``scores[arm]`` is ``[S, E]``, the per-example score of each of ``S`` training seeds on the
same ``E`` held-out examples (e.g. each example's forward KL per token). An arm is compared with the baseline
*paired*: seed ``s`` of both arms saw the same data order, and example ``e`` is the same example. The estimate is
``d = mean_s mean_e (a[s, e] - b[s, e])``.

Two sources of uncertainty are in a comparison of training methods: the seed (which run you got) and the
example (which held-out set was drawn). Every seed is scored on the *same* held-out examples, so the two are
crossed, not nested: an example that favours one arm does so under every seed. The bootstrap therefore draws
seeds with replacement and one set of example indices (with replacement) that serves every drawn seed and both
arms (the pigeonhole bootstrap of a crossed design, Owen 2007, *Ann. Appl. Stat.* 1(1)). Drawing examples
afresh within each seed (a nested bootstrap) would treat an example's shared effect as independent noise per
seed and understate the interval: with it, ``tests/eval/test_verdict.py``'s simulation covers a known
difference far below the level when 10 seeds share examples that dominate the spread.

With a handful of seeds a percentile interval is too narrow (the bootstrap variance of a mean of ``S`` draws
is ``(S - 1) / S`` of the truth and its tails are short), so the interval is ``d +- t_{S-1} * se`` with ``se``
the bootstrap standard deviation times ``sqrt(S / (S - 1))`` and ``t_{S-1}`` Student's quantile at the level,
and the p-value of "no difference" is the two-sided ``t_{S-1}`` tail of ``d / se``.

``t_{S-1}`` treats the seeds as the only source of error, which is right when they dominate and 4.3-fold wide at
3 seeds (95 %) when the held-out examples do. ``df="satterthwaite"`` (the default) takes the degrees of freedom
of the crossed design instead: with the two-way mean squares of ``diff = arm - base`` over seeds (``MS_S``,
``S - 1`` df), examples (``MS_E``, ``E - 1``) and their interaction (``MS_R``, ``(S - 1)(E - 1)``), the
variance of ``d`` is ``(MS_S + MS_E - MS_R) / (S E)`` and Satterthwaite's (1946, *Biometrics Bull.* 2) degrees
of freedom ``(MS_S + MS_E - MS_R)^2 / (MS_S^2 / (S-1) + MS_E^2 / (E-1) + MS_R^2 / ((S-1)(E-1)))``: about
``S - 1`` when the seeds dominate and more when the examples do. The interval keeps the bootstrap's ``se``
above, only its quantile changes; ``tests/eval/test_verdict.py``'s simulation checks the coverage of both
rules for 2, 3, 5 and 10 seeds with the seeds' effect, the examples' effect, both, or neither (noise alone)
behind the spread. ``df="seeds"`` is the rule of potstill's earlier verdicts.

Holm's step-down procedure
(Holm 1979, *Scand. J. Statist.* 6) adjusts the p-values of every (arm, reference, metric) comparison
together, so the family-wise error rate is at most ``1 - level``.

A single seed carries no seed spread: its verdict is ``"one seed: no verdict"``, whatever the examples say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import t as student_t

from ..errors import PotstillError

__all__ = [
    "DF_RULES",
    "NOT_FINITE",
    "ONE_SEED",
    "Comparison",
    "compare_arms",
    "crossed_bootstrap",
    "holm",
    "satterthwaite_df",
    "set_verdicts",
]

ONE_SEED = "one seed: no verdict"
NOT_FINITE = "no verdict: a score is not finite on every example"
DF_RULES = ("satterthwaite", "seeds")


def _pair(arm, base) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(arm, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or 0 in a.shape:
        raise PotstillError(f"arm and baseline scores must both be [seeds, examples]; got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise PotstillError("a per-example score is not finite; drop the metric or fix the run before comparing")
    return a, b


def crossed_bootstrap(
    arm: np.ndarray, base: np.ndarray, *, n_boot: int = 2000, rng: np.random.Generator | int = 0
) -> np.ndarray:
    """``n_boot`` resampled paired differences ``d*`` of ``arm`` and ``base`` (both ``[S, E]``): seeds drawn with
    replacement and one draw of example indices (with replacement) shared by every drawn seed and both arms."""
    a, b = _pair(arm, base)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    diff = a - b
    s, e = diff.shape
    seeds = gen.integers(0, s, size=(n_boot, s))  # [B, S]: the drawn seeds
    examples = gen.integers(0, e, size=(n_boot, e))  # [B, E]: the drawn examples, the same for every seed
    per_seed = np.stack([diff[seeds[i]][:, examples[i]].mean(axis=1) for i in range(n_boot)])  # [B, S]
    return per_seed.mean(axis=1)


def satterthwaite_df(diff: np.ndarray) -> float:
    """Degrees of freedom of the mean of ``diff [S, E]`` (seeds crossed with examples) by Satterthwaite's
    approximation over the two-way mean squares (module docstring). Where ``MS_S + MS_E - MS_R <= 0`` (no
    effect of either factor beyond the noise), the interaction's term is left out of the combination. At
    least 1; ``S - 1`` for a single example."""
    d = np.asarray(diff, dtype=np.float64)
    s, e = d.shape
    if s < 2:
        raise PotstillError("degrees of freedom need at least two seeds")
    if e < 2:
        return float(s - 1)
    grand, rows, cols = d.mean(), d.mean(axis=1), d.mean(axis=0)
    ms_s = e * float(((rows - grand) ** 2).sum()) / (s - 1)
    ms_e = s * float(((cols - grand) ** 2).sum()) / (e - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    ms_r = float((resid**2).sum()) / ((s - 1) * (e - 1))
    terms = [(ms_s, s - 1), (ms_e, e - 1), (-ms_r, (s - 1) * (e - 1))]
    total = ms_s + ms_e - ms_r
    if total <= 0:
        terms, total = terms[:2], ms_s + ms_e
    spread = sum(m * m / k for m, k in terms)
    if spread == 0.0:
        return float(s - 1)  # no variation at all: the seeds' count, as the other rule
    return max(1.0, total * total / spread)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: sorted ascending, ``p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``
    (1-based), returned in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.maximum.accumulate(adjusted)
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


@dataclass
class Comparison:
    """One arm against a baseline (``baseline``: its name) on one metric. ``difference`` = arm - baseline (mean over seeds and
    examples); ``low`` / ``high``: its ``level`` interval; ``p`` / ``p_holm``: raw and Holm-adjusted
    two-sided p-values; ``verdict``: better / worse / no difference (or :data:`ONE_SEED`)."""

    arm: str
    baseline: str
    metric: str
    difference: float
    low: float
    high: float
    p: float
    p_holm: float
    verdict: str
    seeds: int
    examples: int
    per_seed: list[float]
    df: float | None = None  # degrees of freedom of the interval and p-value (None: one seed)

    def as_dict(self) -> dict:
        return asdict(self)


def compare_arms(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    baseline: str,
    *,
    lower_better: Mapping[str, bool],
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    pairs: Sequence[tuple[str, str]] | None = None,
    df: str = "satterthwaite",
) -> list[Comparison]:
    """Every arm of ``scores`` (``metric -> arm -> [S, E]``) against ``baseline`` on every metric, Holm-corrected
    across all of those comparisons. ``lower_better[metric]`` says which direction is better. ``pairs``: the
    ``(arm, reference)`` comparisons to make instead (``baseline`` is then unused), e.g. a method against
    several baselines; Holm runs over all of them and every metric. ``df``: the degrees of freedom of each
    interval, ``"satterthwaite"`` (the crossed design's) or ``"seeds"`` (``S - 1``); module docstring."""
    if not 0.0 < level < 1.0:
        raise PotstillError(f"level={level} must be in (0, 1), e.g. 0.95")
    if df not in DF_RULES:
        raise PotstillError(f"df={df!r} is not one of {', '.join(DF_RULES)}")
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for metric, arms in scores.items():
        if metric not in lower_better:
            raise PotstillError(f"metric {metric!r} has no direction; say whether lower is better")
        if pairs is None:
            if baseline not in arms:
                raise PotstillError(f"metric {metric!r} has no baseline arm {baseline!r}; arms: {sorted(arms)}")
            todo = [(name, baseline) for name in arms if name != baseline]
        else:
            todo = list(pairs)
            missing = sorted({x for pair in todo for x in pair} - set(arms))
            if missing:
                raise PotstillError(f"metric {metric!r} has no arm {missing} that pairs name; arms: {sorted(arms)}")
        for name, ref in todo:
            a, b = _pair(arms[name], arms[ref])
            per_seed = (a - b).mean(axis=1)
            d, n_seeds = float(per_seed.mean()), a.shape[0]
            low = high = d
            p, dof = 1.0, None
            if n_seeds > 1:
                boot = crossed_bootstrap(a, b, n_boot=n_boot, rng=rng)
                se = float(boot.std(ddof=1)) * math.sqrt(n_seeds / (n_seeds - 1))
                dof = satterthwaite_df(a - b) if df == "satterthwaite" else float(n_seeds - 1)
                t = float(student_t.ppf((1 + level) / 2, dof))
                low, high = d - t * se, d + t * se
                p = float(2 * student_t.sf(abs(d) / se, dof)) if se > 0 else float(d == 0.0)
            rows.append(
                {
                    "arm": name,
                    "baseline": ref,
                    "metric": metric,
                    "difference": d,
                    "low": low,
                    "high": high,
                    "p": p,
                    "seeds": a.shape[0],
                    "examples": a.shape[1],
                    "per_seed": per_seed.tolist(),
                    "df": dof,
                }
            )
    adjusted = holm([r["p"] for r in rows]) if rows else []
    out = []
    for r, p_holm in zip(rows, adjusted, strict=True):
        if r["seeds"] < 2:
            verdict = ONE_SEED
        elif p_holm < 1 - level:
            verdict = "better" if (r["difference"] < 0) == lower_better[r["metric"]] else "worse"
        else:
            verdict = "no difference"
        out.append(Comparison(**r, p_holm=p_holm, verdict=verdict))
    return out


def set_verdicts(
    sets: Sequence[tuple[str, str, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]]],
    baselines: Sequence[str],
    lower_better: Mapping[str, bool],
    *,
    level: float = 0.95,
    df: str = "satterthwaite",
) -> tuple[list[list[dict]], list[dict]]:
    """Verdicts of a data-distillation protocol (``potstill eval-data``): each set against every baseline of
    its group, and every other baseline against ``random`` once per group, under one Holm family.

    ``sets``: ``(name, group, scores)`` per set, ``scores[facet][metric][arm]`` an ``[S, E]`` array with the
    arms ``"set"`` and every baseline (``facet``: a label kind or a training run). Sets of one ``group`` (the
    same size and balance) share their baseline subsets, so their baseline-vs-random rows are one comparison,
    counted once. A held-out example whose score is not finite in some arm is left out of that comparison;
    a comparison with no example left gets :data:`NOT_FINITE` and stays out of Holm. Returns each set's rows
    and the baseline rows (dicts of :class:`Comparison` plus ``facet`` and ``group``)."""
    pairs = [("set", b) for b in baselines]
    base_pairs = [(b, "random") for b in baselines if b != "random"]
    flat: dict[str, tuple[int | None, dict]] = {}  # one key per comparison: (owner, its description)
    scores_all: dict[str, dict[str, np.ndarray]] = {}
    skipped: list[tuple[int | None, dict]] = []
    seen_groups: set[str] = set()
    for i, (_name, group, scores) in enumerate(sets):
        jobs = [(i, pairs)] + ([(None, base_pairs)] if group not in seen_groups else [])
        seen_groups.add(group)
        for owner, todo in jobs:
            for facet, metrics in scores.items():
                for metric, arms in metrics.items():
                    for arm, ref in todo:
                        a, b = np.asarray(arms[arm], dtype=np.float64), np.asarray(arms[ref], dtype=np.float64)
                        keep = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
                        info = {"arm": arm, "baseline": ref, "metric": metric, "facet": facet, "group": group}
                        if not keep.any():
                            skipped.append((owner, {**info, "verdict": NOT_FINITE}))
                            continue
                        key = str(len(flat))
                        flat[key] = (owner, info)
                        scores_all[key] = {"a": a[:, keep], "b": b[:, keep]}
    lower_all = {key: lower_better[info["metric"]] for key, (_, info) in flat.items()}
    rows = compare_arms(scores_all, "b", lower_better=lower_all, level=level, df=df) if flat else []
    rows_by_set: list[list[dict]] = [[] for _ in sets]
    base_rows: list[dict] = []
    for c in rows:
        owner, info = flat[c.metric]
        (base_rows if owner is None else rows_by_set[owner]).append({**c.as_dict(), **info})
    for owner, row in skipped:
        (base_rows if owner is None else rows_by_set[owner]).append(row)
    return rows_by_set, base_rows
