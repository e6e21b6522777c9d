"""Long runs (issue 16): what packing saves, what a checkpoint every N steps costs, what a killed run redoes.

Setup: the demo recipe (``recipes/demo.yaml``: SmolLM2-135M teacher, a 6-layer student cut from it, the demo
data), one forward-KL run of ``--steps`` optimizer steps, batch 8, run with ``potstill distill`` in a fresh child
process per arm. Evaluation is cut to 2 held-out examples and 1 generated token (it is not what is measured).

* (a) packing: the same run with ``data.packing`` false and true, alternated ``--repeats`` times: the same
  examples in the same batches and steps, so equal tokens; reported: the share of token slots that were
  padding (``train_info.json`` ``padding_share``), and the speed-up median(padded train_seconds) /
  median(packed train_seconds) (= the tokens/s ratio). On the demo data (examples of 53-104 tokens, batch 8)
  and on GSM8K chain-of-thought data (``--gsm8k``: answers of very different lengths, max_length 512), where
  padding is what packing removes.
* (b) checkpoint overhead: ``train_seconds`` of the run (``train_info.json``: the Trainer's ``train()`` call)
  with ``train.save_steps`` = ``--every`` vs without checkpoints, the arms alternated ``--repeats`` times (plain,
  saving, plain, saving, ...) so that a slow period of the machine hits both; overhead = median(saving) /
  median(plain) - 1. Target (issue 16): <= 5 % of training time with a checkpoint every 10 steps.
* (c) resume: the saving arm run again, killed (SIGKILL) as soon as the checkpoint at step 2 x ``--every`` is
  marked complete, then rerun. Reported: the step the kill hit (the last step logged before it), the newest
  complete checkpoint then, the step the rerun resumed from, the steps it redid (kill step - resume step), the
  steps before the last checkpoint that it redid (target 0), and whether the student equals the uninterrupted
  saving arm's bit for bit.

Usage: ``python benchmarks/long_runs.py [--steps 30] [--every 10] [--repeats 2] [--pack-steps 12] [--parts abc]
[--out PATH]``. Writes JSON (default ``benchmarks/results/long_runs.json``) and prints a one-line summary. About
40 minutes on 2 cores.
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


GSM8K = ["data.source={kind: gsm8k, mode: cot, limit: 400}", "data.max_length=512"]


def _cmd(out: Path, steps: int, every: int | None, extra: list[str] = ()) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "potstill",
        "distill",
        str(RECIPE),
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.logging_steps=1",
        "data.eval_size=2",
        "eval.max_new_tokens=1",
        "eval.include_untrained=false",
        "runs=[{name: kd, alpha: 0.0, divergence: {name: forward_kl}}]",
        *extra,
    ]
    return cmd + ([f"train.save_steps={every}"] if every else [])


def _info(out: Path) -> dict:
    return json.loads((out / "runs" / "kd" / "train_info.json").read_text())


def _run(out: Path, steps: int, every: int | None, extra: list[str] = ()) -> float:
    r = subprocess.run(_cmd(out, steps, every, extra), env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"distill failed: {r.stderr[-2000:]}")
    return float(_info(out)["train_seconds"])


def _packing(root: Path, steps: int, repeats: int, data: list[str]) -> dict:
    arms: dict[str, list] = {"padded": [], "packed": []}
    share, tokens = {}, {}
    for i in range(repeats):
        for arm in arms:
            out = root / f"{arm}{i}"
            arms[arm].append(_run(out, steps, None, [*data, f"data.packing={arm == 'packed'}"]))
            info = _info(out)
            share[arm], tokens[arm] = info["padding_share"], info["loss_tokens"]
    speedup = median(arms["padded"]) / median(arms["packed"])
    # what removing the padding could give at most if time went with the token slots computed
    ceiling = (1.0 - share["packed"]) / (1.0 - share["padded"])
    return {
        "padded_train_seconds": arms["padded"],
        "packed_train_seconds": arms["packed"],
        "padding_share": share,
        "loss_tokens": tokens,
        "equal_tokens": tokens["padded"] == tokens["packed"],
        "speedup": round(speedup, 4),
        "slot_ceiling": round(ceiling, 4),
        "target_min": 1.3,
        "target_met": speedup >= 1.3,
    }


def _resume(root: Path, steps: int, every: int, reference: Path) -> dict:
    out = root / "killed"
    ckpts = out / "checkpoints" / "kd"
    target = ckpts / f"checkpoint-{2 * every}" / "potstill_run.json"
    log = root / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _cmd(out, steps, every), env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while not target.exists() and proc.poll() is None:
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logged = [m for m in re.findall(r"'loss': '[^']*'", log.read_text())]
    kill_step = len(logged)  # logging_steps = 1: one loss line per finished step
    marked = [
        int(p.name.split("-")[1])
        for p in ckpts.iterdir()
        if p.name.startswith("checkpoint-") and (p / "potstill_run.json").exists()
    ]
    newest = max(marked) if marked else 0
    _run(out, steps, every)
    info = json.loads((out / "runs" / "kd" / "train_info.json").read_text())
    resumed = int(info.get("resumed_from", "checkpoint-0").split("-")[1])
    from safetensors.torch import load_file

    a = load_file(reference / "runs" / "kd" / "model.safetensors")
    b = load_file(out / "runs" / "kd" / "model.safetensors")
    return {
        "kill_step": kill_step,
        "newest_checkpoint_at_kill": newest,
        "resumed_from_step": resumed,
        "steps_redone": kill_step - resumed,
        "steps_redone_before_last_checkpoint": max(newest - resumed, 0),
        "student_bit_identical": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a),
        "loss_curve_identical": info["loss_curve"]
        == json.loads((reference / "runs" / "kd" / "train_info.json").read_text())["loss_curve"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pack-steps", type=int, default=12, help="steps of each packing arm (a)")
    p.add_argument("--parts", default="abc", help="which of (a) packing, (b) checkpoint overhead, (c) resume")
    p.add_argument("--out", default=str(HERE / "results" / "long_runs.json"))
    a = p.parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()
    report: dict = {
        "benchmark": "long_runs",
        "config": {
            "recipe": "recipes/demo.yaml",
            "runs": "one forward-KL run",
            "steps": a.steps,
            "packing_steps": a.pack_steps,
            "batch_size": 8,
            "save_steps": a.every,
            "save_total_limit": 2,
            "repeats": a.repeats,
        },
    }
    line: dict = {}
    with tempfile.TemporaryDirectory(prefix="long_runs_") as tmp:
        root = Path(tmp)
        if "a" in a.parts:
            report["packing"] = {
                "demo": _packing(root / "pack_demo", a.pack_steps, a.repeats, []),
                "gsm8k_cot": {"data": GSM8K, **_packing(root / "pack_gsm8k", a.pack_steps, a.repeats, GSM8K)},
            }
            line.update(
                packing_speedup_demo=report["packing"]["demo"]["speedup"],
                packing_speedup_gsm8k=report["packing"]["gsm8k_cot"]["speedup"],
            )
        if "b" in a.parts or "c" in a.parts:
            plain, saving = [], []
            for i in range(a.repeats if "b" in a.parts else 0):
                plain.append(_run(root / f"plain{i}", a.steps, None))
                saving.append(_run(root / f"saving{i}", a.steps, a.every))
            if plain:
                overhead = median(saving) / median(plain) - 1.0
                report["checkpoint_overhead"] = {
                    "plain_train_seconds": plain,
                    "saving_train_seconds": saving,
                    "overhead": round(overhead, 4),
                    "target_max": 0.05,
                    "target_met": overhead <= 0.05,
                }
                line["checkpoint_overhead"] = overhead
            if "c" in a.parts:
                if not saving:
                    saving.append(_run(root / "saving0", a.steps, a.every))
                resume = _resume(root, a.steps, a.every, root / "saving0")
                report["resume"] = {**resume, "target_steps_redone_before_last_checkpoint": 0}
                line.update(
                    steps_redone=resume["steps_redone"],
                    redone_before_last_checkpoint=resume["steps_redone_before_last_checkpoint"],
                    bit_identical=resume["student_bit_identical"],
                )
    previous = Path(a.out)
    if previous.is_file():  # parts not measured now: their figures from the earlier run, said so
        old = json.loads(previous.read_text())
        for key in ("packing", "checkpoint_overhead", "resume"):
            if key not in report and isinstance(old.get(key), dict):
                report[key] = {**old[key], "measured": old[key].get("measured", "in an earlier run of this script")}
    report.update(
        wall_s=round(time.time() - t0, 1),
        loadavg_1_5_15={"start": list(load0), "end": list(os.getloadavg())},
        cpu_count=os.cpu_count(),
    )
    write_json_atomic(a.out, report)
    print(summary_line("long_runs", line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
