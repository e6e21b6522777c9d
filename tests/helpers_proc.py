"""Run a test's subprocesses so that none of them outlives the test.

``run(cmd, timeout=...)`` runs one command, ``run_all([cmd, ...], timeout=...)`` several at once (the ranks
of a job); both return ``subprocess.CompletedProcess`` objects with text ``stdout`` / ``stderr``.

Each command starts in its own session (``start_new_session=True``) with a marker unique to the call in
its environment. Every descendant inherits the marker, also those that start sessions of their own
(``torchrun`` puts each rank in its own session, so killing the launcher's process group misses the
ranks) and those re-parented to init when their parent dies. So:

* on timeout, the launchers' process groups (``os.killpg``) and every other process carrying the marker
  are SIGKILLed, and the test fails with the tail of each command's output;
* after a normal exit, a process still in a launcher's group or carrying the marker (an orphan rank,
  a daemon) is killed and the test fails, naming it.

Output goes to temporary files, not pipes: a process that holds a pipe open cannot block the reader.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence

import psutil  # a dependency of accelerate
import pytest

MARKER = "POTSTILL_TEST_PROCESS_TREE"


def marked(value: str, groups: Sequence[int] = ()) -> list[tuple[psutil.Process, int]]:
    """``(process, its process group)`` of the live processes (not zombies) whose environment holds
    ``MARKER=value`` or whose group is one of ``groups`` (a launcher's group also holds a child started
    with a cleared environment)."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "environ", "status"], ad_value=None):
        info = proc.info
        if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            pgid = os.getpgid(info["pid"])
        except OSError:
            continue
        if pgid in groups or (info["environ"] or {}).get(MARKER) == value:
            found.append((proc, pgid))
    return found


def _describe(procs: Sequence[tuple[psutil.Process, int]]) -> str:
    parts = []
    for p, _ in procs:
        try:
            parts.append(f"pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            parts.append(f"pid {p.pid}")
    return "; ".join(parts)


def kill_marked(value: str, roots: Sequence[subprocess.Popen] = (), *, patience: float = 30.0) -> int:
    """SIGKILL the process groups of ``roots`` and every other process marked ``value``, until none is left.

    Returns how many processes were alive to kill (the roots included)."""
    groups = [root.pid for root in roots]  # each root leads its own session, hence its own process group
    killed: set[int] = set()
    deadline = time.monotonic() + patience
    while True:
        left = marked(value, groups)
        if not left:
            return len(killed)
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not kill: {_describe(left)}")
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)  # the whole group at once, before any of it can fork again
            except (ProcessLookupError, PermissionError):
                pass
        for p, pgid in left:
            killed.add(p.pid)
            if pgid not in groups:  # e.g. the ranks torchrun puts in sessions of their own, and orphans of them
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        time.sleep(0.05)
        for root in roots:
            root.poll()  # reap our own children, or they stay zombies


def run_all(
    cmds: Sequence[Sequence[str]], *, timeout: float, env: dict | None = None, cwd=None, tail: int = 3000
) -> list[subprocess.CompletedProcess]:
    """Run ``cmds`` at once; fail the test on a timeout or on a process left behind (module docstring)."""
    value = f"{os.getpid()}-{uuid.uuid4().hex}"
    full_env = {**(os.environ if env is None else env), MARKER: value}
    outs = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in cmds]
    procs: list[subprocess.Popen] = []
    try:
        for cmd, (out, err) in zip(cmds, outs):
            procs.append(
                subprocess.Popen(
                    [str(c) for c in cmd], stdout=out, stderr=err, env=full_env, cwd=cwd, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            n = kill_marked(value, procs)
        texts = []
        for out, err in outs:
            out.seek(0), err.seek(0)
            texts.append((out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")))
        if timed_out:
            shown = "\n".join(
                f"--- {' '.join(map(str, cmd))[:200]}\n[stdout]\n{o[-tail:]}\n[stderr]\n{e[-tail:]}"
                for cmd, (o, e) in zip(cmds, texts)
            )
            pytest.fail(
                f"timed out after {timeout:g} s; killed {n} processes of the command(s)\n{shown}", pytrace=False
            )
        left = marked(value, [p.pid for p in procs])
        if left:
            names = _describe(left)
            kill_marked(value, procs)
            pytest.fail(
                f"{len(left)} process(es) outlived the command(s) that started them, now killed: {names}", pytrace=False
            )
        return [
            subprocess.CompletedProcess([str(c) for c in cmd], p.returncode, o, e)
            for cmd, p, (o, e) in zip(cmds, procs, texts)
        ]
    except BaseException:  # a timeout or leftover (above), an interrupt, an error of our own: leave nothing behind
        kill_marked(value, procs)
        raise
    finally:
        for out, err in outs:
            out.close(), err.close()


def run(
    cmd: Sequence[str], *, timeout: float, env: dict | None = None, cwd=None, tail: int = 3000
) -> subprocess.CompletedProcess:
    """``run_all([cmd], ...)[0]``."""
    return run_all([cmd], timeout=timeout, env=env, cwd=cwd, tail=tail)[0]


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict:
    """This environment for a child that starts its own processes: offline, one thread each (2 cores), and no
    rank variables of an outer launcher (the child's launcher sets its own)."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env
