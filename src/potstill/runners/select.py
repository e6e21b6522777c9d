"""``potstill select``: choose the training subset a KD student will learn from.

A causal-LM :class:`~potstill.recipes.select.SelectRecipe` names the teacher, the scoring student, the data (the pool is
*exactly* the train split that ``potstill distill`` makes from the same ``data`` section:
same order, same ``example_id``), an optional teacher-signal cache, and a ``select``
section: a scorer (a discriminated union on ``kind``), filters, and a budget.

:func:`run_select` runs, in order (GUIDE item 9: every step keeps or drops with a reason):

1. the pool (:class:`potstill.runners.prepare.Prepared` on the equivalent distill recipe, so the
   split, the encoding and the ids are distill's own);
2. the filters, in recipe order (MinHash near-duplicates, IFD > 1), over the whole pool;
3. the scorer over the survivors: per-example scores (perplexity, IFD, KD divergence,
   "confident teacher, unsure student", LESS) or embeddings (k-center, k-means medoids,
   herding, DEITA). KD-aware scores read the teacher from the cache when one is given:
   one teacher pass feeds both the soft targets and the data scores;
4. the budget: the ``k`` best survivors (or a subset chosen over embeddings, or random).

and writes atomically to ``output_dir``:

* ``selection.json``: ``{"example_ids": [kept, pool order], "scorer", "budget",
  "data_fingerprint", ...}``; a distill recipe reads it with ``data.selection: PATH``
  (:func:`load_selection`), which refuses other data;
* ``selected.jsonl``: the kept pairs (``prompt``, ``response``, ``messages``, ``example_id``);
* ``selection_report.json``: counts kept / dropped per reason, a score summary, every
  example's score and reason, and the time split ``timings_s``: ``load_s`` (models and data),
  ``teacher_s`` (teacher forward, or reading its signal from the cache), ``student_s``
  (student forward, both output heads, the per-token scores), ``student_warmup_s`` and
  ``student_gradients_s`` (LESS), ``embedding_s``, ``filters_s``, ``selection_s`` (the budget
  step), ``scoring_s`` (all of these but loading) and ``total_s``;
* ``select_recipe.resolved.yaml``.

A classification recipe (``kind: classification``) runs :func:`run_select_cls`: picks ``per_class``
examples of every label from the pool that ``potstill eval-data`` and ``potstill condense`` draw for the
same ``dataset``, ``seed`` and ``data`` section, so the selection is judged there as a ``format: selection``
set. (1) **Filter** (optional, ``teacher_confident: p``): the soft-label teacher of eval-data scores every
pool example; one is kept only if the teacher predicts its label with probability >= p (each drop names
the teacher's prediction and p(label)). (2) **Pick** per class among the survivors: ``random``,
``k_center``, ``kmeans_medoids`` (DiLM's "K-centers") or ``herding`` (Welling 2009), in eval-data's coreset
space; or ``knn_shapley`` / ``tmc_shapley``: the highest data values (:mod:`potstill.dd.valuation`) in the
same space against a seeded validation slice of the pool (held out, never selected), the lowest-valued
``valuation.suspect_fraction`` listed as suspected mislabels (report ``suspects``). Writes ``selection.json``,
``selected.jsonl`` (``{"sentence", "label", "example_id"}``) and ``selection_report.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from potstill.dd import diversity as D
from potstill.dd.dedup import MinHashDedup
from potstill.dd.protocol import predict_features
from potstill.dd.select import apply_filters, drop_ifd_above_one, ifd_loss_ratio, keep_indices, reason_key, top_k
from potstill.dd.selection_io import FORMAT, REPORT, SELECTED, SELECTION, VERSION, selection_for_pool
from potstill.dd.valuation import per_class_top
from potstill.errors import PotstillError
from potstill.fingerprints import pool_fingerprint
from potstill.io import atomic_write_json, atomic_write_text
from potstill.recipes.distill import Recipe
from potstill.recipes.select import (
    VALUATION_SCORERS,
    ClsSelectRecipe,
    KCenterScorer,
    KMeansMedoidsScorer,
    LessScorer,
    MinHashFilter,
    SelectConfig,
    SelectRecipe,
    distill_recipe,
    kd_scorer,
    scalar_scorer,
)
from potstill.runners.common import BUDGET_CUT, build_learner, coreset_space, draw, load_pool, train_pool_teacher
from potstill.runners.prepare import Prepared
from potstill.runners.select_scoring import (
    VALUATION_SET,
    Clock,
    Scoring,
    budget_count,
    less_scores,
    open_cache,
    pair_text,
    pool_pairs,
    score_summary,
    value_pool,
)

__all__ = [
    "BUDGET_CUT",
    "LESS_TARGET",
    "NOT_CONFIDENT",
    "SCORERS",
    "run",
    "run_select",
    "run_select_cls",
    "summary_line",
]

LESS_TARGET = "LESS target set, held out"
NOT_CONFIDENT = "teacher not confident"


@dataclass
class _Run:
    """One selection in progress: the recipe, the pool and what scores it."""

    sr: SelectRecipe
    recipe: Recipe
    prep: Any
    pool: list[dict]
    pairs: list[dict]
    source: Any
    clock: Clock
    scoring: Scoring
    less_targets: list[dict] | None = None

    @property
    def sel(self) -> SelectConfig:
        return self.sr.select


@dataclass
class _Pick:
    """The budget step's outcome: positions in the survivors kept, why each other one was cut, and the scores
    or embeddings it was chosen by (for the report)."""

    chosen: list[int]
    budget_reasons: dict[int, str] = field(default_factory=dict)
    scores: Tensor | None = None
    score_name: str | None = None
    emb: Tensor | None = None


def _open_pool(sr: SelectRecipe) -> _Run:
    """Step 1, the pool: distill's own train split of the equivalent distill recipe, its texts and its cache."""
    recipe = distill_recipe(sr)
    t0 = time.perf_counter()
    prep = Prepared(recipe)
    pool = prep.pool_examples
    budget_count(sr.select.budget, len(pool))  # refused before anything runs
    source = open_cache(prep, recipe) if recipe.cache is not None else None
    pairs = pool_pairs(prep, recipe, pool)
    clock = Clock(prep.device)
    clock.add("load_s", time.perf_counter() - t0)
    return _Run(sr, recipe, prep, pool, pairs, source, clock, Scoring(prep, sr, pool, pairs, source, clock))


def _less_target_filter(run: _Run, n: int) -> list[Callable]:
    """A LESS scorer's target set: a seeded pool slice held out of the selection (a filter), or the eval split."""
    scorer, sel = run.sel.scorer, run.sel
    if not isinstance(scorer, LessScorer):
        return []
    if scorer.target != "pool":
        run.less_targets = run.prep.eval_examples[: scorer.target_size]
        return []
    if scorer.target_size >= n:
        raise PotstillError(
            f"select.scorer.target_size={scorer.target_size} leaves no pool examples to "
            f"select from ({n} in all); lower it"
        )
    g = torch.Generator().manual_seed(sel.seed)
    held = sorted(torch.randperm(n, generator=g)[: scorer.target_size].tolist())
    run.less_targets = [run.pool[i] for i in held]
    held_set = set(held)

    def less_target(example, index: int):
        return True if index not in held_set else (False, LESS_TARGET)

    less_target.__name__ = "less_target"
    return [less_target]


def _filter(run: _Run, records: list[dict]):
    """Step 2, the filters, in recipe order, over the whole pool (a LESS target slice is held out first)."""
    n, sel = len(run.pool), run.sel
    filters = _less_target_filter(run, n)
    for f in sel.filters:
        if isinstance(f, MinHashFilter):
            filters.append(
                MinHashDedup(threshold=f.threshold, num_perm=f.num_perm, ngram=f.ngram, unit=f.unit, seed=sel.seed + 1)
            )
        else:
            st = run.scoring.stats(f.model, list(range(n)))
            filters.append(drop_ifd_above_one(ifd_loss_ratio(st), name=f"ifd_loss_ratio[{f.model}]"))
    with run.clock("filters_s"):
        first = apply_filters(records, filters)
    if not first.kept_index:
        raise PotstillError(f"the filters dropped all {n} pool examples ({first.report}); loosen them")
    return first


# ------------------------------------------------------------------------------ step 3: scorers


def _random(run: _Run, surv: list[int], kk: int) -> _Pick:
    with run.clock("selection_s"):
        g = torch.Generator().manual_seed(run.sel.seed)
        chosen = torch.randperm(len(surv), generator=g)[:kk].tolist()
        cut = {j: f"{BUDGET_CUT} (not drawn, seed {run.sel.seed})" for j in set(range(len(surv))) - set(chosen)}
    return _Pick(chosen, cut)


def _coreset(run: _Run, surv: list[int], kk: int) -> _Pick:
    scorer, seed = run.sel.scorer, run.sel.seed
    emb = run.scoring.embeddings(scorer.embeddings, surv)
    with run.clock("selection_s"):
        if isinstance(scorer, KCenterScorer):
            chosen = D.greedy_k_center(emb, kk, seed=seed).tolist()
        elif isinstance(scorer, KMeansMedoidsScorer):
            chosen = D.kmeans_medoids(emb, kk, seed=seed, iters=scorer.iters).tolist()
        else:
            chosen = D.herding(emb, kk).tolist()
        cut = {j: f"{BUDGET_CUT} (not a {scorer.kind} pick)" for j in set(range(len(surv))) - set(chosen)}
    return _Pick(chosen, cut, emb=emb)


def _top_k(run: _Run, scores: Tensor, name: str, kk: int) -> _Pick:
    with run.clock("selection_s"):
        keep = top_k(scores, kk, largest=run.sel.largest, name=name)
        pick = _Pick([], scores=scores, score_name=name)
        for j in range(len(scores)):
            verdict = keep(None, j)
            if verdict is True:
                pick.chosen.append(j)
            else:
                pick.budget_reasons[j] = f"{BUDGET_CUT} ({verdict[1]})"
    return pick


def _scored(run: _Run, surv: list[int], kk: int) -> _Pick:
    inner = scalar_scorer(run.sel)
    return _top_k(run, run.scoring.scores(inner, surv), inner.kind, kk)


def _less(run: _Run, surv: list[int], kk: int) -> _Pick:
    student0, pool = run.prep.student0, [run.pool[i] for i in surv]
    return _top_k(run, less_scores(run.sel.scorer, student0, pool, run.less_targets, run.sel, run.clock), "less", kk)


def _deita(run: _Run, surv: list[int], kk: int) -> _Pick:
    scorer, inner = run.sel.scorer, scalar_scorer(run.sel)
    scores = run.scoring.scores(inner, surv)
    emb = run.scoring.embeddings(scorer.embeddings, surv)
    with run.clock("selection_s"):
        walk = scores if run.sel.largest else -scores
        idx, why = D.deita_filter(emb, walk, kk, scorer.threshold, return_reasons=True)
        cut = {j: f"{BUDGET_CUT} ({r})" if r.startswith("deita budget filled") else r for j, r in why.items()}
    return _Pick(idx.tolist(), cut, scores=scores, score_name=inner.kind, emb=emb)


SCORERS: dict[str, Callable[[_Run, list[int], int], _Pick]] = {
    "random": _random,
    "perplexity": _scored,
    "ifd_loss_ratio": _scored,
    "ifd_ppl_ratio": _scored,
    "kd_divergence": _scored,
    "confident_teacher_unsure_student": _scored,
    "less": _less,
    "k_center": _coreset,
    "kmeans_medoids": _coreset,
    "herding": _coreset,
    "deita": _deita,
}
"""Step 3 per scorer ``kind``: ``(run, survivors, k) ->`` the positions kept among the survivors."""


# ------------------------------------------------------------------------------ steps 4-5: budget, report, write


def _score_report(run: _Run, pick: _Pick, n_surv: int) -> tuple[dict | None, dict | None]:
    """``(scores summary, coverage)`` of the report: the scores of all / kept / cut survivors, and how far
    every survivor is from its nearest kept one in the embedding space."""
    summary = coverage = None
    if pick.scores is not None:
        mask = torch.zeros(n_surv, dtype=torch.bool)
        mask[torch.tensor(sorted(pick.chosen), dtype=torch.long)] = True
        summary = {
            "name": pick.score_name,
            "largest": run.sel.largest,
            "scored": score_summary(pick.scores),
            "kept": score_summary(pick.scores[mask]),
            "cut": score_summary(pick.scores[~mask]),
        }
    if pick.emb is not None and pick.chosen:
        d = torch.cdist(pick.emb.double(), pick.emb[torch.tensor(pick.chosen)].double()).amin(1)
        coverage = {
            "embeddings": getattr(run.sel.scorer, "embeddings", None),
            "max_distance_to_kept": float(d.max()),
            "mean_distance_to_kept": float(d.mean()),
        }
    return summary, coverage


def _report(run: _Run, first, final, pick: _Pick, surv, kept, reasons, budget, t_start) -> dict:
    sel, pool, clock = run.sel, run.pool, run.clock
    summary, coverage = _score_report(run, pick, len(surv))
    score_of = {} if pick.scores is None else {surv[j]: float(pick.scores[j]) for j in range(len(surv))}
    timings = {k_: round(v, 4) for k_, v in clock.s.items()}
    timings["scoring_s"] = round(sum(v for k_, v in clock.s.items() if k_ != "load_s"), 4)
    timings["total_s"] = round(time.perf_counter() - t_start, 4)
    kept_set = set(kept)
    return {
        "format": FORMAT,
        "version": VERSION,
        "pool": len(pool),
        "kept": len(kept),
        "dropped": dict(final.report.dropped),
        "reason_order": list(final.report.dropped),
        "budget": budget,
        "scorer": sel.scorer.model_dump(mode="json"),
        "filters": [f.model_dump(mode="json") for f in sel.filters],
        "filter_report": first.report.to_dict(),
        "scores": summary,
        "coverage": coverage,
        "teacher_signal": "none"
        if kd_scorer(sel) is None
        else (f"cache {run.recipe.cache_dir}" if run.source is not None else "live teacher"),
        "device": str(run.prep.device),
        "timings_s": timings,
        "data_fingerprint": pool_fingerprint(pool),
        "examples": [
            {
                "example_id": pool[i]["example_id"],
                "kept": i in kept_set,
                "reason": reasons.get(i),
                "reason_key": None if i not in reasons else reason_key(reasons[i]),
                "score": score_of.get(i),
            }
            for i in range(len(pool))
        ],
    }


def _write(run: _Run, kept: list[int], report: dict) -> None:
    """Step 5: every file written atomically, ``selection.json`` last (its presence means complete)."""
    sr, sel, pool, pairs = run.sr, run.sel, run.pool, run.pairs
    selection = {
        "format": FORMAT,
        "version": VERSION,
        "example_ids": [pool[i]["example_id"] for i in kept],
        "scorer": sel.scorer.model_dump(mode="json"),
        "largest": sel.largest,
        "budget": report["budget"],
        "filters": [f.model_dump(mode="json") for f in sel.filters],
        "seed": sel.seed,
        "pool_size": len(pool),
        "data_fingerprint": report["data_fingerprint"],
        "teacher": sr.teacher.model,
        "data": sr.data.model_dump(mode="json"),
    }
    out = Path(sr.output_dir)
    (out / SELECTION).unlink(missing_ok=True)  # never leave an old selection next to new files
    atomic_write_text(out / "select_recipe.resolved.yaml", yaml.safe_dump(sr.model_dump(mode="json"), sort_keys=False))
    lines = []
    for i in kept:
        p = pairs[i]
        user = [m["content"] for m in p["messages"] if m.get("role") == "user"]
        row = {
            "example_id": pool[i]["example_id"],
            "prompt": user[-1] if user else "",
            "response": p["response"],
            "messages": [*p["messages"], {"role": "assistant", "content": p["response"]}],
        }
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(out / SELECTED, "".join(line + "\n" for line in lines))
    atomic_write_json(out / REPORT, report)
    atomic_write_json(out / SELECTION, selection)
    report["paths"] = {"selection": str(out / SELECTION), "selected": str(out / SELECTED), "report": str(out / REPORT)}


def run_select(sr) -> dict:
    """Score the pool, filter, apply the budget, and write the selection atomically: pool -> filters ->
    scorer (:data:`SCORERS`) -> budget -> write.

    Returns the content of ``selection_report.json`` plus ``"paths"`` (the three files).
    Nothing is written before the models, the data, the cache and the budget are checked.
    A classification recipe runs :func:`run_select_cls`.
    """
    if not isinstance(sr, SelectRecipe):
        return run_select_cls(sr)
    t_start = time.perf_counter()
    run = _open_pool(sr)
    n = len(run.pool)
    k = budget_count(sr.select.budget, n)
    records = [{"text": pair_text(p), "example_id": ex["example_id"]} for p, ex in zip(run.pairs, run.pool)]
    first = _filter(run, records)
    surv = first.kept_index
    reasons: dict[int, str] = {d.index: d.reason for d in first.dropped}
    pick = SCORERS[sr.select.scorer.kind](run, surv, min(k, len(surv)))
    for j, r in pick.budget_reasons.items():
        reasons[surv[j]] = r
    kept = sorted(surv[j] for j in pick.chosen)
    final = apply_filters(records, [keep_indices(kept, reasons)])
    assert final.kept_index == kept
    budget = {"requested": sr.select.budget, "count": k, "kept": len(kept), "unmet": len(kept) < k}
    report = _report(run, first, final, pick, surv, kept, reasons, budget, t_start)
    _write(run, kept, report)
    return report


def summary_line(report: dict) -> str:
    """One line for the CLI: kept of pool, drops per reason, time, where the selection is."""
    drops = ", ".join(f"{k}: {v}" for k, v in report["dropped"].items())
    return (
        f"select: kept {report['kept']} of {report['pool']} ({report['scorer']['kind']})"
        + (f"; dropped {drops}" if drops else "")
        + f"; {report['timings_s']['total_s']:.1f} s  selection: {report['paths']['selection']}"
    )


# ------------------------------------------------------------------------------ classification


def _check_per_class(labels: Tensor, classes: list[int], per_class: int, cand: Tensor | None = None, conf=None):
    """Every label has ``per_class`` examples in the pool (or, with ``cand``, among the filter's survivors)."""
    for y in classes:
        if cand is None:
            have = int((labels == y).sum())
            if have < per_class:
                raise PotstillError(
                    f"the pool has {have} examples of label {y}, fewer than "
                    f"select.per_class={per_class}; lower per_class or raise data.pool_size"
                )
            continue
        left = int((labels[cand] == y).sum()) if len(cand) else 0
        if left < per_class:
            raise PotstillError(
                f"only {left} examples of label {y} pass teacher_confident={conf}, "
                f"fewer than select.per_class={per_class}; lower teacher_confident (or null) "
                "or raise data.pool_size"
            )


def _confident(recipe: ClsSelectRecipe, learner, pool_f, labels: Tensor) -> tuple[dict[int, str], Tensor]:
    """The teacher filter: ``(reasons of the dropped, p(label) of every pool example)``."""
    p = recipe.select.teacher_confident
    probs = predict_features(train_pool_teacher(recipe, learner, pool_f), pool_f)
    p_label = probs[torch.arange(len(labels)), labels]
    pred = probs.argmax(-1)
    reasons = {}
    for i in range(len(labels)):
        y, p_y = int(labels[i]), float(p_label[i])
        if int(pred[i]) != y:
            reasons[i] = f"{NOT_CONFIDENT} (predicts {int(pred[i])}, not the label {y}; p(label) = {p_y:.3f})"
        elif p_y < p:
            reasons[i] = f"{NOT_CONFIDENT} (p(label {y}) = {p_y:.3f} < {p})"
    return reasons, p_label


def _write_cls(recipe: ClsSelectRecipe, pool, ids: list[int], report: dict) -> None:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SELECTION).unlink(missing_ok=True)  # written last: a crash below leaves no stale "complete" selection
    atomic_write_text(
        out / "select_recipe.resolved.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    )
    atomic_write_text(
        out / SELECTED,
        "".join(
            json.dumps({"sentence": pool[i].text, "label": pool[i].label, "example_id": i}, ensure_ascii=False) + "\n"
            for i in ids
        ),
    )
    atomic_write_json(out / REPORT, report)
    atomic_write_json(out / SELECTION, selection_for_pool(pool, ids))  # last: its presence means complete


def run_select_cls(recipe: ClsSelectRecipe) -> dict:
    """Filter, pick, write (module docstring); returns the report plus ``"paths"``."""
    t_start = time.perf_counter()
    sel = recipe.select
    pool, _ = load_pool(recipe)
    labels = torch.tensor([e.label for e in pool])
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise PotstillError("the pool holds a single label; raise data.pool_size")
    _check_per_class(labels, classes, sel.per_class)
    learner, feats_of = build_learner(recipe, num_labels=max(max(classes) + 1, 2))
    t0 = time.perf_counter()
    pool_f = feats_of(pool)
    emb = coreset_space(pool_f)
    timings = {"features_s": time.perf_counter() - t0}
    reasons: dict[int, str] = {}
    p_label = None
    if sel.teacher_confident is not None:
        t0 = time.perf_counter()
        reasons, p_label = _confident(recipe, learner, pool_f, labels)
        timings["teacher_s"] = time.perf_counter() - t0
    valued = None
    if sel.scorer in VALUATION_SCORERS:
        t0 = time.perf_counter()
        valued = value_pool(sel, emb, labels, max(classes) + 1)
        timings["valuation_s"] = time.perf_counter() - t0
        for i in valued.val_idx:
            reasons.setdefault(i, f"{VALUATION_SET} (seed {sel.seed})")
    cand = torch.tensor([i for i in range(len(pool)) if i not in reasons], dtype=torch.long)
    _check_per_class(labels, classes, sel.per_class, cand, sel.teacher_confident)
    t0 = time.perf_counter()
    counts = {y: sel.per_class for y in classes}
    if valued is None:
        picked = cand[draw(sel.scorer, counts, labels[cand], emb[cand], seed=sel.seed)]
    else:  # the highest data values of each class among the survivors
        picked = cand[per_class_top([valued.values[int(i)] for i in cand], labels[cand], counts)]
    timings["selection_s"] = time.perf_counter() - t0
    ids = sorted(int(i) for i in picked)
    keep = set(ids)
    for i in cand.tolist():
        if i not in keep:
            reasons[i] = f"{BUDGET_CUT} (not a {sel.scorer} pick of label {int(labels[i])})"
    timings["total_s"] = time.perf_counter() - t_start
    rows = [
        {
            "example_id": i,
            "label": e.label,
            "kept": i in keep,
            "reason": reasons.get(i),
            "reason_key": None if i in keep else reason_key(reasons[i]),
            "teacher_p_label": None if p_label is None else round(float(p_label[i]), 6),
            "value": None if valued is None else valued.values.get(i),
        }
        for i, e in enumerate(pool)
    ]
    out = Path(recipe.output_dir)
    report = {
        "kind": "classification",
        "dataset": recipe.dataset,
        "scorer": {"kind": sel.scorer},
        "teacher_confident": sel.teacher_confident,
        "per_class": sel.per_class,
        "pool": len(pool),
        "kept": len(ids),
        "class_counts": {str(y): k for y, k in sorted(Counter(pool[i].label for i in ids).items())},
        "dropped": dict(Counter(r["reason_key"] for r in rows if not r["kept"])),
        "timings_s": timings,
        "valuation": None if valued is None else {**valued.info, "suspect_fraction": sel.valuation.suspect_fraction},
        "suspects": None if valued is None else valued.suspects,
        "examples": rows,
        "paths": {"selection": str(out / SELECTION), "selected": str(out / SELECTED), "report": str(out / REPORT)},
    }
    _write_cls(recipe, pool, ids, report)
    return report


def run(recipe) -> dict:
    """``potstill select``: :func:`run_select` (either flavour)."""
    return run_select(recipe)
