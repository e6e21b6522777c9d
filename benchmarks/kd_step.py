"""One logit-KD training step on CPU: potstill's KDTrainer vs a naive step, the floor, and TRL GKD.

Claim measured (all arms in one run, same seed, same models, same batch):

* (a) ``kdtrainer_chunked``: ``potstill.kd.KDTrainer``, forward KL (alpha=0, T=1), the fused
  chunked lm_head + loss reducer; the full ``Trainer`` step (forward, backward, grad-norm
  clip, AdamW step, zero_grad), timed from ``on_step_begin`` to ``on_step_end``.
* (b) ``naive``: a plain PyTorch step with the full ``[B, T, V]`` logits of student and
  teacher, ``log_softmax`` of both and ``F.kl_div(..., log_target=True)`` over all
  ``B*T`` positions, masked and divided by the number of label tokens.
* (c) ``floor``: a plain SFT step (``student(..., labels=labels).loss``, HF cross-entropy
  over full logits) plus ``with torch.no_grad(): teacher(input_ids)`` -- the teacher forward
  *includes* its full ``[B, T, V]`` logits, which are discarded. The cheapest thing a KD
  step could do: one student step and one teacher forward.
* (d) ``trl_gkd``: ``trl.experimental.gkd.GKDTrainer`` with lmbda=0 (no on-policy generation),
  beta=0 (forward KL), bf16 off, gradient checkpointing off; timed like (a).

The plain-loop arms (b, c) mirror what ``Trainer`` does per step: backward, clip the grad
norm to ``max_grad_norm=1.0``, the Trainer's default optimizer (``AdamW``, fused on CPU,
same lr/betas/eps), ``zero_grad(set_to_none=True)``.

Memory: each arm runs in its own fresh subprocess. After models, data (and, for a/d, the
trainer object) are built, the peak-RSS high-water mark is reset and the RSS recorded;
``peak_mem_mb`` is the peak RSS during all (warmup + measured) steps minus that baseline,
i.e. what the training step costs (gradients, AdamW state, activations, logits).
``peak_rss_mb`` is the absolute peak RSS during the steps (models included). The memory
ratios use ``peak_mem_mb``.

Loss check: arm (a)'s first-step loss must equal (b)'s (same weights, same batch, before
any update) to ~1e-5 relative; otherwise the benchmark compares different losses.

Usage: ``python benchmarks/kd_step.py [--steps 5] [--warmup 2] [--quick] [--out PATH]
[--chunk-sweep 256,512,1024,2048] [--profile]``. Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, median, run_worker, summary_line, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "kd_step.json"
ARMS = ("floor", "naive", "kdtrainer_chunked", "trl_gkd")

FULL = {
    "vocab_size": 49152,
    "teacher": {"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4},
    "student": {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4},
    "batch_size": 4,
    "seq_len": 256,
    "prompt_len": 64,
}
QUICK = {
    "vocab_size": 2048,
    "teacher": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2},
    "student": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
    "batch_size": 2,
    "seq_len": 32,
    "prompt_len": 8,
}
TARGET_TIME_VS_FLOOR = 1.10
TARGET_MEM_VS_TRL = 0.6
LOSS_RTOL = 1e-4  # pass/fail bound; the measured relative difference is reported as is


# ----------------------------------------------------------------------------- setup (worker side)


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

    # Separate seeds per model, so each arm gets bit-identical weights whatever it builds first.
    return make(cfg["student"], cfg["seed"]), make(cfg["teacher"], cfg["seed"] + 1)


def make_batch(cfg: dict) -> dict:
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 2)
    b, t = cfg["batch_size"], cfg["seq_len"]
    input_ids = torch.randint(3, cfg["vocab_size"], (b, t), generator=g)
    labels = input_ids.clone()
    labels[:, : cfg["prompt_len"]] = -100  # the "prompt": no loss there
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _tokenizer():
    """A 3-token tokenizer built in memory: TRL's SFTTrainer insists on a processing_class."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _dataset(batch: dict):
    """The batch as a ``datasets.Dataset`` of rows (TRL's SFTTrainer accepts nothing else)."""
    from datasets import Dataset

    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")


def _stack(rows: list[dict]) -> dict:
    import torch

    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _common_args(cfg: dict, out_dir: str) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["warmup"] + cfg["steps"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=cfg["seed"],
    )


# ----------------------------------------------------------------------------- arms


def _trainer_arm(trainer_cls, make_trainer, cfg: dict) -> dict:
    """Run a Trainer for warmup + steps; time on_step_begin..on_step_end; record losses."""
    from transformers import TrainerCallback

    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    class Recording(trainer_cls):
        # Records the loss compute_loss returns (a float() of a CPU scalar: no measurable cost).
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(Recording, out_dir)
        trainer.add_callback(Timer())
        with PeakRSS() as mem:
            trainer.train()
    return {"times": times, "losses": losses, "mem": mem.as_dict()}


def arm_kdtrainer_chunked(cfg, student, teacher, batch) -> dict:
    from potstill.kd.logit import KDConfig, KDTrainer

    if cfg["chunk_size"] is None:
        cfg["chunk_size"] = KDConfig.__dataclass_fields__["chunk_size"].default

    def make(cls, out_dir):
        args = KDConfig(
            **_common_args(cfg, out_dir),
            alpha=0.0,
            divergence="forward_kl",
            temperature=1.0,
            chunk_size=cfg["chunk_size"],
        )
        return cls(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(batch), data_collator=_stack)

    return _trainer_arm(KDTrainer, make, cfg)


def arm_trl_gkd(cfg, student, teacher, batch) -> dict:
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    def make(cls, out_dir):
        args = GKDConfig(
            **_common_args(cfg, out_dir),
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            bf16=False,
            gradient_checkpointing=False,
            max_length=None,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        return cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=_dataset(batch),
            data_collator=_stack,
            processing_class=_tokenizer(),
        )

    return _trainer_arm(GKDTrainer, make, cfg)


def _plain_loop(cfg, student, loss_fn) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(**_common_args(cfg, out_dir))
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)  # the Trainer's own optimizer
    opt = opt_cls(student.parameters(), **opt_kwargs)
    student.train()
    times: list[float] = []
    losses: list[float] = []
    with PeakRSS() as mem:
        for _ in range(cfg["warmup"] + cfg["steps"]):
            t0 = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), targs.max_grad_norm)
            opt.step()
            student.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            del loss
    return {"times": times, "losses": losses, "mem": mem.as_dict()}


def arm_naive(cfg, student, teacher, batch) -> dict:
    import torch
    import torch.nn.functional as F

    teacher.eval().requires_grad_(False)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    v = cfg["vocab_size"]

    def loss_fn():
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=am).logits
        s_logits = student(input_ids=ids, attention_mask=am).logits
        s = F.log_softmax(s_logits[:, :-1].reshape(-1, v).float(), dim=-1)
        t = F.log_softmax(t_logits[:, :-1].reshape(-1, v).float(), dim=-1)
        kl = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # KL(p_teacher || q_student) per position
        mask = (labels[:, 1:] != -100).reshape(-1)
        return (kl * mask).sum() / mask.sum().clamp_min(1)

    return _plain_loop(cfg, student, loss_fn)


def arm_floor(cfg, student, teacher, batch) -> dict:
    import torch

    teacher.eval().requires_grad_(False)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def loss_fn():
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=am)  # full [B, T, V] logits, discarded
        return student(input_ids=ids, attention_mask=am, labels=labels).loss

    return _plain_loop(cfg, student, loss_fn)


ARM_FNS = {
    "floor": arm_floor,
    "naive": arm_naive,
    "kdtrainer_chunked": arm_kdtrainer_chunked,
    "trl_gkd": arm_trl_gkd,
}


def profile(cfg: dict) -> dict:
    """Where (a)'s time goes vs the floor: each piece timed alone (median of steps)."""
    import torch
    import torch.nn.functional as F

    from potstill.divergences import chunked_kd_loss
    from potstill.models import final_hidden, output_head
    from potstill.signals import OnlineTeacher, target_index, target_rows

    from potstill.kd.logit import KDConfig

    if cfg["chunk_size"] is None:
        cfg["chunk_size"] = KDConfig.__dataclass_fields__["chunk_size"].default
    student, teacher = build_models(cfg)
    batch = make_batch(cfg)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    online = OnlineTeacher(teacher)
    student.train()
    n_rep = cfg["warmup"] + cfg["steps"]

    def timed(fn):
        ts = []
        for i in range(n_rep):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return round(median(ts[cfg["warmup"]:]), 4)

    out: dict = {}
    with torch.no_grad():
        out["teacher_forward_full_logits"] = timed(lambda: teacher(input_ids=ids, attention_mask=am))
        out["teacher_body_only (OnlineTeacher.signal)"] = timed(lambda: online.signal(batch))

    def student_body_fwd_bwd():
        h = final_hidden(student, ids, am)
        h.sum().backward()
        student.zero_grad(set_to_none=True)

    out["student_body_fwd_bwd"] = timed(student_body_fwd_bwd)

    def student_sft_fwd_bwd():
        student(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        student.zero_grad(set_to_none=True)

    out["student_sft_fwd_bwd (HF CE, full logits)"] = timed(student_sft_fwd_bwd)

    signal = online.signal(batch)
    index = target_index(labels)
    targets = labels[:, 1:].reshape(-1).index_select(0, index)
    h_rows = torch.randn(index.numel(), student.config.hidden_size, requires_grad=True)
    head = output_head(student)
    for cs in cfg["profile_chunks"]:
        def loss_only(cs=cs):
            loss, _ = chunked_kd_loss(h_rows, head, targets, signal, alpha=0.0, normalizer=index.numel(), chunk_size=cs)
            loss.backward()
            h_rows.grad = None
            student.zero_grad(set_to_none=True)

        out[f"chunked_kd_loss fwd+bwd (chunk {cs})"] = timed(loss_only)

    def ce_only():
        logits = F.linear(h_rows, head.weight)
        F.cross_entropy(logits, targets).backward()
        h_rows.grad = None
        student.zero_grad(set_to_none=True)

    out["CE over head only, same rows (floor's loss part)"] = timed(ce_only)

    # A top-ops table for one KDTrainer-equivalent step (student body + teacher body + chunked loss).
    from torch.profiler import ProfilerActivity, profile as tprofile

    def kd_step():
        hidden = final_hidden(student, ids, am)
        rows = target_rows(hidden, index)
        sig = online.signal(batch)
        loss, _ = chunked_kd_loss(rows, head, targets, sig, alpha=0.0, normalizer=index.numel(), chunk_size=cfg["chunk_size"])
        loss.backward()
        student.zero_grad(set_to_none=True)

    kd_step()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        kd_step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(table, flush=True)
    out["top_ops_self_cpu"] = [
        {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    return out


def worker(arm: str, cfg: dict, result_path: str) -> None:
    import torch

    if arm == "profile":
        res = profile(cfg)
    else:
        student, teacher = build_models(cfg)
        batch = make_batch(cfg)
        raw = ARM_FNS[arm](cfg, student, teacher, batch)
        w = cfg["warmup"]
        times = raw["times"]
        if len(times) != cfg["warmup"] + cfg["steps"] or len(raw["losses"]) != len(times):
            raise RuntimeError(f"{arm}: got {len(times)} step times and {len(raw['losses'])} losses")
        res = {
            "step_time_s": round(median(times[w:]), 4),
            "step_times_s": [round(t, 4) for t in times[w:]],
            "step_time_min_s": round(min(times[w:]), 4),
            "warmup_times_s": [round(t, 4) for t in times[:w]],
            **raw["mem"],
            "loss": raw["losses"][0],
            "losses": raw["losses"],
            "threads": torch.get_num_threads(),
            **({"chunk_size": cfg["chunk_size"]} if arm == "kdtrainer_chunked" else {}),
        }
    with open(result_path, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- driver


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "potstill"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 2; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (< 60 s)")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; with --quick a temp file)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--chunk-size", type=int, default=None, help="KDConfig.chunk_size for arm (a) (default: KDConfig's)")
    p.add_argument("--chunk-sweep", default="", help="also time arm (a) at these chunk sizes, e.g. 256,512,1024,2048")
    p.add_argument("--profile", action="store_true", help="also time the pieces of (a) vs the floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        worker(a.worker, json.loads(a.config), a.result)
        return 0

    cfg = dict(QUICK if a.quick else FULL)
    cfg.update(
        steps=a.steps if a.steps is not None else (2 if a.quick else 5),
        warmup=a.warmup if a.warmup is not None else (1 if a.quick else 2),
        seed=a.seed,
        lr=5e-5,
        chunk_size=a.chunk_size,  # None: KDConfig's default, resolved in the worker
        dtype="float32",
        device="cpu",
        profile_chunks=[int(c) for c in (a.chunk_sweep or "256,512,1024,2048").split(",")],
    )
    cfg["n_loss_tokens"] = cfg["batch_size"] * (cfg["seq_len"] - cfg["prompt_len"])
    out_path = Path(a.out) if a.out else (Path(tempfile.gettempdir()) / "kd_step.quick.json" if a.quick else DEFAULT_OUT)
    arms = [x for x in a.arms.split(",") if x]
    for x in arms:
        if x not in ARMS:
            p.error(f"unknown arm {x!r}")

    def run(arm: str, c: dict) -> dict:
        t0 = time.perf_counter()
        res = run_worker(__file__, ["--worker", arm, "--config", json.dumps(c)], timeout=900)
        print(
            f"[kd_step] {arm}: step {res.get('step_time_s')} s {res.get('step_times_s')}, "
            f"peak +{res.get('peak_mem_mb')} MB (abs {res.get('peak_rss_mb')} MB), loss0 {res.get('loss')!r} "
            f"[{time.perf_counter() - t0:.0f} s wall]",
            flush=True,
        )
        return res

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    results = {arm: run(arm, cfg) for arm in arms}

    sweep = {}
    for cs in [int(c) for c in a.chunk_sweep.split(",") if c]:
        if "kdtrainer_chunked" in results and cs == results["kdtrainer_chunked"]["chunk_size"]:
            r = results["kdtrainer_chunked"]
        else:
            r = run("kdtrainer_chunked", {**cfg, "chunk_size": cs})
        sweep[str(cs)] = {k: r[k] for k in ("step_time_s", "step_times_s", "peak_mem_mb", "peak_rss_mb", "loss")}

    prof = run_worker(__file__, ["--worker", "profile", "--config", json.dumps(cfg)], timeout=900) if a.profile else None

    A, B, C, D = (results.get(k) for k in ("kdtrainer_chunked", "naive", "floor", "trl_gkd"))
    if A and cfg["chunk_size"] is None:
        cfg["chunk_size"] = A["chunk_size"]
    ratios, targets, loss_check = {}, {}, {}
    if A and C:
        ratios["a_over_floor_time"] = round(A["step_time_s"] / C["step_time_s"], 3)
        targets["a_time_le_1.10x_floor"] = ratios["a_over_floor_time"] <= TARGET_TIME_VS_FLOOR
    if A and D:
        ratios["a_over_trl_time"] = round(A["step_time_s"] / D["step_time_s"], 3)
        ratios["a_over_trl_mem"] = round(A["peak_mem_mb"] / D["peak_mem_mb"], 3)
        ratios["a_over_trl_rss"] = round(A["peak_rss_mb"] / D["peak_rss_mb"], 3)
        targets["a_mem_le_0.6x_trl"] = ratios["a_over_trl_mem"] <= TARGET_MEM_VS_TRL
    if A and B:
        ratios["a_over_naive_time"] = round(A["step_time_s"] / B["step_time_s"], 3)
        ratios["a_over_naive_mem"] = round(A["peak_mem_mb"] / B["peak_mem_mb"], 3)
        ratios["a_over_naive_rss"] = round(A["peak_rss_mb"] / B["peak_rss_mb"], 3)
        targets["a_mem_lt_naive"] = A["peak_mem_mb"] < B["peak_mem_mb"]
    if B and C:
        ratios["naive_over_floor_time"] = round(B["step_time_s"] / C["step_time_s"], 3)
    if D and C:
        ratios["trl_over_floor_time"] = round(D["step_time_s"] / C["step_time_s"], 3)
    if A and B:
        loss_check["a_vs_naive_rel_diff"] = _rel(A["loss"], B["loss"])
        targets["loss_a_matches_naive"] = loss_check["a_vs_naive_rel_diff"] <= LOSS_RTOL
    if D and B:
        loss_check["trl_vs_naive_rel_diff"] = _rel(D["loss"], B["loss"])
    if A and D:
        loss_check["a_vs_trl_rel_diff"] = _rel(A["loss"], D["loss"])
    loss_check["first_step_loss"] = {k: v["loss"] for k, v in results.items() if k != "floor"}
    loss_check["rtol"] = LOSS_RTOL

    report = {
        "benchmark": "kd_step",
        "config": {k: v for k, v in cfg.items() if k != "profile_chunks"},
        "memory_metric": (
            "peak_mem_mb = peak RSS during the training steps minus the RSS right before them (models, data and "
            "trainer already built; peak reset via /proc/self/clear_refs); peak_rss_mb = absolute peak RSS during "
            "the steps. Memory ratios use peak_mem_mb; *_rss ratios use peak_rss_mb."
        ),
        "arms": results,
        "ratios": ratios,
        "targets": {"a_over_floor_time_max": TARGET_TIME_VS_FLOOR, "a_over_trl_mem_max": TARGET_MEM_VS_TRL},
        "targets_met": targets,
        "loss_check": loss_check,
        **({"chunk_sweep": sweep} if sweep else {}),
        **({"profile": prof} if prof else {}),
        **_versions(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        # Step times are only comparable on an otherwise idle machine; this says how idle it was.
        "loadavg_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(),
    }
    write_json_atomic(out_path, report)

    if loss_check.get("first_step_loss"):
        print("[kd_step] first-step loss: " + ", ".join(f"{k}={v!r}" for k, v in loss_check["first_step_loss"].items()))
    if prof:
        print("[kd_step] profile: " + json.dumps({k: v for k, v in prof.items() if k != "top_ops_self_cpu"}))
    if sweep:
        print("[kd_step] chunk sweep: " + ", ".join(f"{k}: {v['step_time_s']} s / +{v['peak_mem_mb']} MB" for k, v in sweep.items()))
    print(f"[kd_step] wrote {out_path}")
    print(summary_line("kd_step", {**ratios, **{k: ("yes" if v else "NO") for k, v in targets.items()}}), flush=True)
    return 1 if a.strict and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
