"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each helper writes to a temporary file in the destination's directory (same filesystem,
so the rename is atomic), flushes and fsyncs it, then ``os.replace``-s it over the
destination. A crash mid-write leaves the old file intact and at most a stray
``.<name>.pid<PID>.<host>.<random>.tmp`` beside it; the name records the process that
owned it, so :func:`remove_stale_temporaries` can later delete the ones whose owner is
gone (and only those). Parent directories are created as needed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "remove_stale_temporaries"]

# ``.<destination name>.pid<pid>.<host>.<mkstemp's random part>.tmp``. The host is part of
# the name because a pid means nothing on another machine sharing the same filesystem.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.pid(?P<pid>[0-9]+)\.(?P<host>[A-Za-z0-9_-]+)\.[A-Za-z0-9_]+\.tmp")


def _host() -> str:
    return (re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host")[:40]


def temporary_prefix(name: str, pid: int | None = None) -> str:
    """The start of the name of a temporary for ``name`` written by process ``pid`` (default: this one)."""
    return f".{name}.pid{os.getpid() if pid is None else pid}.{_host()}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # 0 / negative address process groups, never one process: treat as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # no process can have such a pid
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a killed writer left in ``directory``; returns them.

    Only regular files named exactly as :func:`atomic_write_bytes` names its temporaries,
    by a process on this host that no longer exists, are removed: a temporary whose
    writer still runs (or runs on another host), and any other file, are left alone. Not
    recursive; a missing directory has nothing to remove.
    """
    directory = Path(directory)
    host = _host()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or m["host"] != host:
            continue
        try:
            if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                continue
        except FileNotFoundError:
            continue
        if _pid_alive(int(m["pid"])):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another process cleaned it first
        removed.append(Path(entry.path))
    return removed


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp")
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
