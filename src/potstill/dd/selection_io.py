"""The ``selection.json`` file of ``potstill select``: its format, the fingerprint of the pool it was made
for, reading it back (:func:`load_selection`, what ``data.selection`` of a distill recipe uses), and the
selection of a classification pool (:func:`selection_for_pool`, example ids = pool positions)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..data.classification import Example
from ..errors import PotstillError
from ..fingerprints import pool_fingerprint

__all__ = [
    "FORMAT",
    "REPORT",
    "SELECTED",
    "SELECTION",
    "VERSION",
    "load_selection",
    "pool_rows",
    "selection_for_pool",
]

FORMAT = "potstill-selection"
VERSION = 1
SELECTION, REPORT, SELECTED = "selection.json", "selection_report.json", "selected.jsonl"


def load_selection(path: str | Path, examples: Sequence[dict]) -> list[dict]:
    """The examples a ``selection.json`` keeps, in pool order, each with its original ``example_id``.

    ``path`` is the file or the directory holding it; ``examples`` the encoded train split
    (the pool) of the distill recipe. Refuses a selection made for other data (its
    ``data_fingerprint`` differs from :func:`pool_fingerprint` of ``examples``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / SELECTION
    if not p.is_file():
        raise PotstillError(f"no selection at '{p}'; run `potstill select RECIPE.yaml` first or fix data.selection")
    try:
        sel = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise PotstillError(f"{p} is not valid JSON; rerun `potstill select` to rewrite it") from None
    if not isinstance(sel, dict) or sel.get("format") != FORMAT:
        raise PotstillError(f"{p} is not a potstill selection; point data.selection at a selection.json")
    if sel.get("version") != VERSION:
        raise PotstillError(f"selection format version {sel.get('version')} is not {VERSION}; rerun `potstill select`")
    if sel.get("data_fingerprint") != pool_fingerprint(examples):
        raise PotstillError(
            f"the selection at '{p}' was made for other data ({sel.get('pool_size')} examples then, {len(examples)} "
            "now; data, max_length, system prompt or chat template differ); rerun `potstill select` with this "
            "recipe's data section"
        )
    ids = sel.get("example_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise PotstillError(f"{p} has no example ids; rerun `potstill select` to rewrite it")
    by_id = {int(ex["example_id"]): ex for ex in examples}
    missing = [i for i in ids if i not in by_id]
    if missing or len(set(ids)) != len(ids):
        raise PotstillError(
            f"{p} names example ids that are not in the pool once each (e.g. "
            f"{(missing or ids)[0]}); rerun `potstill select` to rewrite it"
        )
    keep = set(ids)
    return [ex for ex in examples if int(ex["example_id"]) in keep]


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
