"""Seed tasks of teacher synthesis (:mod:`potstill.dd.synthesize`): the human-written tasks a run starts from.

Self-Instruct's 175 seed tasks ship as ``$POTSTILL_DATA/self_instruct/seed_tasks.jsonl``; any JSONL of rows
``{instruction, instances: [{input, output}], id?}`` works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PotstillError
from .synth_text import join

__all__ = ["SEEDS_RELPATH", "SeedTask", "load_seed_tasks"]

SEEDS_RELPATH = "self_instruct/seed_tasks.jsonl"


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return join(self.instruction, self.input)


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Self-Instruct seed tasks: JSONL rows ``{instruction, instances: [{input, output}], id?}``."""
    if path is None:
        from ..data.rationale import data_root

        path = data_root() / SEEDS_RELPATH
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"seed tasks file '{p}' does not exist; set seeds_path or POTSTILL_DATA")
    tasks = []
    with open(p, "rb") as f:
        raw_lines = f.read().splitlines()
    for n, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PotstillError(
                f"seed tasks file '{p}' is not UTF-8 (line {n}, byte 0x{raw[err.start]:02x}); save it as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            inst = row["instances"][0] if row.get("instances") else {}
            tasks.append(
                SeedTask(
                    str(row.get("id", f"seed_{n}")),
                    row["instruction"].strip(),
                    str(inst.get("input", "")).strip(),
                    str(inst.get("output", "")).strip(),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PotstillError(
                f"{p}: line {n} is not a seed task (JSON with 'instruction' and 'instances'); fix or remove it"
            ) from None
    if not tasks:
        raise PotstillError(f"seed tasks file '{p}' has no tasks; give at least one")
    return tasks
