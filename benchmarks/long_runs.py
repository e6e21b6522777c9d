"""Long runs (issue 16): what a checkpoint every N steps costs, and what a killed run redoes when it resumes.

Setup: the demo recipe (``recipes/demo.yaml``: SmolLM2-135M teacher, a 6-layer student cut from it, the demo
data), one forward-KL run of ``--steps`` optimizer steps, batch 8, run with ``potstill distill`` in a fresh child
process per arm. Evaluation is cut to 2 held-out examples and 1 generated token (it is not what is measured).

* (b) checkpoint overhead: ``train_seconds`` of the run (``train_info.json``: the Trainer's ``train()`` call)
  with ``train.save_steps`` = ``--every`` vs without checkpoints, the arms alternated ``--repeats`` times (plain,
  saving, plain, saving, ...) so that a slow period of the machine hits both; overhead = median(saving) /
  median(plain) - 1. Target (issue 16): <= 5 % of training time with a checkpoint every 10 steps.
* (c) resume: the saving arm run again, killed (SIGKILL) as soon as the checkpoint at step 2 x ``--every`` is
  marked complete, then rerun. Reported: the step the kill hit (the last step logged before it), the newest
  complete checkpoint then, the step the rerun resumed from, the steps it redid (kill step - resume step), the
  steps before the last checkpoint that it redid (target 0), and whether the student equals the uninterrupted
  saving arm's bit for bit.

Usage: ``python benchmarks/long_runs.py [--steps 30] [--every 10] [--repeats 2] [--out PATH]``. Writes JSON
(default ``benchmarks/results/long_runs.json``) and prints a one-line summary. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import median, summary_line, write_json_atomic  # noqa: E402

RECIPE = HERE.parent / "recipes" / "demo.yaml"


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _cmd(out: Path, steps: int, every: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "potstill", "distill", str(RECIPE), f"output_dir={out}", f"train.max_steps={steps}",
           "train.logging_steps=1", "data.eval_size=2", "eval.max_new_tokens=1", "eval.include_untrained=false",
           "runs=[{name: kd, alpha: 0.0, divergence: {name: forward_kl}}]"]
    return cmd + ([f"train.save_steps={every}"] if every else [])


def _train_seconds(out: Path) -> float:
    return float(json.loads((out / "runs" / "kd" / "train_info.json").read_text())["train_seconds"])


def _run(out: Path, steps: int, every: int | None) -> float:
    r = subprocess.run(_cmd(out, steps, every), env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"distill failed: {r.stderr[-2000:]}")
    return _train_seconds(out)


def _resume(root: Path, steps: int, every: int, reference: Path) -> dict:
    out = root / "killed"
    ckpts = out / "checkpoints" / "kd"
    target = ckpts / f"checkpoint-{2 * every}" / "potstill_run.json"
    log = root / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(out, steps, every), env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while not target.exists() and proc.poll() is None:
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logged = [m for m in re.findall(r"'loss': '[^']*'", log.read_text())]
    kill_step = len(logged)  # logging_steps = 1: one loss line per finished step
    marked = [int(p.name.split("-")[1]) for p in ckpts.iterdir()
              if p.name.startswith("checkpoint-") and (p / "potstill_run.json").exists()]
    newest = max(marked) if marked else 0
    _run(out, steps, every)
    info = json.loads((out / "runs" / "kd" / "train_info.json").read_text())
    resumed = int(info.get("resumed_from", "checkpoint-0").split("-")[1])
    from safetensors.torch import load_file

    a = load_file(reference / "runs" / "kd" / "model.safetensors")
    b = load_file(out / "runs" / "kd" / "model.safetensors")
    return {"kill_step": kill_step, "newest_checkpoint_at_kill": newest, "resumed_from_step": resumed,
            "steps_redone": kill_step - resumed, "steps_redone_before_last_checkpoint": max(newest - resumed, 0),
            "student_bit_identical": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a),
            "loss_curve_identical": info["loss_curve"] == json.loads(
                (reference / "runs" / "kd" / "train_info.json").read_text())["loss_curve"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "long_runs.json"))
    a = p.parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()
    plain, saving = [], []
    with tempfile.TemporaryDirectory(prefix="long_runs_") as tmp:
        root = Path(tmp)
        for i in range(a.repeats):
            plain.append(_run(root / f"plain{i}", a.steps, None))
            saving.append(_run(root / f"saving{i}", a.steps, a.every))
        resume = _resume(root, a.steps, a.every, root / "saving0")
    overhead = median(saving) / median(plain) - 1.0
    report = {
        "benchmark": "long_runs",
        "config": {"recipe": "recipes/demo.yaml", "runs": "one forward-KL run", "steps": a.steps,
                   "batch_size": 8, "save_steps": a.every, "save_total_limit": 2, "repeats": a.repeats},
        "checkpoint_overhead": {"plain_train_seconds": plain, "saving_train_seconds": saving,
                                "overhead": round(overhead, 4), "target_max": 0.05,
                                "target_met": overhead <= 0.05},
        "resume": {**resume, "target_steps_redone_before_last_checkpoint": 0},
        "packing": "not measured: data.packing is not built yet",
        "wall_s": round(time.time() - t0, 1),
        "loadavg_1_5_15": {"start": list(load0), "end": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
    }
    write_json_atomic(a.out, report)
    print(summary_line("long_runs", {"checkpoint_overhead": overhead, "steps_redone": resume["steps_redone"],
                                     "redone_before_last_checkpoint": resume["steps_redone_before_last_checkpoint"],
                                     "bit_identical": resume["student_bit_identical"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
