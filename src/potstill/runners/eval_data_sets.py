"""The sets ``potstill eval-data`` judges: reading them, checking them against the pool, their cost.

Shared by both flavours of the verb (:mod:`potstill.runners.eval_data` for classifiers,
:mod:`potstill.runners.eval_data_lm` for causal-LM students), which import it and nothing of each other.

* :func:`load_set`: a classifier set's replicas (``jsonl``, ``selection`` or a ``dilm`` directory), each file read
  by :func:`potstill.data.classification.read_set_rows`;
* :func:`class_counts`: the set's examples per label, checked so that baselines of the same class
  balance can be drawn from the pool;
* :func:`construction`: the seconds it took to build a set: the recipe's ``construction_seconds``,
  else the timing of a report beside the set (:data:`REPORT_TIMINGS`), else unknown, never guessed;
* :func:`judge_sets`: the verdicts of every set against its baselines (:func:`potstill.eval.verdict.set_verdicts`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from potstill.data.classification import Example, read_set_rows
from potstill.dd.selection_io import load_selection, pool_rows
from potstill.errors import PotstillError
from potstill.paths import resolve_data_path
from potstill.recipes.eval_data import EvalSet

__all__ = ["REPORT_TIMINGS", "VERDICT_LEVEL", "class_counts", "construction", "judge_sets", "load_set"]

VERDICT_LEVEL = 0.95  # as potstill compare's default

REPORT_TIMINGS = {
    "condense_report.json": ("construction_s",),
    "selection_report.json": ("timings_s", "total_s"),
    "synthesis_report.json": ("round_seconds",),
    "report.json": ("construction_s",),
}


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # set_2 before set_10


def load_set(s: EvalSet, pool: list[Example]) -> tuple[Path, list[list[Example]]]:
    """``(path, replicas)``: the set's examples, one list per replica (a dilm directory: one per file)."""
    p, where = Path(resolve_data_path(s.path)), f"set '{s.name}'"
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


def class_counts(name: str, replicas: list[list[Example]], pool_counts: Counter) -> dict[int, int]:
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


def construction(s, path: Path) -> tuple[float | None, str | None]:
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


def judge_sets(judged: list[tuple[dict, dict]], baselines: list[str], lower_better: dict, *, facet: str, group) -> dict:
    """Attach each set's verdicts to its report entry (``entry["verdicts"]``) and return the report's
    ``verdicts`` section (the baselines' own rows against random, once per group, and the family's size).

    ``judged``: ``(entry, scores)`` per set, ``scores[facet][metric][arm]`` an ``[S, E]`` array (seed ``s``
    pairs the arms: the same initialisation and batches, ``random`` drawn with it; examples: the held-out
    ones, shared by every seed); ``facet`` names the split of the scores in the rows (``labels`` or ``run``);
    ``group(entry)``: the key of sets that share their baseline subsets. The statistics are ``potstill
    compare``'s: crossed bootstrap, Satterthwaite's degrees of freedom, Holm over every row."""
    from potstill.eval.verdict import set_verdicts

    def named(row: dict) -> dict:
        return {(facet if k == "facet" else k): v for k, v in row.items()}

    rows, base = set_verdicts(
        [(entry["name"], group(entry), scores) for entry, scores in judged],
        baselines,
        lower_better,
        level=VERDICT_LEVEL,
    )
    for (entry, _), own in zip(judged, rows, strict=True):
        entry["verdicts"] = [named(r) for r in own]
    n = sum(len(r) for r in rows) + len(base)
    return {
        "level": VERDICT_LEVEL,
        "df": "satterthwaite",
        "family": f"Holm over all {n} rows: each set against every baseline, each baseline against random once "
        f"per {facet}, metric and group of sets sharing their baselines",
        "baselines": [named(r) for r in base],
        "rows": n,
    }
