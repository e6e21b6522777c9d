"""Where shared data lives: ``$POTSTILL_DATA``, and recipe paths that name it (``$POTSTILL_DATA/...``)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PotstillError

DATA_VAR = "$POTSTILL_DATA"
"""A data path starting with this names a file in the shared data directory (``$POTSTILL_DATA``)."""


def data_root() -> Path:
    """The shared data directory: ``$POTSTILL_DATA``, else ``<repo>/../shared/data``."""
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    root = Path(os.environ.get("POTSTILL_DATA") or default)
    if not root.is_dir():
        raise PotstillError(
            f"data directory '{root}' does not exist; set POTSTILL_DATA to the directory holding the data"
        )
    return root


def resolve_data_path(value: str, base_dir: Path | None = None) -> str:
    """``$POTSTILL_DATA/x`` -> the shared data directory's ``x``; a relative path -> relative to ``base_dir`` (the
    recipe file's folder) when given; anything else unchanged."""
    if value.startswith(DATA_VAR):
        return str(data_root() / value[len(DATA_VAR) :].lstrip("/"))
    if base_dir is not None and not Path(value).is_absolute():
        return str((base_dir / value).resolve())
    return value
