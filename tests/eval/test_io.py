"""Atomic write helpers."""

from __future__ import annotations

import json
import os
import stat

import pytest

from potstill.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_text_creates_parents_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    assert atomic_write_text(path, "one") == path
    atomic_write_text(path, "twö")
    assert path.read_text(encoding="utf-8") == "twö"
    assert sorted(os.listdir(path.parent)) == ["f.txt"]


def test_new_file_gets_umask_mode_and_existing_mode_is_kept(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o600)
    atomic_write_bytes(path, b"y")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"y"


def test_json_is_strict_and_failure_leaves_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": [1, 2.5, None], "é": "ü"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2.5, None], "é": "ü"}
    assert path.read_text(encoding="utf-8").endswith("\n")
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("nan")})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text(encoding="utf-8"))["a"] == [1, 2.5, None]
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


def test_failed_replace_removes_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]
