"""``potstill select`` for text-classification pools (a recipe with ``kind: classification``).

Picks ``per_class`` examples of every label from the pool that ``potstill eval-data`` and
``potstill condense`` draw for the same ``dataset``, ``seed`` and ``data`` section, so the selection
is judged there as a ``format: selection`` set (its ``example_ids`` are pool positions and its
fingerprint covers the pool's texts and labels).

1. **Filter** (optional, ``teacher_confident: p``): the soft-label teacher of eval-data (the
   ``learner`` trained on the whole pool, ``teacher`` section) scores every pool example; an example
   is kept only if the teacher predicts its label with probability >= p. Each drop names its reason
   (the teacher's prediction and p(label)). This removes label noise and ambiguous sentences before
   a coreset is taken; with herding it is the best arm of ``benchmarks/dd_sst2.py``.
2. **Pick** per class among the survivors: ``random`` (seeded), ``k_center`` (farthest-point greedy),
   ``kmeans_medoids`` (DiLM's "K-centers") or ``herding`` (Welling 2009: the running mean tracks the
   class mean), in the coreset space of eval-data (L2-normalized mean-pooled learner features).

Writes atomically ``selection.json``, ``selected.jsonl`` (``{"sentence", "label", "example_id"}``) and
``selection_report.json`` (kept, drops counted per reason, one row per pool example, timings).
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field, ValidationError

from ..errors import PotstillError
from ..io import atomic_write_json, atomic_write_text
from . import condense_recipe as cr
from .condense_recipe import CondenseData, CondenseLearner
from .eval_data import EvalDataTeacher, _draw, build_learner, coreset_space, selection_for_pool, train_pool_teacher
from .pipeline import BUDGET_CUT, REPORT, SELECTED, SELECTION

__all__ = ["ClsSelectConfig", "ClsSelectRecipe", "NOT_CONFIDENT", "load_cls_select_recipe", "run_select_cls"]

NOT_CONFIDENT = "teacher not confident"


class ClsSelectConfig(cr._Strict):
    per_class: int = Field(..., ge=1, description="Examples kept per label (DiLM's budgets: 5, 10, 20).")
    scorer: Literal["random", "k_center", "kmeans_medoids", "herding"] = Field(
        "herding", description="How the examples of each class are picked among the survivors."
    )
    teacher_confident: float | None = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Keep only examples whose label "
        "the pool-trained teacher gives at least this probability (null: "
        "no filter, no teacher).",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of random picks, k-means and k-center's first point.")


class ClsSelectRecipe(cr._Strict):
    kind: Literal["classification"] = Field(
        ...,
        description="classification: pick from a labelled text pool "
        "(without it, select works on an LLM recipe's instruction data).",
    )
    dataset: Literal["sst2", "sms_spam"] = Field(
        ..., description="The data the pool comes from, read from $POTSTILL_DATA (as eval-data and condense)."
    )
    output_dir: str = Field("runs/select_cls", description="Where selection.json and its report go.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the pool draw and of the teacher (as eval-data's seed)."
    )
    data: CondenseData = Field(
        default_factory=CondenseData,
        description="Pool size (and eval split) exactly as the eval-data recipe that judges the selection.",
    )
    learner: CondenseLearner = Field(
        default_factory=CondenseLearner,
        description="The learner whose features give the coreset space and whose pool-trained top is the teacher.",
    )
    teacher: EvalDataTeacher = Field(default_factory=EvalDataTeacher, description="Training of the teacher.")
    select: ClsSelectConfig = Field(..., description="per_class, scorer, teacher_confident, seed.")


def load_cls_select_recipe(data: dict, overrides: Sequence[str] = ()) -> ClsSelectRecipe:
    """A validated recipe from a dict, with ``key.path=value`` overrides; problems raise one line."""
    from ..config import apply_plain_overrides, format_validation_error

    data = copy.deepcopy(data)
    apply_plain_overrides(data, list(overrides), "select.per_class=10")
    try:
        return ClsSelectRecipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "select")) from None


def run_select_cls(recipe: ClsSelectRecipe) -> dict:
    """Filter, pick, write (module docstring); returns the report plus ``"paths"``."""
    t_start = time.perf_counter()
    sel = recipe.select
    pool, _ = cr._load_data(recipe)
    labels = torch.tensor([e.label for e in pool])
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise PotstillError("the pool holds a single label; raise data.pool_size")
    short = next((y for y in classes if int((labels == y).sum()) < sel.per_class), None)
    if short is not None:
        raise PotstillError(
            f"the pool has {int((labels == short).sum())} examples of label {short}, fewer than "
            f"select.per_class={sel.per_class}; lower per_class or raise data.pool_size"
        )
    learner, feats_of = build_learner(recipe, num_labels=max(max(classes) + 1, 2))
    t0 = time.perf_counter()
    pool_f = feats_of(pool)
    emb = coreset_space(pool_f)
    timings = {"features_s": time.perf_counter() - t0}

    reasons: dict[int, str] = {}
    p_label = None
    if sel.teacher_confident is not None:
        from .protocol import predict_features

        t0 = time.perf_counter()
        probs = predict_features(train_pool_teacher(recipe, learner, pool_f), pool_f)
        p_label = probs[torch.arange(len(pool)), labels]
        pred = probs.argmax(-1)
        for i in range(len(pool)):
            y, p_y = int(labels[i]), float(p_label[i])
            if int(pred[i]) != y:
                reasons[i] = f"{NOT_CONFIDENT} (predicts {int(pred[i])}, not the label {y}; p(label) = {p_y:.3f})"
            elif p_y < sel.teacher_confident:
                reasons[i] = f"{NOT_CONFIDENT} (p(label {y}) = {p_y:.3f} < {sel.teacher_confident})"
        timings["teacher_s"] = time.perf_counter() - t0
    cand = torch.tensor([i for i in range(len(pool)) if i not in reasons], dtype=torch.long)
    for y in classes:
        left = int((labels[cand] == y).sum()) if len(cand) else 0
        if left < sel.per_class:
            raise PotstillError(
                f"only {left} examples of label {y} pass teacher_confident={sel.teacher_confident}, "
                f"fewer than select.per_class={sel.per_class}; lower teacher_confident (or null) "
                "or raise data.pool_size"
            )
    t0 = time.perf_counter()
    picked = cand[_draw(sel.scorer, {y: sel.per_class for y in classes}, labels[cand], emb[cand], seed=sel.seed)]
    timings["selection_s"] = time.perf_counter() - t0
    ids = sorted(int(i) for i in picked)
    keep = set(ids)
    for i in cand.tolist():
        if i not in keep:
            reasons[i] = f"{BUDGET_CUT} (not a {sel.scorer} pick of label {int(labels[i])})"
    timings["total_s"] = time.perf_counter() - t_start

    def key(reason: str) -> str:
        return NOT_CONFIDENT if reason.startswith(NOT_CONFIDENT) else BUDGET_CUT

    rows = [
        {
            "example_id": i,
            "label": e.label,
            "kept": i in keep,
            "reason": reasons.get(i),
            "reason_key": None if i in keep else key(reasons[i]),
            "teacher_p_label": None if p_label is None else round(float(p_label[i]), 6),
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
        "examples": rows,
        "paths": {"selection": str(out / SELECTION), "selected": str(out / SELECTED), "report": str(out / REPORT)},
    }
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
    return report
