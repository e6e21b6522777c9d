"""Text classification data: SMS spam, SST-2 and the published DiLM synthetic SST-2 sets.

Every loader returns a list of :class:`Example` (``text``, ``label``) and reads from
``$POTSTILL_DATA`` (see :func:`potstill.data.rationale.data_root`), never from the repo.
Label ids are fixed per dataset: SMS spam ``ham=0, spam=1``; SST-2 ``negative=0, positive=1``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import PotstillError
from .rationale import data_root

SMS_LABELS = ("ham", "spam")
SST2_LABELS = ("negative", "positive")
DILM_BUDGETS = (5, 10, 20)
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _resolve(path: str | Path | None, default: str) -> Path:
    p = Path(path) if path is not None else data_root() / default
    if not p.is_file():
        raise PotstillError(f"data file '{p}' does not exist; set POTSTILL_DATA to the directory holding the data")
    return p


def _nonempty(rows: list[Example], path: Path) -> list[Example]:
    if not rows:
        raise PotstillError(f"'{path}' holds no examples; point to a non-empty file")
    return rows


def load_sms_spam(path: str | Path | None = None) -> list[Example]:
    """The UCI SMS Spam Collection: ``label<TAB>text`` lines (CRLF tolerated), ham=0 / spam=1."""
    p = _resolve(path, "sms_spam/SMSSpamCollection")
    rows = []
    with open(p, encoding="utf-8", newline="") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, sep, text = line.partition("\t")
            if not sep or label not in SMS_LABELS:
                raise PotstillError(f"{p}:{n}: expected 'ham|spam<TAB>text', got {line[:60]!r}; fix or remove the line")
            rows.append(Example(text, SMS_LABELS.index(label)))
    return _nonempty(rows, p)


def load_sst2(split: str = "train", path: str | Path | None = None) -> list[Example]:
    """SST-2 ``sentence<TAB>label`` with a header row; ``split`` is ``train`` or ``dev``."""
    if split not in ("train", "dev"):
        raise PotstillError(f"SST-2 split '{split}' is not one of train, dev")
    p = _resolve(path, f"sst2/{split}.tsv")
    rows = []
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or header[:2] != ["sentence", "label"]:
            raise PotstillError(f"{p}: expected a 'sentence<TAB>label' header, got {header!r}")
        for n, rec in enumerate(reader, 2):
            if len(rec) != 2 or rec[1] not in ("0", "1"):
                raise PotstillError(f"{p}:{n}: expected 'sentence<TAB>0|1', got {rec!r}; fix or remove the line")
            rows.append(Example(rec[0].strip(), int(rec[1])))
    return _nonempty(rows, p)


def load_dilm_set(per_class: int, index: int, root: str | Path | None = None) -> list[Example]:
    """One published DiLM synthetic SST-2 set (Maekawa et al. 2024): ``per_class`` in 5/10/20, ``index`` in 0..19."""
    if per_class not in DILM_BUDGETS:
        raise PotstillError(f"DiLM sets exist for {DILM_BUDGETS} examples per class, not {per_class}")
    base = Path(root) if root is not None else data_root() / "dilm_sst2"
    p = _resolve(base / f"dpc_{per_class}" / f"set_{index}.json", "")
    return _nonempty(read_set_rows(p), p)


def read_jsonl_rows(path: str | Path, parse: Callable[[dict], T], row: str) -> list[T]:
    """``parse(record)`` of every non-blank line of a JSONL file; a line that is not JSON or that ``parse``
    rejects (``ValueError``, ``KeyError``, ``TypeError``) fails as ``path:line: not {row} (why); fix the line``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(parse(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise PotstillError(f"{path}:{n}: not {row} ({e}); fix the line") from None
    return rows


def _set_example(rec: dict) -> Example:
    text = rec["sentence"] if "sentence" in rec else rec["text"]
    label = rec["label"] if "label" in rec else rec["labels"]
    if not isinstance(label, int) or isinstance(label, bool):
        raise TypeError(f"label {label!r} is not a class id")
    return Example(str(text), label)


def read_set_rows(path: str | Path) -> list[Example]:
    """Examples of a JSONL set file: ``{"sentence"|"text", "label"|"labels"}`` per line (DiLM, ``potstill condense``)."""
    return read_jsonl_rows(path, _set_example, "a set row {'sentence' or 'text', 'label' or 'labels'}")


def stratified_split(
    examples: Sequence[Example], eval_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split keeping each label's share: ``(train, eval)``, deterministic in ``seed``."""
    if not 0.0 < eval_fraction < 1.0:
        raise PotstillError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    rng = random.Random(seed)
    train, held = [], []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        rng.shuffle(group)
        k = max(1, round(len(group) * eval_fraction))
        held += group[:k]
        train += group[k:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def per_class_sample(examples: Sequence[Example], per_class: int, seed: int = 0) -> list[Example]:
    """``per_class`` random examples of each label (a random real subset, DiLM's baseline)."""
    rng = random.Random(seed)
    out = []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        if len(group) < per_class:
            raise PotstillError(f"label {label} has {len(group)} examples, fewer than per_class={per_class}")
        out += rng.sample(group, per_class)
    return out
