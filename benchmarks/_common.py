"""Shared helpers for the scripts in ``benchmarks/``: memory, subprocess workers, JSON, summary.

Memory is process RSS read from ``/proc/self/status`` (Linux). ``reset_peak()`` resets
the kernel's high-water mark (``VmHWM``, which is also what ``getrusage().ru_maxrss``
reports) by writing ``5`` to ``/proc/self/clear_refs``, so a worker can build its models,
reset the peak, and then measure what the measured phase alone adds on top of the
RSS it started from. Where the reset is not available, the peak is the lifetime peak
and the result says so (``peak_reset: false``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def _status_kb(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: fall back to the peak, the best we can read
        return ru_maxrss_mb()
    return kb / 1024.0


def ru_maxrss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (Linux reports kB, macOS bytes)."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / (1024.0 * 1024.0) if sys.platform == "darwin" else v / 1024.0


def reset_peak() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS; ``False`` if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """``with PeakRSS() as m: ...`` -> ``m.baseline_mb``, ``m.peak_mb``, ``m.increment_mb``.

    ``baseline_mb`` is the RSS when the block starts (after ``gc.collect()``),
    ``peak_mb`` the absolute peak RSS during the block (``ru_maxrss`` after the reset),
    ``increment_mb = peak_mb - baseline_mb``: what the block itself cost.
    """

    def __enter__(self) -> PeakRSS:
        import gc

        gc.collect()
        self.setup_peak_mb = ru_maxrss_mb()
        self.peak_reset = reset_peak()
        self.baseline_mb = rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = ru_maxrss_mb()
        self.increment_mb = self.peak_mb - self.baseline_mb

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_mem_mb": round(self.increment_mb, 1),
            "peak_rss_mb": round(self.peak_mb, 1),
            "baseline_rss_mb": round(self.baseline_mb, 1),
            "setup_peak_rss_mb": round(self.setup_peak_mb, 1),
            "peak_reset": self.peak_reset,
        }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_worker(
    script: str | Path, args: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None
) -> dict:
    """Run ``python script *args --result FILE`` in a fresh process; return the JSON it wrote.

    A fresh process per measured arm keeps peak memory (and allocator state, caches,
    thread pools) from one arm out of the next. The child's stdout/stderr pass through.
    """
    full_env = dict(os.environ)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env:
        full_env.update(env)
    fd, path = tempfile.mkstemp(prefix="bench_", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, str(script), *args, "--result", path]
        proc = subprocess.run(cmd, env=full_env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}")
        with open(path) as f:
            return json.load(f)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def summary_line(name: str, items: dict[str, Any]) -> str:
    """``name: k1=v1 k2=v2 ...`` on one line (floats to 3 significant decimals)."""
    parts = []
    for k, v in items.items():
        if isinstance(v, float):
            v = f"{v:.3f}"
        parts.append(f"{k}={v}")
    return f"{name}: " + " ".join(parts)


def seed_stats(xs: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one seed) and the per-seed values, in that order."""
    xs = [float(x) for x in xs]
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}


def verdict(a: dict, b: dict, *, lower_better: bool) -> str:
    """Arm ``a`` against ``b`` (both :func:`seed_stats`): a gap counts only past the sum of their stds."""
    gap = a["mean"] - b["mean"]
    if abs(gap) <= a["std"] + b["std"]:
        return "no measurable difference"
    return "better" if (gap < 0) == lower_better else "worse"


class Partial:
    """Finished units of a benchmark (one arm at one seed) kept beside its output, so a killed run resumes.

    ``<out>.partial.json`` holds ``{"setting": ..., "done": {key: result}}``; a file written under another
    setting is ignored (started afresh). Each :meth:`put` rewrites it atomically; :meth:`finish` removes it
    once the final JSON is written.
    """

    def __init__(self, out: str | Path, setting: dict[str, Any]) -> None:
        self.path = Path(out).with_suffix(".partial.json")
        self.setting = json.loads(json.dumps(setting))  # as it round-trips through JSON
        self.done: dict[str, Any] = {}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("setting") == self.setting:
                self.done = saved["done"]
                print(f"resuming: {len(self.done)} finished units from {self.path}", file=sys.stderr)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __getitem__(self, key: str) -> Any:
        return self.done[key]

    def put(self, key: str, result: Any) -> None:
        self.done[key] = result
        write_json_atomic(self.path, {"setting": self.setting, "done": self.done})

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def held_out_metrics(prep: Any, models: dict, *, batch_size: int = 8, max_new_tokens: int = 0) -> dict[str, dict]:
    """``potstill.eval.evaluate_runs`` of ``models`` against a prepared recipe's teacher on its held-out split
    (``metrics_only``; the teacher's own row under ``"teacher"``). ``max_new_tokens=0``: teacher-forced only."""
    from potstill.eval import evaluate_runs, metrics_only

    return metrics_only(
        evaluate_runs(
            models,
            prep.teacher,
            prep.tokenizer,
            prep.eval_examples,
            vocab_size=prep.vocab_size,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=False,
        )
    )
