"""FSDP2 vs DDP for logit KD on 2 CPU processes: per-process peak memory and step time of potstill's KDTrainer.

Claim measured (issue 15): with ``train.distributed fsdp2`` each of 2 processes needs at most 0.65 x the memory
it needs under ``ddp``, for models sized so that parameters, gradients and optimizer state dominate.

Setup: random-init ``LlamaForCausalLM`` student (6 layers, hidden 768, intermediate 3072, 12 heads) and teacher
(12 layers, same widths), vocab 49,152, untied heads, fp32. A fixed random batch of 2 rows x 128 tokens per
process (the first 32 tokens of each row are a "prompt", labels -100). ``potstill.kd.KDTrainer``, forward KL,
alpha 0, T 1, the Trainer's AdamW, grad-norm clip 1.0; a few warmup steps, then the measured ones.

Arms, one after the other, each one ``accelerate launch --multi_gpu --num_processes 2`` of this script
(accelerate's torchrun path; ``use_cpu=True`` and ``ddp_backend="gloo"`` make the ranks CPU processes):

* ``ddp``: the Trainer wraps the student in ``DistributedDataParallel``; the live teacher is whole on each rank.
* ``fsdp2``: what ``potstill distill`` does under ``train.distributed fsdp2``: the process group first, then the
  models, the teacher sharded with :func:`potstill.distributed.shard_frozen` (before the Trainer, as ``distill``
  does), a ``KDTrainer`` with the :class:`potstill.distributed.FSDPOnCPU` mixin and
  :func:`potstill.distributed.fsdp2_trainer_args`, so accelerate shards the student with ``fully_shard``.

Memory, per rank: the RSS right before the models are built (process group up, libraries imported; the peak-RSS
mark reset there via ``/proc/self/clear_refs``) is the baseline; ``peak_mem_mb`` = peak RSS over model building,
sharding, Trainer construction and all steps, minus that baseline. The ratio uses the max over ranks. The JSON
also has the RSS after each setup phase, the peak of the setup alone, the peak of each phase of the step
(student forward, teacher forward, loss, backward, optimizer; RSS sampled every 2 ms), the bytes each rank's
tensors hold after the run (parameters, optimizer state), and what theory predicts from the parameter counts.

Two passes, both arms each: ``glibc_default`` (the process as a user runs it; the target is judged on it) and
``fixed_mmap_threshold`` (``MALLOC_MMAP_THRESHOLD_`` set: glibc serves every block of at least that size with its
own mmap and returns it on free, instead of raising its threshold after large frees and keeping freed blocks in
its heap, so RSS follows the live tensors). The gap between the passes is memory the allocator keeps, not tensors.

Time: on_step_begin .. on_step_end (forward, backward, clip, AdamW step), median and min over the measured steps.
On a shared 2-core machine step times are noisy: the load average is recorded.

Usage: ``python benchmarks/fsdp.py [--quick] [--steps 5] [--warmup 2] [--out PATH] [--mmap-threshold BYTES]
[--no-mmap-pass] [--strict]``. Writes JSON (default ``benchmarks/results/fsdp.json``; ``--quick`` writes to a
temp file) and prints a one-line summary. A full run takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    median,
    reset_peak,
    rss_mb,
    ru_maxrss_mb,
    summary_line,
    write_json_atomic,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "fsdp.json"
ARMS = ("ddp", "fsdp2")
PROCESSES = 2
TARGET_MEM_RATIO = 0.65
MARKER = "POTSTILL_BENCH_FSDP_RUN"  # in every process of one arm's launch, so a timeout can find them all

FULL = {
    "vocab_size": 49152,
    "student": {"num_hidden_layers": 6, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
    "teacher": {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
    "batch_per_process": 2,
    "seq_len": 128,
    "prompt_len": 32,
    "rank_timeout_s": 1500,
}
QUICK = {
    "vocab_size": 2048,
    "student": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "teacher": {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "batch_per_process": 2,
    "seq_len": 32,
    "prompt_len": 8,
    "rank_timeout_s": 240,
}


# ----------------------------------------------------------------------------- worker (one rank)


def build_models(cfg: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(spec: dict, seed: int):
        conf = LlamaConfig(
            vocab_size=cfg["vocab_size"],
            num_key_value_heads=spec["num_attention_heads"],
            max_position_embeddings=max(512, cfg["seq_len"]),
            tie_word_embeddings=False,
            use_cache=False,
            **spec,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(conf).float()

    return make(cfg["student"], cfg["seed"]), make(cfg["teacher"], cfg["seed"] + 1)


def make_dataset(cfg: dict, world: int):
    """The global batch (``world`` x ``batch_per_process`` rows); the Trainer's sampler gives each rank its rows."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(cfg["seed"] + 2)
    b, t = cfg["batch_per_process"] * world, cfg["seq_len"]
    input_ids = torch.randint(3, cfg["vocab_size"], (b, t), generator=g)
    labels = input_ids.clone()
    labels[:, : cfg["prompt_len"]] = -100  # the "prompt": no loss there
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")


def _stack(rows: list[dict]) -> dict:
    import torch

    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _local_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (a sharded ``DTensor`` counts its local shard)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


class PhasePeaks:
    """The peak RSS of each phase of the training step, sampled every ``interval`` s in a daemon thread.

    The phase is a label that hooks and callbacks set as the step goes (student forward, teacher forward, loss,
    backward, optimizer); the peak of a label is the highest RSS seen while it was set, over all steps. It tells
    *where* the step's peak is, which a single high-water mark cannot. A sample is one read of
    ``/proc/self/statm``; a spike shorter than the interval can be missed (the high-water mark never is)."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.phase = "setup"
        self.peaks: dict[str, float] = {}
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                mb = int(f.read().split()[1]) * self._page / 2**20
                key = self.phase
                if mb > self.peaks.get(key, 0.0):
                    self.peaks[key] = mb
                self._stop.wait(interval)

    def set(self, phase: str) -> None:
        self.phase = phase

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def worker(arm: str, cfg: dict, result_path: str) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(cfg["rank_timeout_s"], exit=True)  # a hung rank dumps its stacks and exits

    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers import TrainerCallback

    from potstill.distributed import (
        FSDPOnCPU,
        end_distributed,
        fsdp2_trainer_args,
        is_sharded,
        process_rank,
        shard_frozen,
        world_size,
    )
    from potstill.kd import KDConfig, KDTrainer
    from potstill.signals import OnlineTeacher

    torch.set_num_threads(1)  # 2 processes on 2 cores
    world, rank = world_size(), process_rank()
    # As `potstill distill` does: the group before the models, so the teacher is sharded before the Trainer
    # (which reuses the group) and the OnlineTeacher reads the sharded head, not the whole one.
    dist.init_process_group("gloo")

    gc.collect()
    peak_reset = reset_peak()
    baseline = rss_mb()
    rss = {}

    student, teacher = build_models(cfg)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    rss["models_built"] = rss_mb()
    if arm == "fsdp2":
        shard_frozen(teacher)
        rss["teacher_sharded"] = rss_mb()
    source = OnlineTeacher(teacher)  # eval mode, frozen
    train_ds = make_dataset(cfg, world)

    phases = PhasePeaks()
    # prepend: the label changes before FSDP2's own pre-forward hook all-gathers the teacher's root unit
    student.register_forward_pre_hook(lambda *_: phases.set("student_forward"), prepend=True)
    student.register_forward_hook(lambda *_: phases.set("between_forwards"))
    teacher.register_forward_pre_hook(lambda *_: phases.set("teacher_forward"), prepend=True)
    teacher.register_forward_hook(lambda *_: phases.set("loss"))  # the chunked head + divergence reducer

    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            phases.set("train_begin")  # the student is wrapped (DDP) or sharded (FSDP2) by now

        def on_step_begin(self, args, state, control, **kw):
            phases.set("step_begin")
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            phases.set("optimizer_step")

        def on_optimizer_step(self, args, state, control, **kw):
            phases.set("after_optimizer_step")

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            phases.set("step_end")

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            losses.append(float((out[0] if return_outputs else out).detach()))
            phases.set("backward_and_clip")
            return out

    cls = type("KDTrainer", (FSDPOnCPU, Recording), {}) if arm == "fsdp2" else Recording
    extra = fsdp2_trainer_args(student) if arm == "fsdp2" else {}
    with tempfile.TemporaryDirectory() as out_dir:
        args = KDConfig(
            output_dir=out_dir,
            per_device_train_batch_size=cfg["batch_per_process"],
            max_steps=cfg["warmup"] + cfg["steps"],
            learning_rate=cfg["lr"],
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            ddp_backend="gloo",
            dataloader_num_workers=0,
            seed=cfg["seed"],
            alpha=0.0,
            divergence="forward_kl",
            temperature=1.0,
            **extra,
        )
        trainer = cls(
            model=student,
            teacher_model=None,
            signal_source=source,
            args=args,
            train_dataset=train_ds,
            data_collator=_stack,
        )
        trainer.add_callback(Timer())
        rss["trainer_built"] = rss_mb()
        setup_peak = ru_maxrss_mb()  # peak of model building, sharding and the Trainer (not reset: one lifetime)
        trainer.train()
    train_peak = ru_maxrss_mb()  # the high-water mark is never reset after the baseline: the peak of everything
    rss["after_train"] = rss_mb()
    phase_peaks = phases.stop()

    model = trainer.model
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one
    opt_state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    w = cfg["warmup"]
    res = {
        "rank": rank,
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(train_peak, 1),
        "peak_mem_mb": round(train_peak - baseline, 1),
        "setup_peak_mem_mb": round(setup_peak - baseline, 1),
        "peak_reset": peak_reset,
        "rss_after_mb": {k: round(v - baseline, 1) for k, v in rss.items()},  # each minus the baseline
        "phase_peak_mem_mb": {k: round(v - baseline, 1) for k, v in phase_peaks.items()},
        "fsdp_units": [n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule)],
        "held_in_tensors_mb": {  # what this rank really holds after the run (grads are None after zero_grad)
            "student_params": _mb(_local_bytes(model.parameters())),
            "optimizer_state": _mb(_local_bytes(opt_state)),
            "teacher_params": _mb(_local_bytes(teacher.parameters())),
        },
        "step_time_s": round(median(times[w:]), 4),
        "step_time_min_s": round(min(times[w:]), 4),
        "step_times_s": [round(t, 4) for t in times[w:]],
        "warmup_times_s": [round(t, 4) for t in times[:w]],
        "losses": losses,
        "student_sharded": is_sharded(model),
        "teacher_sharded": is_sharded(teacher),
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "optimizer": type(opt).__name__,
        "n_params": {"student": n_student, "teacher": n_teacher},
        "threads": torch.get_num_threads(),
    }
    if isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
        ddp = trainer.model_wrapped
        res["ddp_gradient_as_bucket_view"] = bool(ddp.gradient_as_bucket_view)
        res["ddp_find_unused_parameters"] = bool(ddp.find_unused_parameters)
    if len(times) != w + cfg["steps"]:
        raise RuntimeError(f"rank {rank}: {len(times)} step times for {w + cfg['steps']} steps")
    ranks = [None] * world
    dist.all_gather_object(ranks, res)
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"arm": arm, "processes": world, "ranks": ranks}, f)
    end_distributed()
    faulthandler.cancel_dump_traceback_later()


# ----------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked(value: str) -> list:
    """The live processes started by one launch: their environment holds ``MARKER=value`` (torchrun puts each
    rank in a session of its own, so the launcher's process group alone would miss them)."""
    import psutil  # a dependency of accelerate

    found = []
    for proc in psutil.process_iter(["pid", "environ", "status"], ad_value=None):
        if (
            proc.info["pid"] != os.getpid()
            and proc.info["status"] != psutil.STATUS_ZOMBIE
            and (proc.info["environ"] or {}).get(MARKER) == value
        ):
            found.append(proc)
    return found


def _kill_launch(launcher: subprocess.Popen, value: str) -> int:
    """SIGKILL the launcher's process group and every process carrying this launch's marker; how many of the
    latter were still alive."""
    import psutil

    try:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher leads its own session (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    left = _marked(value)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    launcher.wait()
    return len(left)


def run_arm(arm: str, cfg: dict, *, env_extra: dict[str, str]) -> dict:
    """One ``accelerate launch`` of ``PROCESSES`` ranks of this script; the JSON rank 0 wrote."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    marker = uuid.uuid4().hex
    env[MARKER] = marker
    fd, result = tempfile.mkstemp(prefix="bench_fsdp_", suffix=".json")
    os.close(fd)
    os.unlink(result)  # rank 0 creates it: its absence means the arm did not finish
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(PROCESSES),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        arm,
        "--config",
        json.dumps(cfg),
        "--result",
        result,
    ]
    timeout = cfg["rank_timeout_s"] + 120  # the ranks time themselves out first
    launcher = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_launch(launcher, marker)
        raise RuntimeError(f"{arm}: no result after {timeout} s; killed the launch") from None
    except BaseException:  # Ctrl-C: the launch leads its own session, so the terminal's signal missed it
        _kill_launch(launcher, marker)
        raise
    left = _kill_launch(launcher, marker)  # an orphan rank must not outlive the launch
    try:
        if rc != 0:
            raise RuntimeError(f"{arm}: accelerate launch exited {rc}")
        if left:
            raise RuntimeError(f"{arm}: {left} process(es) outlived the launch; killed them")
        with open(result) as f:
            return json.load(f)
    finally:
        try:
            os.unlink(result)
        except OSError:
            pass


def predicted(n_s: int, n_t: int, vocab: int, hidden: int, world: int) -> dict:
    """Per-process MiB that theory predicts from the parameter counts (fp32, AdamW's 2 moments), activations and
    the reducer's chunks left out (the same in both arms: ``working_set``, measured, in the report)."""
    mib = 2**20
    vh = 4 * vocab * hidden  # bytes of one [V, H] fp32 matrix: an embedding, an lm_head
    ddp = {
        "student params + grads + AdamW moments (16 B/param)": 16 * n_s,
        "DDP gradient buckets (4 B/param: the Trainer leaves gradient_as_bucket_view off)": 4 * n_s,
        "teacher params (4 B/param)": 4 * n_t,
    }
    fsdp_state = {
        f"student 16 B/param / {world}": 16 * n_s / world,
        f"teacher 4 B/param / {world}": 4 * n_t / world,
    }
    fsdp_extra = {
        # accelerate (1.16) makes [final norm, lm_head] a unit with reshard_after_forward=False: whole from the
        # student's forward to the end of its backward.
        "student lm_head whole from forward to backward (accelerate's tail unit)": vh,
        # shard_frozen: the teacher's root unit holds embed_tokens + lm_head; FSDP2 all-gathers it into one
        # buffer and copies it out into the parameters' storages, both whole for a moment.
        "teacher root unit (embed + lm_head) all-gathered for its forward: buffer + copy-out": 2 * 2 * vh,
        "(at the loss instead) teacher lm_head gathered whole by the reducer": vh,
    }
    ddp_total = sum(ddp.values())
    fsdp_floor = sum(fsdp_state.values())
    fsdp_peak = fsdp_floor + vh + 2 * 2 * vh  # at the teacher root's all-gather, the larger of the two moments
    return {
        "ddp_mb": {k: round(v / mib, 1) for k, v in ddp.items()},
        "ddp_total_mb": round(ddp_total / mib, 1),
        "fsdp2_sharded_mb": {k: round(v / mib, 1) for k, v in fsdp_state.items()},
        "fsdp2_sharded_total_mb": round(fsdp_floor / mib, 1),
        "fsdp2_transient_mb": {k: round(v / mib, 1) for k, v in fsdp_extra.items()},
        "fsdp2_peak_mb": round(fsdp_peak / mib, 1),
        "ratio_sharded_only": round(fsdp_floor / ddp_total, 3),
        "ratio_with_transients": round(fsdp_peak / ddp_total, 3),
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "accelerate", "potstill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _arm_summary(r: dict, wall: float) -> dict:
    return {
        "peak_mem_mb_max_over_ranks": max(x["peak_mem_mb"] for x in r["ranks"]),
        "step_time_s_max_over_ranks": max(x["step_time_s"] for x in r["ranks"]),
        "student_sharded": all(x["student_sharded"] for x in r["ranks"]),
        "teacher_sharded": all(x["teacher_sharded"] for x in r["ranks"]),
        "ranks": r["ranks"],
        "wall_s": round(wall, 1),
    }


def _compare(results: dict) -> tuple[dict, dict]:
    """fsdp2 / ddp ratios and the checks that the two arms ran what they should."""
    D, F = results.get("ddp"), results.get("fsdp2")
    if not (D and F):
        return {}, {}
    ratios = {
        "mem": round(F["peak_mem_mb_max_over_ranks"] / D["peak_mem_mb_max_over_ranks"], 3),
        "step_time": round(F["step_time_s_max_over_ranks"] / D["step_time_s_max_over_ranks"], 3),
    }
    # Same weights, same rows per rank, before any update: the first step's loss must agree.
    d0 = [x["losses"][0] for x in D["ranks"]]
    f0 = [x["losses"][0] for x in F["ranks"]]
    checks = {
        "first_step_loss": {"ddp": d0, "fsdp2": f0},
        "first_step_loss_max_rel_diff": max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(d0, f0)),
        "fsdp2_student_and_teacher_sharded": F["student_sharded"] and F["teacher_sharded"],
        "ddp_nothing_sharded": not (D["student_sharded"] or D["teacher_sharded"]),
    }
    return ratios, checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (about a minute)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 2; quick 1)")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; with --quick a temp file)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=128 * 1024,
        help="the second pass's MALLOC_MMAP_THRESHOLD_ in bytes (default 131072)",
    )
    p.add_argument("--no-mmap-pass", action="store_true", help="skip the second pass (fixed mmap threshold)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        worker(a.worker, json.loads(a.config), a.result)
        return 0

    cfg = {**(QUICK if a.quick else FULL)}
    cfg.update(
        steps=a.steps if a.steps is not None else (2 if a.quick else 5),
        warmup=a.warmup if a.warmup is not None else (1 if a.quick else 2),
        seed=a.seed,
        lr=5e-5,
        dtype="float32",
        processes=PROCESSES,
    )
    arms = [x for x in a.arms.split(",") if x]
    for x in arms:
        if x not in ARMS:
            p.error(f"unknown arm {x!r}")
    passes = {"glibc_default": {}}
    if not a.no_mmap_pass:
        passes["fixed_mmap_threshold"] = {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)}
    out_path = Path(a.out) if a.out else (Path(tempfile.gettempdir()) / "fsdp.quick.json" if a.quick else DEFAULT_OUT)

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    runs: dict[str, dict] = {}
    for name, env_extra in passes.items():
        runs[name] = {}
        for arm in arms:
            t0 = time.perf_counter()
            res = runs[name][arm] = _arm_summary(run_arm(arm, cfg, env_extra=env_extra), time.perf_counter() - t0)
            print(
                f"[fsdp] {name} {arm}: peak +{res['peak_mem_mb_max_over_ranks']} MB per process (max over ranks), "
                f"step {res['step_time_s_max_over_ranks']} s, student sharded {res['student_sharded']}, teacher "
                f"sharded {res['teacher_sharded']} [{res['wall_s']:.0f} s wall]",
                flush=True,
            )

    main_runs = runs["glibc_default"]
    r0 = next(iter(main_runs.values()))["ranks"][0]
    pred = predicted(
        r0["n_params"]["student"],
        r0["n_params"]["teacher"],
        cfg["vocab_size"],
        cfg["student"]["hidden_size"],
        PROCESSES,
    )
    ratios, targets, checks = {}, {}, {}
    for name, rr in runs.items():
        r, c = _compare(rr)
        suffix = "" if name == "glibc_default" else "_" + name
        ratios.update({f"fsdp2_over_ddp_{k}{suffix}": v for k, v in r.items()})
        if c:
            checks[name] = c
        if "mem" in r:
            targets[f"fsdp2_mem_le_{TARGET_MEM_RATIO}x_ddp{suffix}"] = r["mem"] <= TARGET_MEM_RATIO
    if "ddp" in main_runs:
        ratios["predicted_sharded_only"] = pred["ratio_sharded_only"]
        ratios["predicted_with_transients"] = pred["ratio_with_transients"]
    measured_vs_predicted = {}
    for name, rr in runs.items():
        m = {}
        if "ddp" in rr:
            m["ddp_measured_mb"] = rr["ddp"]["peak_mem_mb_max_over_ranks"]
            m["ddp_working_set_mb (measured - predicted: activations, reducer chunks, allocator)"] = round(
                m["ddp_measured_mb"] - pred["ddp_total_mb"], 1
            )
        if "fsdp2" in rr:
            m["fsdp2_measured_mb"] = rr["fsdp2"]["peak_mem_mb_max_over_ranks"]
            m["fsdp2_measured_minus_predicted_mb"] = round(m["fsdp2_measured_mb"] - pred["fsdp2_peak_mb"], 1)
        measured_vs_predicted[name] = m

    report = {
        "benchmark": "fsdp",
        "config": cfg,
        "memory_metric": (
            "Per process (rank): peak_mem_mb = peak RSS (VmHWM, reset via /proc/self/clear_refs right before the "
            "models are built; the process group is up and the libraries are imported by then) minus the RSS at "
            "that moment. It covers building both models, sharding, the Trainer, and all warmup + measured steps. "
            "The memory ratio is fsdp2 / ddp of the max over ranks. phase_peak_mem_mb is the same quantity per "
            "phase of the step, sampled every 2 ms. Theory: DDP holds on every process the whole student's "
            "parameters, gradients and both AdamW moments (16 bytes/param), DDP's gradient buckets (another 4 "
            "bytes/param: the Trainer leaves gradient_as_bucket_view off), and the whole frozen teacher (4 "
            "bytes/param). FSDP2 on 2 processes holds half of the student's 16 bytes/param and half of the "
            "teacher's 4, plus what it gathers whole for a while: each decoder layer in turn; the student's "
            "lm_head from its forward to its backward (accelerate's [norm, lm_head] unit does not reshard after "
            "forward); the teacher's root unit (embeddings + lm_head, shard_frozen) during the teacher's forward, "
            "as an all-gather buffer plus the copies in the parameters; and the teacher's lm_head, gathered whole "
            "by potstill's chunked reducer. 'predicted' gives these from the parameter counts; activations and "
            "the reducer's chunks are left out (the same in both arms). RSS is what the kernel sees: memory glibc "
            "malloc keeps after a free (its heap; its mmap threshold rises after large frees) still counts. The "
            "'fixed_mmap_threshold' pass reruns both arms with MALLOC_MMAP_THRESHOLD_ set, so that every block "
            "above it is its own mmap, returned on free: RSS then follows the live tensors. The target is judged "
            "on the default (glibc_default) pass; held_in_tensors_mb is what the rank's tensors hold after the run."
        ),
        "arms": main_runs,
        **{f"arms_{name}": rr for name, rr in runs.items() if name != "glibc_default"},
        "malloc_env": passes,
        "predicted": pred,
        "measured_vs_predicted": measured_vs_predicted,
        "ratios": ratios,
        "target": {"fsdp2_over_ddp_mem_max": TARGET_MEM_RATIO, "judged_on": "glibc_default"},
        "targets_met": targets,
        "checks": checks,
        **_versions(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        # Step times are only comparable on an otherwise idle machine; this says how idle it was.
        "loadavg_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(),
    }
    write_json_atomic(out_path, report)
    print(
        f"[fsdp] predicted per process: ddp {pred['ddp_total_mb']} MB, fsdp2 {pred['fsdp2_sharded_total_mb']} MB "
        f"sharded, {pred['fsdp2_peak_mb']} MB at its largest gather (activations and reducer chunks excluded)",
        flush=True,
    )
    print(f"[fsdp] wrote {out_path}")
    print(summary_line("fsdp", {**ratios, **{k: ("yes" if v else "NO") for k, v in targets.items()}}), flush=True)
    return 1 if a.strict and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
