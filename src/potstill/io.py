"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each helper writes to a temporary file in the destination's directory (same filesystem,
so the rename is atomic), flushes and fsyncs it, then ``os.replace``-s it over the
destination. A crash mid-write leaves the old file intact and at most a stray
``.<name>.*.tmp`` beside it. Parent directories are created as needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _default_mode() -> int:
    # mkstemp creates files 0600; give the result the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``Path(path)``.

    An existing destination keeps its permission bits; a new one gets the umask default.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _default_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns ``Path(path)``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically, with a trailing newline.

    Strict means ``NaN``/``Infinity`` raise ``ValueError`` instead of producing a file
    that other JSON readers reject: convert non-finite floats (e.g. to ``None``) first.
    The object is serialized before anything is written, so a bad object leaves the
    destination untouched.
    """
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")
