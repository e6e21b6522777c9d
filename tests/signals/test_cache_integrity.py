"""A damaged cache is found before training starts; a killed writer leaves nothing behind.

* Opening a cache (what the pipeline does before it writes anything) checks every shard's
  size, and its sha256 unless ``verify=False``, while shard contents still load lazily.
* Temporary files carry their writer's pid (and host): the next ``write_cache`` (or
  :func:`potstill.io.remove_stale_temporaries`) deletes those whose writer is gone, and
  nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.io import atomic_write_bytes, remove_stale_temporaries
from potstill.signals.cache import CachedSignal, write_cache

from .cache_helpers import SPEC, shard


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a directory, hidden ones included."""
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def temporaries(path: Path) -> list[str]:
    return sorted(f.name for f in path.iterdir() if f.name.endswith(".tmp"))


def one_line_error(call) -> str:
    with pytest.raises(PotstillError) as info:
        call()
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------ verification when opening


@pytest.mark.parametrize("j", [0, 1, 2])
def test_a_flipped_byte_in_any_shard_is_found_when_the_cache_is_opened(cache_copy, j):
    path, _ = cache_copy
    f = shard(path, j)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, anywhere
    f.write_bytes(bytes(data))
    msg = one_line_error(lambda: CachedSignal(path))
    assert msg.startswith(f"cache shard {f} does not match its manifest"), msg
    assert msg.endswith("; rerun `potstill cache` with the same recipe to rewrite it"), msg


@pytest.mark.parametrize("j", [0, 2])
def test_a_resized_shard_is_found_when_opened_even_without_verify(cache_copy, j):
    path, _ = cache_copy
    f = shard(path, j)
    f.write_bytes(f.read_bytes() + b"\0")
    for verify in (True, False):
        msg = one_line_error(lambda v=verify: CachedSignal(path, verify=v))
        assert f"cache shard {f} does not match its manifest" in msg and "rerun `potstill cache`" in msg, msg


def test_opening_verifies_without_loading_shard_contents(built, monkeypatch, tiny_tokenizer):
    # Verification streams the files; the tensors are still opened lazily, by the first batch that needs them.
    import safetensors

    path, exs = built
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda f, **kw: (opened.append(Path(f).name), real(f, **kw))[1])
    src = CachedSignal(path, verify=True)
    assert opened == []
    batch = PadCollator(tiny_tokenizer.pad_token_id)([exs[4]])
    assert src.signal(batch).num_rows > 0
    assert opened == ["shard-00001.safetensors"]


# ------------------------------------------------------------------ stale temporaries


def _orphan_temporary(directory: Path, name: str) -> tuple[Path, int]:
    """A temporary that ``atomic_write_bytes`` left behind in a process that died mid-write; (it, the dead pid)."""
    code = textwrap.dedent(f"""
        import os
        from potstill import io
        os.replace = lambda src, dst: os._exit(0)  # die between writing the temporary and renaming it
        io.atomic_write_bytes({str(directory / name)!r}, b"partial")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = [
        f
        for f in directory.iterdir()
        if f.name.startswith(f".{name}.") and f.name.endswith(".tmp") and f".pid{proc.pid}." in f.name
    ]
    assert len(left) == 1, sorted(f.name for f in directory.iterdir())
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    return left[0], proc.pid


def test_a_temporary_is_named_after_its_writer(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real(src, dst))[1])
    atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert len(seen) == 1 and seen[0].startswith(f".out.bin.pid{os.getpid()}.") and seen[0].endswith(".tmp")
    assert temporaries(tmp_path) == []


def test_remove_stale_temporaries_removes_only_ours_whose_writer_is_gone(tmp_path):
    dead, pid = _orphan_temporary(tmp_path, "shard-00001.safetensors")
    live = tmp_path / dead.name.replace(f".pid{pid}.", f".pid{os.getpid()}.")
    live.write_bytes(b"in progress")
    prefix, host_and_rest = dead.name.split(f".pid{pid}.", 1)
    other_host = tmp_path / f"{prefix}.pid{pid}.some-other-host.{host_and_rest.split('.', 1)[1]}"
    other_host.write_bytes(b"written on another machine sharing this directory")
    users = [
        tmp_path / n for n in ("notes.tmp", ".notes.tmp", f".x.{pid}.tmp", f"x.pid{pid}.y.tmp", f".x.pid{pid}.tmp")
    ]
    for f in users:
        f.write_text("mine")
    folder = tmp_path / dead.name.replace("shard-00001", "shard-00002")
    folder.mkdir()  # named like a stale temporary, but a directory
    keep = sorted(p.name for p in [live, other_host, *users, folder])

    assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == keep
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_write_cache_removes_dead_writers_temporaries(cache_copy, tiny_teacher, tiny_tokenizer):
    path, exs = cache_copy
    dead, pid = _orphan_temporary(path, "shard-00002.safetensors")
    live = path / dead.name.replace(f".pid{pid}.", f".pid{os.getpid()}.")
    live.write_bytes(b"in progress")
    user = path / "notes.tmp"
    user.write_text("mine")
    before = snapshot(path)
    written = []
    assert write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False, on_shard=written.append)
    assert written == []
    assert not dead.exists() and live.is_file() and user.read_text() == "mine"
    assert snapshot(path) == {k: v for k, v in before.items() if k != dead.name}


@pytest.mark.slow
def test_sigkill_while_caching_then_rerun_gives_the_identical_cache(built, tmp_path, tiny_teacher, tiny_tokenizer):
    ref, exs = built
    model_dir = tmp_path / "teacher"
    tiny_teacher.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    ex_file = tmp_path / "examples.json"
    ex_file.write_text(json.dumps(exs))
    killed = tmp_path / "killed"
    # The child hangs in the fsync of its second shard's temporary (the first shard is on disk), and is
    # SIGKILLed from outside there: the kill leaves a real, partly written temporary behind.
    code = textwrap.dedent(f"""
        import json, os, time, torch
        torch.set_num_threads({torch.get_num_threads()})
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from potstill.signals.cache import CacheSpec, write_cache
        tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()
        exs = json.loads(open({str(ex_file)!r}).read())
        done, fsync = [], os.fsync
        def slow_fsync(fd):
            if done:
                time.sleep(600)
            fsync(fd)
        os.fsync = slow_fsync
        write_cache(model, tok, exs, {str(killed)!r}, CacheSpec(**{SPEC.__dict__!r}), progress=False,
                    on_shard=done.append)
    """)
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 240
            tmp = []
            while not tmp:
                assert proc.poll() is None, (tmp_path / "child.log").read_text()
                assert time.monotonic() < deadline, "the child never started its second shard"
                time.sleep(0.1)
                tmp = list(killed.glob(".shard-00001.safetensors.*.tmp")) if killed.is_dir() else []
            assert shard(killed, 0).is_file() and (killed / "shard-00000.json").is_file()
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:  # a failed assertion above: leave no orphan
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert f".pid{proc.pid}." in tmp[0].name and tmp[0].exists()
    assert not (killed / "manifest.json").exists()

    written = []
    man = write_cache(tiny_teacher, tiny_tokenizer, exs, killed, SPEC, progress=False, on_shard=written.append)
    assert man is not None and written == [1, 2]  # resumed after the shard the child finished
    assert temporaries(killed) == []
    assert snapshot(killed) == snapshot(ref)
