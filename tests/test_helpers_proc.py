"""The subprocess helper of the multi-process tests leaves no process behind, hung or not."""

import json
import os
import shutil
import sys
import textwrap

import psutil
import pytest
from helpers_proc import run, run_all

SLEEP = shutil.which("sleep")

# A launcher that starts two grandchildren the way a hung `accelerate launch` leaves them, then hangs:
# one in its own process group but with a cleared environment (only killing the group finds it), one in a
# session of its own, like torchrun's ranks (killing the group misses it; only its inherited marker finds it).
_TREE = textwrap.dedent(f"""
    import json, subprocess, sys, time
    same_group = subprocess.Popen([{SLEEP!r}, "600"], env={{}})
    own_session = subprocess.Popen([{SLEEP!r}, "600"], start_new_session=True)
    with open(sys.argv[1], "w") as f:
        json.dump([same_group.pid, own_session.pid], f)
    print("tree started", flush=True)
    BODY
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for its parent to reap it
    except psutil.NoSuchProcess:
        return True


def _sleeping_tree(tmp_path, body: str):
    pids = tmp_path / "pids.json"
    return [sys.executable, "-c", _TREE.replace("BODY", body), str(pids)], pids


def test_a_timeout_kills_the_whole_tree_and_fails_with_the_output(tmp_path):
    cmd, pids = _sleeping_tree(tmp_path, "time.sleep(600)")
    with pytest.raises(pytest.fail.Exception, match=r"timed out after 3 s; killed 3 processes") as err:
        run(cmd, timeout=3)
    assert "tree started" in str(err.value)  # the tail of the output is in the failure
    grandchildren = json.loads(pids.read_text())
    assert all(_gone(pid) for pid in grandchildren), [
        psutil.Process(p).cmdline() for p in grandchildren if not _gone(p)
    ]


def test_a_process_left_running_after_a_normal_exit_fails_the_test_and_is_killed(tmp_path):
    cmd, pids = _sleeping_tree(tmp_path, "sys.exit(0)")
    with pytest.raises(pytest.fail.Exception, match="2 process.es. outlived the command"):
        run(cmd, timeout=60)
    assert all(_gone(pid) for pid in json.loads(pids.read_text()))


def test_commands_run_together_and_give_their_output_and_exit_codes():
    a, b = run_all(
        [
            [sys.executable, "-c", "import sys; print('out a'); sys.exit(3)"],
            [sys.executable, "-c", "import os, sys; print(os.environ['X'], file=sys.stderr)"],
        ],
        timeout=60,
        env={**os.environ, "X": "err b"},
    )
    assert (a.returncode, a.stdout, b.returncode, b.stderr) == (3, "out a\n", 0, "err b\n")
