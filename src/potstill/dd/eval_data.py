"""``potstill eval-data RECIPE.yaml``: judge distilled or selected training sets against real subsets.

The evaluation protocol of the issue (DiLM, Maekawa et al. 2024, Sec. 5; Wang et al. 2018): every
set in ``sets`` is compared, at the *same size and class balance*, with baseline subsets drawn from
one real pool, under the same learner, steps, lr, batch and seeds (:mod:`potstill.dd.protocol`),
with hard labels and with a teacher's soft labels (KD with alpha 0, T 1). A set that only beats
random under a different training budget proves nothing, hence one protocol for every arm.

Reused from ``potstill condense`` (:mod:`potstill.dd.condense_recipe`), so both verbs judge alike:
the ``data`` section and the pool / held-out split it draws, the ``learner`` section and how the
learner is built (MiniLM ``TextClassifier`` cut by ``SplitLearner.from_classifier``;
``trainable_layers: 0`` is a linear probe on mean-pooled features), and the one-line recipe errors.

Set formats (each set is one arm; a set of several files is several replicas of that arm):

* ``jsonl``: one ``{"sentence"|"text", "label"|"labels"}`` row per example (``condensed.jsonl``, a
  DiLM file, ...). A ``soft_label`` column is ignored: every arm gets the *same* teacher's labels;
* ``selection``: a ``selection.json`` (potstill-selection format) whose ``example_ids`` are
  positions in this recipe's pool, fingerprinted over :func:`pool_rows` (:func:`selection_for_pool`
  writes one); :func:`potstill.dd.pipeline.load_selection` refuses unknown ids and other pools;
* ``dilm``: a directory of jsonl set files (DiLM's ``dpc_5/set_*.json``), one replica each.

Baselines are drawn from the pool per class at the set's counts: ``random`` (one seeded draw per
learner seed), ``k_center`` (farthest-point greedy), ``kmeans_medoids`` (DiLM's "K-centers"),
``herding``, over the L2-normalized mean-pooled prefix features (with ``trainable_layers: 0``: the
MiniLM sentence embedding). Values are over learner seeds (x replicas for the set arm).

Construction seconds (cost of building one set): the recipe's ``construction_seconds``, else the
timing of a report beside the set (``condense_report.json`` ``construction_s``,
``selection_report.json`` ``timings_s.total_s``, ``report.json`` ``construction_s``), else null,
never guessed; baselines: the measured seconds of one draw on the already computed pool features.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator

from ..data.classification import Example
from ..errors import PotstillError
from ..io import atomic_write_json
from ..kd.classifier import TextClassifier, load_encoder
from . import condense_recipe as cr
from .condense_recipe import CondenseData, CondenseLearner
from .diversity import greedy_k_center, herding, kmeans_medoids, per_class
from .pipeline import FORMAT, VERSION, load_selection, pool_fingerprint
from .protocol import (
    SplitLearner,
    compare_arms,
    evaluate_features,
    evaluate_set,
    predict_features,
    train_top,
)

__all__ = [
    "EvalDataRecipe",
    "EvalSet",
    "load_eval_data_recipe",
    "pool_rows",
    "read_set_rows",
    "run_eval_data",
    "selection_for_pool",
    "summary_line",
]

Baseline = Literal["random", "k_center", "herding", "kmeans_medoids"]
CORESETS = {"k_center": (greedy_k_center, True), "kmeans_medoids": (kmeans_medoids, True), "herding": (herding, False)}
REPORT_TIMINGS = {
    "condense_report.json": ("construction_s",),
    "selection_report.json": ("timings_s", "total_s"),
    "synthesis_report.json": ("round_seconds",),
    "report.json": ("construction_s",),
}
METRICS = ("accuracy", "macro_f1")


# ------------------------------------------------------------------------------- recipe


class EvalSet(cr._Strict):
    name: str = Field(..., min_length=1, description="Name of the arm in the report.")
    path: str = Field(
        ...,
        min_length=1,
        description="File or directory ($POTSTILL_DATA/... or relative to the working directory, like output_dir).",
    )
    format: Literal["jsonl", "selection", "dilm"] = Field(
        ..., description="jsonl rows, a selection.json over this pool, or a directory of DiLM set files."
    )
    construction_seconds: float | None = Field(
        None,
        ge=0.0,
        description="Seconds it took to build one set (null: read from a report beside the set, else unknown).",
    )


class EvalDataTeacher(cr._Strict):
    steps: int = Field(500, ge=1, description="Training steps of the teacher (the learner on the whole pool).")
    lr: float | None = Field(None, gt=0.0, description="Teacher lr (null: learner.lr).")
    batch_size: int = Field(64, ge=1, description="Teacher batch size.")


class EvalDataRecipe(cr._Strict):
    dataset: Literal["sst2", "sms_spam"] = Field(
        ..., description="The real data the pool and held-out set come from, read from $POTSTILL_DATA."
    )
    output_dir: str = Field("runs/eval_data", description="Where eval_data.json goes.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the pool, the held-out subset, the teacher and the random draws."
    )
    data: CondenseData = Field(default_factory=CondenseData, description="Pool and evaluation sizes.")
    learner: CondenseLearner = Field(
        default_factory=CondenseLearner,
        description="The one learner every arm is trained with (learner.seeds learners per set).",
    )
    labels: list[Literal["hard", "soft"]] = Field(
        default_factory=lambda: ["hard", "soft"],
        min_length=1,
        description="hard: the set's labels; soft: the teacher's class probabilities on the set's inputs.",
    )
    teacher: EvalDataTeacher = Field(default_factory=EvalDataTeacher, description="Soft-label teacher.")
    baselines: list[Baseline] = Field(
        default_factory=lambda: ["random", "k_center"],
        min_length=1,
        description="Real subsets of the same size and class balance.",
    )
    sets: list[EvalSet] = Field(
        ..., min_length=1, description="The sets to judge: {name, path, format, construction_seconds}."
    )

    @field_validator("labels", "baselines", "sets")
    @classmethod
    def _unique(cls, v: list, info) -> list:
        names = [x.name if isinstance(x, EvalSet) else x for x in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"'{dup}' is listed twice; name each once")
        if info.field_name == "baselines" and "random" not in v:
            raise ValueError("must include random (the gains are over it)")
        return v


def load_eval_data_recipe(source: str | Path | dict, overrides: Sequence[str] = ()):
    """A validated :class:`EvalDataRecipe` from a YAML file or a dict, with ``key.path=value``
    overrides; any problem raises :class:`PotstillError` naming the key. A recipe with
    ``kind: causal_lm`` gives a :class:`~potstill.dd.eval_data_lm.EvalDataLMRecipe` instead."""
    from ..config import apply_plain_overrides, format_validation_error, read_recipe_file

    data = (
        copy.deepcopy(source)
        if isinstance(source, dict)
        else read_recipe_file(source, "dataset, data, learner, sets, ...")
    )
    for item in overrides:  # apply_plain_overrides walks dicts only: refuse sets.0.path=... in one line
        head, _, rest = item.partition("=")[0].partition(".")
        if rest and isinstance(data.get(head), list):
            raise PotstillError(f"override '{item}': '{head}' is a list; override it whole, e.g. {head}=[...]")
    apply_plain_overrides(data, overrides, "learner.steps=20")
    if isinstance(data, dict) and data.get("kind") == "causal_lm":
        from .eval_data_lm import load_lm_recipe

        return load_lm_recipe(data, base_dir=None if isinstance(source, dict) else Path(source).parent)
    try:
        return EvalDataRecipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "eval-data")) from None


# ------------------------------------------------------------------------------- sets


def read_set_rows(path: str | Path) -> list[Example]:
    """Examples of a JSONL set file: ``{"sentence"|"text", "label"|"labels"}`` per line (DiLM, condense)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text = rec["sentence"] if "sentence" in rec else rec["text"]
                label = rec["label"] if "label" in rec else rec["labels"]
                if not isinstance(label, int) or isinstance(label, bool):
                    raise TypeError(f"label {label!r} is not a class id")
                rows.append(Example(str(text), label))
            except (ValueError, KeyError, TypeError) as e:
                raise PotstillError(
                    f"{path}:{n}: not a set row {{'sentence' or 'text', 'label' or 'labels'}} ({e}); fix the line"
                ) from None
    return rows


def pool_rows(pool: Sequence[Example]) -> list[dict]:
    """The pool as :func:`load_selection` reads it: ``example_id`` = position; the fingerprint covers
    each example's UTF-8 text and label, so a selection made over another pool is refused."""
    return [
        {"example_id": i, "input_ids": list(e.text.encode("utf-8")), "labels": [e.label]} for i, e in enumerate(pool)
    ]


def selection_for_pool(pool: Sequence[Example], ids: Sequence[int]) -> dict:
    """A ``selection.json`` body keeping ``ids`` (pool positions), readable by a ``selection`` set."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "example_ids": sorted(int(i) for i in ids),
        "pool_size": len(pool),
        "data_fingerprint": pool_fingerprint(pool_rows(pool)),
    }


def _resolve(path: str) -> Path:
    from ..config import DATA_VAR

    if path.startswith(DATA_VAR):
        from ..data.rationale import data_root

        return data_root() / path[len(DATA_VAR) :].lstrip("/")
    return Path(path)


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # set_2 before set_10


def _load_set(s: EvalSet, pool: list[Example]) -> tuple[Path, list[list[Example]]]:
    """``(path, replicas)``: the set's examples, one list per replica (a dilm directory: one per file)."""
    p, where = _resolve(s.path), f"set '{s.name}'"
    if not p.exists():
        raise PotstillError(f"{where}: '{p}' does not exist; fix its path in the recipe")
    if s.format == "selection":
        try:
            replicas = [[pool[int(r["example_id"])] for r in load_selection(p, pool_rows(pool))]]
        except PotstillError as err:
            raise PotstillError(f"{where}: {err}") from None
    elif s.format == "jsonl":
        if p.is_dir():
            raise PotstillError(f"{where}: '{p}' is a directory; format jsonl reads one file (dilm reads a directory)")
        replicas = [read_set_rows(p)]
    else:
        files = sorted((f for f in p.iterdir() if f.suffix in (".json", ".jsonl")), key=_natural) if p.is_dir() else [p]
        replicas = [read_set_rows(f) for f in files]
    if not replicas or not all(replicas):
        raise PotstillError(f"{where}: '{p}' holds no examples (or an empty file); point it at a non-empty set")
    return p, replicas


def _class_counts(name: str, replicas: list[list[Example]], pool_counts: Counter) -> dict[int, int]:
    """The set's examples per label, checked against the pool (baselines must be drawable from it)."""
    counts = [Counter(e.label for e in r) for r in replicas]
    for c in counts:
        bad = sorted(set(c) - set(pool_counts))
        if bad:
            raise PotstillError(
                f"set '{name}' has label {bad[0]}, which the pool does not have (labels "
                f"{sorted(pool_counts)}); fix the set's labels or the recipe's dataset"
            )
    if any(c != counts[0] for c in counts):
        raise PotstillError(
            f"set '{name}': its files differ in class counts ({dict(counts[0])} vs "
            f"{dict(next(c for c in counts if c != counts[0]))}); list them as separate sets"
        )
    n = sum(counts[0].values())
    if n > sum(pool_counts.values()):
        raise PotstillError(
            f"set '{name}' has {n} examples, more than the pool's {sum(pool_counts.values())}; "
            "raise data.pool_size or judge a smaller set"
        )
    for y, k in counts[0].items():
        if k > pool_counts[y]:
            raise PotstillError(
                f"set '{name}' has {k} examples of label {y}, the pool only {pool_counts[y]}, so no "
                "baseline of the same class balance exists; raise data.pool_size"
            )
    return dict(sorted(counts[0].items()))


def _construction(s, path: Path) -> tuple[float | None, str | None]:
    """``(seconds, source)``: the recipe's figure, else a report's timing beside the set, else unknown
    (any set with ``construction_seconds``: this verb's and the causal-LM one's)."""
    if s.construction_seconds is not None:
        return s.construction_seconds, "recipe"
    folder = path if path.is_dir() else path.parent
    for name, keys in REPORT_TIMINGS.items():
        try:
            v = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            return float(v), str(folder / name)
    return None, None


def _draw(kind: str, counts: dict[int, int], labels: torch.Tensor, emb: torch.Tensor, seed: int) -> torch.Tensor:
    """Pool indices of one baseline subset with exactly ``counts[y]`` examples of each label ``y``."""
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        rows = [(labels == y).nonzero().flatten() for y in counts]
        return torch.cat([r[torch.randperm(len(r), generator=g)[:k]] for r, k in zip(rows, counts.values())])
    fn, seeded = CORESETS[kind]
    rows = torch.cat([(labels == y).nonzero().flatten() for y in counts])
    return rows[per_class(fn, emb[rows], labels[rows], counts, **({"seed": seed} if seeded else {}))]


# ------------------------------------------------------------------------------- shared with select


def build_learner(recipe, num_labels: int):
    """``(learner, feats_of)``: the recipe's learner (``learner`` section) and its feature function
    (mean-pooled when ``trainable_layers`` is 0). Shared by eval-data and classification ``select``."""
    lr_cfg = recipe.learner
    encoder, tokenizer = load_encoder(lr_cfg.encoder)
    model = TextClassifier(encoder, tokenizer, num_labels=num_labels, seed=recipe.seed)
    learner = SplitLearner.from_classifier(
        model, trainable_layers=lr_cfg.trainable_layers, max_length=lr_cfg.max_length
    )

    def feats_of(data):
        f = learner.features(data)
        return cr._pooled(f) if lr_cfg.trainable_layers == 0 else f

    return learner, feats_of


def coreset_space(pool_f) -> torch.Tensor:
    """The coresets' space: the L2-normalized mean-pooled prefix features of the pool."""
    return F.normalize(cr._pooled(pool_f).hidden[:, 0], dim=-1)


def train_pool_teacher(recipe, learner: SplitLearner, pool_f):
    """The soft-label teacher: the learner trained on the whole pool (``teacher`` section, seed ``recipe.seed``)."""
    teacher = learner.new_top(10_000)
    tc = recipe.teacher
    train_top(
        teacher, pool_f, steps=tc.steps, lr=tc.lr or recipe.learner.lr, batch_size=tc.batch_size, seed=recipe.seed
    )
    return teacher


# ------------------------------------------------------------------------------- run


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


def run_eval_data(recipe) -> dict:
    """Judge every set of the recipe against its baselines (module docstring); returns the report
    written atomically to ``output_dir/eval_data.json``. A ``causal_lm`` recipe runs
    :func:`potstill.dd.eval_data_lm.run_eval_data_lm`."""
    if not isinstance(recipe, EvalDataRecipe):
        from .eval_data_lm import run_eval_data_lm

        return run_eval_data_lm(recipe)
    t_start = time.perf_counter()
    lr_cfg, kinds, seeds = recipe.learner, recipe.labels, range(recipe.learner.seeds)
    pool, held = cr._load_data(recipe)
    pool_counts = Counter(e.label for e in pool)
    if len(pool_counts) < 2:
        raise PotstillError("the pool holds a single label; raise data.pool_size")
    loaded = []  # every set is read and checked before the (slow) encoder runs: bad input fails fast
    for s in recipe.sets:
        path, replicas = _load_set(s, pool)
        loaded.append((s, path, replicas, _class_counts(s.name, replicas, pool_counts), *_construction(s, path)))

    learner, feats_of = build_learner(recipe, num_labels=max(max(pool_counts) + 1, 2))
    t0 = time.perf_counter()
    pool_f, eval_f = feats_of(pool), feats_of(held)
    emb = coreset_space(pool_f)
    features_s = time.perf_counter() - t0
    teacher, teacher_report, pool_soft = None, None, None
    if "soft" in kinds:  # the learner trained on the whole pool: the full-data reference (benchmarks/dd_sst2.py)
        t0 = time.perf_counter()
        teacher = train_pool_teacher(recipe, learner, pool_f)
        pool_soft = predict_features(teacher, pool_f)
        teacher_report = {k: evaluate_features(teacher, eval_f)[k] for k in METRICS}
        teacher_report.update(steps=recipe.teacher.steps, train_s=time.perf_counter() - t0)
    protocol = {
        "learner": learner,
        "eval_examples": eval_f,
        "steps": lr_cfg.steps,
        "lr": lr_cfg.lr,
        "batch_size": lr_cfg.batch_size,
    }

    def learn(runs: dict[str, dict[str, list]], arm: str, feats, soft, seed: int) -> None:
        for kind in kinds:  # hard and soft share the learner seed: only the targets differ
            runs[kind].setdefault(arm, []).append(
                evaluate_set(feats, seed=seed, labels=kind, soft_labels=soft if kind == "soft" else None, **protocol)
            )

    baseline_cache: dict[tuple, tuple[dict, dict]] = {}  # sets of one size and balance share their baselines
    report_sets = []
    for s, path, replicas, counts, cost, source in loaded:
        t0 = time.perf_counter()
        runs: dict[str, dict[str, list]] = {kind: {} for kind in kinds}
        for rep in replicas:
            f = feats_of(rep)
            soft = predict_features(teacher, f) if teacher is not None else None
            for seed in seeds:
                learn(runs, "set", f, soft, seed)
        key = tuple(counts.items())
        if key not in baseline_cache:
            base_runs: dict[str, dict[str, list]] = {kind: {} for kind in kinds}
            base_info = {}
            for b in recipe.baselines:
                draw_s, drawn = [], []
                for seed in seeds:
                    t1 = time.perf_counter()
                    idx = _draw(b, counts, pool_f.labels, emb, seed=recipe.seed * 1000 + seed)
                    draw_s.append(time.perf_counter() - t1)
                    drawn.append(idx)
                    learn(base_runs, b, pool_f.subset(idx), None if pool_soft is None else pool_soft[idx], seed)
                # size and balance as measured on what the learners were given, not as requested
                base_info[b] = {
                    "size": len(drawn[0]),
                    "class_counts": _count_labels(pool_f.labels[drawn[0]].tolist()),
                    "distinct_draws": len({tuple(sorted(i.tolist())) for i in drawn}),
                    "construction_seconds": sum(draw_s) / len(draw_s),
                }
            baseline_cache[key] = (base_runs, base_info)
        base_runs, base_info = baseline_cache[key]
        set_info = {
            "size": sum(counts.values()),
            "class_counts": _count_labels([e.label for e in replicas[0]]),
            "replicas": len(replicas),
            "construction_seconds": cost,
        }
        arms = _aggregate({kind: {**runs[kind], **base_runs[kind]} for kind in kinds}, {"set": set_info, **base_info})
        report_sets.append(
            {
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
            }
        )

    out = Path(recipe.output_dir) / "eval_data.json"
    report = cr._finite(
        {
            "dataset": recipe.dataset,
            "n_pool": len(pool),
            "n_eval": len(held),
            "learner": learner.name,
            "labels": list(kinds),
            "baselines": list(recipe.baselines),
            "teacher": teacher_report,
            "protocol": {
                "steps": lr_cfg.steps,
                "lr": lr_cfg.lr,
                "batch_size": lr_cfg.batch_size,
                "seeds": list(seeds),
                "trainable_layers": lr_cfg.trainable_layers,
                "max_length": lr_cfg.max_length,
            },
            "sets": report_sets,
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
        from .eval_data_lm import summary_line as lm_line

        return lm_line(report)
    parts = []
    for st in report["sets"]:
        arms = st["arms"]
        kinds = []
        for kind in report["labels"]:
            row = arms["set"][kind]
            base = ", ".join(f"{b} {arms[b][kind]['accuracy']['mean']:.3f}" for b in report["baselines"])
            kinds.append(
                f"{kind} {row['accuracy']['mean']:.3f}±{row['accuracy']['std']:.3f} "
                f"({row['gain_vs_random_pts']:+.1f} pts; {base})"
            )
        parts.append(
            f"{st['name']} (n={st['size']}, {st['replicas']}x{len(report['protocol']['seeds'])}): " + " | ".join(kinds)
        )
    return f"eval-data: {'; '.join(parts)}; {report['total_s']:.0f} s  report: {report['path']}"
