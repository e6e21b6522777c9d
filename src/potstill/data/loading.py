"""Read examples from files (JSON, JSONL, CSV, parquet) or the hub, as plain records.

A record becomes a *pair*: ``{"messages": [...prompt turns...], "response": str}``. The
prompt turns are chat messages; the response is the target of the final assistant turn.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..errors import PotstillError

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(path: str | Path | None = None, *, hub_name: str | None = None, config_name: str | None = None,
                 split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local file or a hub dataset, as dicts. Raises one-line errors for bad input."""
    import datasets

    datasets.disable_progress_bars()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise PotstillError(f"data file '{p}' does not exist; fix data.source.path in the recipe")
        fmt = _FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise PotstillError(
                f"data file '{p}' has an unsupported extension '{p.suffix}'; use .json, .jsonl, .csv or .parquet"
            )
        if p.stat().st_size == 0:
            raise PotstillError(f"data file '{p}' is empty; give a file with at least one example")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as err:  # datasets raises many types for unreadable files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "corresponds to no data" in first:  # e.g. a CSV with a header and no rows
                raise PotstillError(f"dataset '{p}' has no examples; give at least one example") from None
            raise PotstillError(f"data file '{p}' could not be read as {fmt} ({first[:160]}); check its format") from None
    else:
        try:
            ds = datasets.load_dataset(hub_name, config_name, split=split)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PotstillError(
                f"dataset '{hub_name}' could not be loaded ({first[:160]}); check the name, or set HF_HUB_OFFLINE=0 "
                "with network access"
            ) from None
    rows = ds.to_list()
    if not rows:
        where = path if path is not None else hub_name
        raise PotstillError(f"dataset '{where}' has no examples; give at least one example")
    return rows


def records_to_pairs(rows: list[dict[str, Any]], *, prompt_field: str = "prompt", response_field: str = "response",
                     messages_field: str | None = None, system_prompt: str | None = None,
                     where: str = "data") -> list[dict[str, Any]]:
    """Records -> ``[{"messages": [...], "response": str}]``; a missing field names the columns that exist."""
    pairs = []
    cols = sorted(rows[0].keys()) if rows else []
    for i, row in enumerate(rows):
        if messages_field is not None:
            if messages_field not in row:
                raise PotstillError(
                    f"{where}: column '{messages_field}' not found (columns: {cols}); set data.source.messages_field"
                )
            msgs = list(row[messages_field] or [])
            if not msgs or msgs[-1].get("role") != "assistant":
                raise PotstillError(
                    f"{where}: row {i} has no final assistant turn in '{messages_field}'; every chat must end with one"
                )
            prompt_msgs = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
            response = msgs[-1]["content"]
        else:
            for field in (prompt_field, response_field):
                if field not in row:
                    raise PotstillError(
                        f"{where}: column '{field}' not found (columns: {cols}); set data.source.prompt_field / "
                        "response_field"
                    )
            prompt_msgs = [{"role": "user", "content": str(row[prompt_field])}]
            response = row[response_field]
        if not isinstance(response, str) or not response.strip():
            raise PotstillError(f"{where}: row {i} has an empty response; remove it or fill it in")
        if system_prompt and not (prompt_msgs and prompt_msgs[0]["role"] == "system"):
            prompt_msgs = [{"role": "system", "content": system_prompt}] + prompt_msgs
        pairs.append({"messages": prompt_msgs, "response": response})
    return pairs


def train_eval_split(items: list, eval_size: int, seed: int = 0) -> tuple[list, list]:
    """Seeded shuffle, then the last ``eval_size`` items are held out."""
    if len(items) <= eval_size:
        raise PotstillError(
            f"only {len(items)} examples for eval_size={eval_size}; lower data.eval_size or add examples"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    shuffled = [items[i] for i in order]
    return shuffled[:-eval_size], shuffled[-eval_size:]
