"""Read examples from files (JSON, JSONL, CSV, parquet) or the hub, as plain records.

A record becomes a *pair*: ``{"messages": [...prompt turns...], "response": str}``. The
prompt turns are chat messages; the response is the target of the final assistant turn.
"""

from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import PotstillError

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160].rstrip(".")


def _check_utf8(p: Path) -> None:
    """Refuse a text data file that is not UTF-8, naming the line (datasets would read it into
    arrow strings that fail only later, on the first access)."""
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PotstillError(
                    f"data file '{p}' is not UTF-8 (line {n}, byte 0x{raw[err.start]:02x}); save it as UTF-8"
                ) from None


def _json_problem(p: Path) -> str | None:
    """Where a JSON / JSON Lines file stops parsing, as ``"line N is not valid JSON (...)"``; ``None`` if it parses.

    Run only after ``datasets`` failed, to turn its error (which loses the line) into one a user can act on.
    A file whose first non-blank line is a JSON object by itself is read as JSON Lines, any other as one
    JSON document (an array of objects, or a pretty-printed object).
    """
    lines = p.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a JSON string
    first = next((line for line in lines if line.strip()), "")
    try:
        json_lines = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        json_lines = False
    if not json_lines:
        try:
            doc = json.loads("\n".join(lines))
        except json.JSONDecodeError as err:
            return f"line {err.lineno} is not valid JSON ({err.msg}, column {err.colno})"
        if isinstance(doc, list):
            bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
            if bad is not None:
                return f"item {bad + 1} of its array is {_a(type(doc[bad]).__name__)}, not an object"
        return None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {n} is not valid JSON ({err.msg}, column {err.colno})"
        if not isinstance(row, dict):
            return f"line {n} is a JSON {type(row).__name__}, not an object with one field per column"
    return None


@contextmanager
def _quiet_datasets():
    # datasets logs "Failed to load JSON from file ..." at ERROR before raising; the one-line
    # PotstillError below says the same with the line number, so keep stderr to that line
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_records(
    path: str | Path | None = None, *, hub_name: str | None = None, config_name: str | None = None, split: str = "train"
) -> list[dict[str, Any]]:
    """Rows of a local file or a hub dataset, as dicts. Raises one-line errors for bad input.

    A local JSON / JSONL / CSV file must be UTF-8; a JSONL line that does not parse is named by
    its line number.
    """
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
        if fmt != "parquet":
            _check_utf8(p)
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises many types for unreadable files
            first = _first_line(err)
            if "corresponds to no data" in first:  # e.g. a CSV with a header and no rows
                raise PotstillError(f"dataset '{p}' has no examples; give at least one example") from None
            problem = _json_problem(p) if fmt == "json" else None
            if problem is not None:
                raise PotstillError(f"data file '{p}': {problem}; fix or remove it") from None
            raise PotstillError(f"data file '{p}' could not be read as {fmt} ({first}); check its format") from None
    else:
        try:
            ds = datasets.load_dataset(hub_name, config_name, split=split)
        except Exception as err:  # noqa: BLE001 - not found, offline, gated, bad config: each becomes a PotstillError
            raise PotstillError(
                f"dataset '{hub_name}' could not be loaded ({_first_line(err)}); check the name, or set "
                "HF_HUB_OFFLINE=0 with network access"
            ) from None
    rows = ds.to_list()
    if not rows:
        where = path if path is not None else hub_name
        raise PotstillError(f"dataset '{where}' has no examples; give at least one example")
    return rows


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _text(value: Any, where: str, n: int, field: str) -> str:
    """``value`` if it is a string, else a one-line error naming row ``n`` (1-based) and ``field``."""
    if isinstance(value, str):
        return value
    what = "null" if value is None else f"{_a(type(value).__name__)} ({str(value)[:40]!r})"
    raise PotstillError(f"{where}: row {n} field '{field}' is {what}, not a string; give it text or remove the row")


def _chat(value: Any, where: str, n: int, field: str) -> list[dict[str, str]]:
    """``value`` as ``[{"role", "content"}, ...]``, else a one-line error naming row ``n`` and ``field``."""
    fix = 'write it as a list of {"role": ..., "content": ...} turns'
    if not isinstance(value, list):
        what = "null" if value is None else _a(type(value).__name__)
        raise PotstillError(f"{where}: row {n} field '{field}' is {what}, not a list of messages; {fix}")
    turns = []
    for j, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise PotstillError(
                f"{where}: row {n} field '{field}' turn {j} is {_a(type(m).__name__)} ({str(m)[:40]!r}), not a "
                f"message; {fix}"
            )
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                what = "null or missing" if m.get(key) is None else _a(type(m.get(key)).__name__)
                raise PotstillError(
                    f"{where}: row {n} field '{field}' turn {j} has its '{key}' {what}, not a string; {fix}"
                )
        turns.append({"role": m["role"], "content": m["content"]})
    return turns


def records_to_pairs(
    rows: list[dict[str, Any]],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str | None = None,
    system_prompt: str | None = None,
    where: str = "data",
) -> list[dict[str, Any]]:
    """Records -> ``[{"messages": [...], "response": str}]``; a missing field names the columns that exist.

    A prompt or response that is not a string (``null``, a number, a list) and a chat turn that is
    not ``{"role": str, "content": str}`` are refused, naming the row (1-based: the line of a JSONL
    file without blank lines) and the field.
    """
    pairs = []
    cols = sorted(rows[0].keys()) if rows else []
    for i, row in enumerate(rows):
        n = i + 1
        if messages_field is not None:
            if messages_field not in row:
                raise PotstillError(
                    f"{where}: column '{messages_field}' not found (columns: {cols}); set data.source.messages_field"
                )
            msgs = _chat(row[messages_field], where, n, messages_field)
            if not msgs or msgs[-1]["role"] != "assistant":
                raise PotstillError(
                    f"{where}: row {n} has no final assistant turn in '{messages_field}'; every chat must end with one"
                )
            prompt_msgs = msgs[:-1]
            response = msgs[-1]["content"]
        else:
            for field in (prompt_field, response_field):
                if field not in row:
                    raise PotstillError(
                        f"{where}: column '{field}' not found (columns: {cols}); set data.source.prompt_field / "
                        "response_field"
                    )
            prompt_msgs = [{"role": "user", "content": _text(row[prompt_field], where, n, prompt_field)}]
            response = _text(row[response_field], where, n, response_field)
        if not response.strip():
            raise PotstillError(f"{where}: row {n} has an empty response; remove it or fill it in")
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
