"""``potstill eval-data RECIPE.yaml``: judge distilled or selected training sets against real subsets.

The evaluation protocol of the issue (DiLM, Maekawa et al. 2024, Sec. 5; Wang et al. 2018): every
set in ``sets`` is compared, at the *same size and class balance*, with baseline subsets drawn from
one real pool, under the same learner, steps, lr, schedule, batch and seeds (:mod:`potstill.dd.protocol`),
with hard labels and with a teacher's soft labels (KD with alpha 0, T 1). A set that only beats
random under a different training budget proves nothing, hence one protocol for every arm.

Shared with ``potstill condense`` and ``select`` (:mod:`potstill.runners.common`), so the verbs judge alike:
the ``data`` section and the pool / held-out split it draws, the ``learner`` section and how the
learner is built (MiniLM ``TextClassifier`` cut by ``SplitLearner.from_classifier``;
``trainable_layers: 0`` is a linear probe on mean-pooled features), and the one-line recipe errors.

Set formats (each set is one arm; a set of several files is several replicas of that arm):

* ``jsonl``: one ``{"sentence"|"text", "label"|"labels"}`` row per example (``condensed.jsonl``, a
  DiLM file, ...). A ``soft_label`` column is ignored: every arm gets the *same* teacher's labels;
* ``selection``: a ``selection.json`` (potstill-selection format) whose ``example_ids`` are
  positions in this recipe's pool, fingerprinted over :func:`pool_rows` (:func:`selection_for_pool`
  writes one); :func:`potstill.dd.selection_io.load_selection` refuses unknown ids and other pools;
* ``dilm``: a directory of jsonl set files (DiLM's ``dpc_5/set_*.json``), one replica each.

Baselines are drawn from the pool per class at the set's counts: ``random`` (one seeded draw per
learner seed), ``k_center`` (farthest-point greedy), ``kmeans_medoids`` (DiLM's "K-centers"),
``herding``, over the L2-normalized mean-pooled prefix features (with ``trainable_layers: 0``: the
MiniLM sentence embedding). Values are over learner seeds (x replicas for the set arm).

Verdicts (``verdicts`` in each set's entry; the statistics of ``potstill compare``,
:func:`potstill.runners.eval_data_sets.judge_sets`): each set against every baseline, and every baseline
against ``random`` once per class balance (the report's ``verdicts.baselines``: sets of one size and
balance share their baselines), per label kind, on each held-out example's correctness and gold-class NLL. Learner seed ``s`` pairs
the arms (the same initialisation and batch order; ``random`` draws its subset with it; a set of
several replicas counts the mean over them at that seed), held-out examples are shared by every
seed (a crossed design), and Holm runs over every row of the report, so *better* / *worse* holds
family-wise at 95 %. Every arm trains the same steps on a set of the same size: equal training
cost. With ``learner.seeds: 1`` there is no verdict.

Construction seconds (cost of building one set): the recipe's ``construction_seconds``, else the
timing of a report beside the set (``condense_report.json`` ``construction_s``,
``selection_report.json`` ``timings_s.total_s``, ``report.json`` ``construction_s``), else null,
never guessed; baselines: the measured seconds of one draw on the already computed pool features.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from potstill.data.classification import Example
from potstill.dd.protocol import Features, SplitLearner, compare_arms, evaluate_features, evaluate_set, predict_features
from potstill.errors import PotstillError
from potstill.eval.cls_metrics import EXAMPLE_METRICS
from potstill.io import atomic_write_json
from potstill.recipes.eval_data import EvalDataRecipe
from potstill.runners import eval_data_lm
from potstill.runners.common import build_learner, coreset_space, draw, finite, load_pool, train_pool_teacher
from potstill.runners.eval_data_sets import class_counts, construction, judge_sets, load_set

__all__ = ["run", "run_eval_data", "summary_line"]

METRICS = ("accuracy", "macro_f1")


def _count_labels(labels: Sequence[int]) -> dict[str, int]:
    return {str(y): k for y, k in sorted(Counter(labels).items())}


def _aggregate(runs: dict[str, dict[str, list[dict]]], info: dict[str, dict]) -> dict:
    """``{arm: {**info[arm], kind: {accuracy, macro_f1, gain_vs_random_pts, gain_se_pts}}}`` (:func:`compare_arms`)."""
    out: dict = {arm: dict(v) for arm, v in info.items()}
    for kind, arms in runs.items():
        table = {m: compare_arms(arms, baseline="random", metric=m) for m in METRICS}
        for arm in arms:
            acc = table["accuracy"][arm]
            out[arm][kind] = {
                "accuracy": {k: acc[k] for k in ("mean", "std", "n", "values")},
                "macro_f1": {k: table["macro_f1"][arm][k] for k in ("mean", "std")},
                "gain_vs_random_pts": 100.0 * acc["delta_vs_baseline"],
                "gain_se_pts": 100.0 * acc["delta_se"],
            }
    return out


def _load_sets(recipe: EvalDataRecipe, pool: list[Example], pool_counts: Counter) -> list[tuple]:
    """``(set, path, replicas, class counts, construction seconds, their source)`` per set, every set
    read and checked before the (slow) encoder runs: bad input fails fast."""
    loaded = []
    for s in recipe.sets:
        path, replicas = load_set(s, pool)
        loaded.append((s, path, replicas, class_counts(s.name, replicas, pool_counts), *construction(s, path)))
    return loaded


def _pool_teacher(recipe: EvalDataRecipe, learner, pool_f: Features, eval_f: Features):
    """``(teacher, its report, its soft labels on the pool)``: the learner trained on the whole pool,
    the full-data reference (benchmarks/dd_sst2.py); all None without ``soft`` labels."""
    if "soft" not in recipe.labels:
        return None, None, None
    t0 = time.perf_counter()
    teacher = train_pool_teacher(recipe, learner, pool_f)
    pool_soft = predict_features(teacher, pool_f)
    teacher_report = {k: evaluate_features(teacher, eval_f)[k] for k in METRICS}
    teacher_report.update(steps=recipe.teacher.steps, train_s=time.perf_counter() - t0)
    return teacher, teacher_report, pool_soft


@dataclass
class _Judge:
    """One protocol for every arm: the same learner, held-out features, steps, lr, batch and seeds."""

    recipe: EvalDataRecipe
    learner: SplitLearner
    feats_of: Callable[[list[Example]], Features]
    pool_f: Features
    eval_f: Features
    emb: Tensor  # the coresets' space (:func:`coreset_space`)
    teacher: nn.Module | None = None
    pool_soft: Tensor | None = None
    baseline_cache: dict = field(default_factory=dict)  # sets of one size and balance share their baselines

    def learn(self, runs: dict[str, dict[str, list]], arm: str, feats, soft, seed: int) -> None:
        lr_cfg = self.recipe.learner
        for kind in self.recipe.labels:  # hard and soft share the learner seed: only the targets differ
            runs[kind].setdefault(arm, []).append(
                evaluate_set(
                    feats,
                    seed=seed,
                    labels=kind,
                    soft_labels=soft if kind == "soft" else None,
                    learner=self.learner,
                    eval_examples=self.eval_f,
                    steps=lr_cfg.steps,
                    lr=lr_cfg.lr,
                    batch_size=lr_cfg.batch_size,
                    schedule=lr_cfg.schedule,
                    per_example=True,
                )
            )

    def baselines(self, counts: dict[int, int]) -> tuple[dict, dict]:
        """``(runs, info)`` of every baseline drawn from the pool at ``counts``, once per size and balance."""
        key = tuple(counts.items())
        if key in self.baseline_cache:
            return self.baseline_cache[key]
        recipe, seeds = self.recipe, range(self.recipe.learner.seeds)
        base_runs: dict[str, dict[str, list]] = {kind: {} for kind in recipe.labels}
        base_info = {}
        for b in recipe.baselines:
            draw_s, drawn = [], []
            for seed in seeds:
                t1 = time.perf_counter()
                idx = draw(b, counts, self.pool_f.labels, self.emb, seed=recipe.seed * 1000 + seed)
                draw_s.append(time.perf_counter() - t1)
                drawn.append(idx)
                soft = None if self.pool_soft is None else self.pool_soft[idx]
                self.learn(base_runs, b, self.pool_f.subset(idx), soft, seed)
            # size and balance as measured on what the learners were given, not as requested
            base_info[b] = {
                "size": len(drawn[0]),
                "class_counts": _count_labels(self.pool_f.labels[drawn[0]].tolist()),
                "distinct_draws": len({tuple(sorted(i.tolist())) for i in drawn}),
                "construction_seconds": sum(draw_s) / len(draw_s),
            }
        self.baseline_cache[key] = (base_runs, base_info)
        return base_runs, base_info

    def judge(
        self, s, path: Path, replicas: list[list[Example]], counts: dict[int, int], cost, source
    ) -> tuple[dict, dict]:
        """The report entry of one set (its replicas x seeds against the baselines of its counts) and its
        arms' per-example scores for the verdicts (:func:`_per_seed`)."""
        t0 = time.perf_counter()
        kinds = self.recipe.labels
        runs: dict[str, dict[str, list]] = {kind: {} for kind in kinds}
        for rep in replicas:
            f = self.feats_of(rep)
            soft = predict_features(self.teacher, f) if self.teacher is not None else None
            for seed in range(self.recipe.learner.seeds):
                self.learn(runs, "set", f, soft, seed)
        base_runs, base_info = self.baselines(counts)
        set_info = {
            "size": sum(counts.values()),
            "class_counts": _count_labels([e.label for e in replicas[0]]),
            "replicas": len(replicas),
            "construction_seconds": cost,
        }
        arms = _aggregate({kind: {**runs[kind], **base_runs[kind]} for kind in kinds}, {"set": set_info, **base_info})
        seeds = self.recipe.learner.seeds
        scores = {
            kind: {"set": _per_seed(runs[kind]["set"], seeds)}
            | {b: _per_seed(v, seeds) for b, v in base_runs[kind].items()}
            for kind in kinds
        }
        return {
            "name": s.name,
            "format": s.format,
            "path": str(path),
            "size": sum(counts.values()),
            "replicas": len(replicas),
            "class_counts": set_info["class_counts"],
            "construction_seconds": cost,
            "construction_source": source,
            "arms": arms,
            "eval_s": time.perf_counter() - t0,
        }, scores


def _by_metric(scores: dict) -> dict:
    """``{kind: {arm: {metric: x}}}`` as :func:`judge_sets` reads it, ``{kind: {metric: {arm: x}}}``."""
    return {kind: {m: {arm: v[m] for arm, v in arms.items()} for m in EXAMPLE_METRICS} for kind, arms in scores.items()}


def _per_seed(rows: list[dict], seeds: int) -> dict[str, np.ndarray]:
    """``{metric: [seeds, examples]}`` from one arm's learner runs, ordered replica by replica and seed by seed
    within each: the per-example scores of seed ``s`` averaged over the replicas (a baseline has one)."""
    return {
        m: np.asarray([r["per_example"][m] for r in rows], dtype=np.float64)
        .reshape(-1, seeds, len(rows[0]["per_example"][m]))
        .mean(0)
        for m in EXAMPLE_METRICS
    }


def _protocol(recipe: EvalDataRecipe) -> dict:
    lr_cfg = recipe.learner
    return {
        "steps": lr_cfg.steps,
        "lr": lr_cfg.lr,
        "batch_size": lr_cfg.batch_size,
        "schedule": lr_cfg.schedule,
        "seeds": list(range(lr_cfg.seeds)),
        "trainable_layers": lr_cfg.trainable_layers,
        "max_length": lr_cfg.max_length,
    }


def run_eval_data(recipe) -> dict:
    """Judge every set of the recipe against its baselines (module docstring); returns the report
    written atomically to ``output_dir/eval_data.json``. A ``causal_lm`` recipe runs
    :func:`potstill.runners.eval_data_lm.run_eval_data_lm`."""
    if not isinstance(recipe, EvalDataRecipe):
        return eval_data_lm.run_eval_data_lm(recipe)
    t_start = time.perf_counter()
    pool, held = load_pool(recipe)
    pool_counts = Counter(e.label for e in pool)
    if len(pool_counts) < 2:
        raise PotstillError("the pool holds a single label; raise data.pool_size")
    loaded = _load_sets(recipe, pool, pool_counts)

    learner, feats_of = build_learner(recipe, num_labels=max(max(pool_counts) + 1, 2))
    t0 = time.perf_counter()
    pool_f, eval_f = feats_of(pool), feats_of(held)
    emb = coreset_space(pool_f)
    features_s = time.perf_counter() - t0
    teacher, teacher_report, pool_soft = _pool_teacher(recipe, learner, pool_f, eval_f)
    judge = _Judge(recipe, learner, feats_of, pool_f, eval_f, emb, teacher, pool_soft)
    judged = [judge.judge(*x) for x in loaded]
    # the set against every baseline, each baseline against random (module docstring)
    verdicts = judge_sets(
        [(entry, _by_metric(scores)) for entry, scores in judged],
        list(recipe.baselines),
        EXAMPLE_METRICS,
        facet="labels",
        group=lambda entry: json.dumps(entry["class_counts"], sort_keys=True),
    )
    report_sets = [entry for entry, _ in judged]

    out = Path(recipe.output_dir) / "eval_data.json"
    report = finite(
        {
            "dataset": recipe.dataset,
            "n_pool": len(pool),
            "n_eval": len(held),
            "learner": learner.name,
            "labels": list(recipe.labels),
            "baselines": list(recipe.baselines),
            "teacher": teacher_report,
            "protocol": _protocol(recipe),
            "sets": report_sets,
            "verdicts": verdicts,
            "timing_s": {"features": features_s},
            "total_s": time.perf_counter() - t_start,
            "path": str(out),
            "recipe": recipe.model_dump(mode="json"),
        }
    )
    atomic_write_json(out, report)
    return report


def summary_line(report: dict) -> str:
    """One line: per set and label kind, its accuracy, the gain over random, each baseline's accuracy."""
    if report.get("kind") == "causal_lm":
        return eval_data_lm.summary_line(report)
    parts = []
    for st in report["sets"]:
        arms = st["arms"]
        kinds = []
        for kind in report["labels"]:
            row = arms["set"][kind]
            base = ", ".join(f"{b} {arms[b][kind]['accuracy']['mean']:.3f}" for b in report["baselines"])
            verdict = next(
                v["verdict"]
                for v in st["verdicts"]
                if (v["arm"], v["baseline"], v["labels"], v["metric"]) == ("set", "random", kind, "accuracy")
            )
            kinds.append(
                f"{kind} {row['accuracy']['mean']:.3f}±{row['accuracy']['std']:.3f} "
                f"({row['gain_vs_random_pts']:+.1f} pts, {verdict}; {base})"
            )
        parts.append(
            f"{st['name']} (n={st['size']}, {st['replicas']}x{len(report['protocol']['seeds'])}): " + " | ".join(kinds)
        )
    return f"eval-data: {'; '.join(parts)}; {report['total_s']:.0f} s  report: {report['path']}"


def run(recipe) -> dict:
    """``potstill eval-data``: :func:`run_eval_data` (either flavour)."""
    return run_eval_data(recipe)
