"""GPU check: one logit-KD step on one CUDA GPU, potstill vs the floor, a naive step, TRL GKD and Liger.

Run it with the device tool, in one call (< 8 minutes on one bare H100 that has torch, transformers,
accelerate and peft; the rest travels as wheels). Here, in the repo root, once::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
      trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

(about 2.7 MB; liger-kernel's one other need, triton, is on the machine. If ``import datasets`` fails
there on an old pyarrow, add ``pyarrow==26.0.1`` (55 MB): only the TRL arm needs datasets.) Then one
device-tool call, ``run`` with ``carry=[".whl"]``, ``timeout_s=480`` and this ``command``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; export PYTHONPATH=$PYTHONPATH:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

and copy ``gpu_check.json`` from the reply's ``files_at`` to ``benchmarks/results/gpu_check.json``.
``python benchmarks/gpu_check.py --cpu-smoke`` runs every arm that can run on a CPU at tiny sizes
(< 1 minute), to prove the script end to end; it writes to a temp file.

Setup (all arms in one process, same seed, same weights, same batch): randomly initialised
Llama-shaped models in bf16, tied embeddings, vocab 128,256: teacher the shape of Llama-3.2-1B
(16 layers, hidden 2048, MLP 8192, 32 heads / 8 kv; 1.24 B parameters), student 8 layers,
hidden 1024, MLP 4096, 16 heads / 4 kv (0.25 B); batch 4 x 2048 random tokens, the first 256 of
each row a "prompt" (labels -100). One step = forward + backward + grad-norm clip 1.0 + the
Trainer's default optimizer (fused AdamW) + zero_grad. Forward KL, alpha = 0, T = 1.

| arm | what it is |
|-----|------------|
| ``floor`` | the student's SFT step with potstill's chunked CE (``chunked_kd_loss``, alpha = 1) + the teacher's ``no_grad`` forward with its full logits, discarded |
| ``potstill`` | KDTrainer's step without the Trainer around it: student body, ``OnlineTeacher.signal`` (teacher body), ``chunked_kd_loss`` at ``KDConfig.chunk_size``'s default |
| ``potstill_chunk1024`` | the same at chunk size 1024 |
| ``naive`` | full ``[B, T, V]`` logits of both, float32 ``log_softmax``, ``kl_div(log_target=True)``, masked mean |
| ``liger`` | as ``potstill`` with ``loss_backend="liger"`` (``liger_kd_loss``: Liger's fused linear JSD, beta 0, compiled, chunk 1024) |
| ``trl_gkd`` | ``trl.experimental.gkd.GKDTrainer`` (lmbda 0, beta 0 = forward KL, T = 1), timed from ``on_step_begin`` to ``on_step_end`` (includes its collation and host-to-device copy) |

* **Time**: CUDA-synchronized wall time per step; median and min over ``--steps`` (10) after
  ``--warmup`` (3; Liger's ``torch.compile`` happens there).
* **Memory**: ``torch.cuda.max_memory_allocated`` over the measured steps (peak reset after warmup);
  ``peak_over_base_gib`` subtracts what was allocated before the arm (both models): the step's own
  cost (gradients, optimizer state, activations, logits). Ratios use it.
* **Loss check**: every arm's first-step loss (same weights, before any update) against ``naive``.
* **Parity** (``bf16_vs_fp32``): on a slice of the batch's real hidden states (512 rows, both full
  heads), potstill's loss and gradients (student rows and head) in bf16 and in fp32 against a float64
  reference written here, for forward KL (alpha 0.2) and JSD (beta 0.5, T 2); Liger's too where it runs.
* **DeepSpeed**: a ZeRO-3 smoke of ``KDTrainer`` (2 steps, tiny models) only where ``deepspeed`` imports.

Arms that cannot run are recorded as ``{"skipped": reason}``; an arm that fails records its error and
the run goes on. The JSON is rewritten after every arm, so a run cut short still leaves its results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "src"))  # potstill from this checkout when it is not installed
from _common import median, summary_line, write_json_atomic  # noqa: E402

DEFAULT_OUT = HERE / "results" / "gpu_check.json"
GIB = float(1 << 30)

FULL = {
    "vocab_size": 128256,
    "teacher": {
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "student": {
        "num_hidden_layers": 8,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    },
    "batch_size": 4,
    "seq_len": 2048,
    "prompt_len": 256,
    "parity_rows": 512,
    "steps": 10,
    "warmup": 3,
    "time_budget_s": 420,
}
CPU_SMOKE = {
    "vocab_size": 512,
    "teacher": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "student": {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "batch_size": 2,
    "seq_len": 64,
    "prompt_len": 8,
    "parity_rows": 64,
    "steps": 2,
    "warmup": 1,
    "time_budget_s": 300,
}
TARGET_TIME_VS_FLOOR = 1.10  # kd_step.py's targets, for the potstill arm
TARGET_MEM_VS_TRL = 0.6
PARITY_TOL = {"float32": {"loss": 1e-4, "grad": 1e-3}, "bfloat16": {"loss": 2e-2, "grad": 5e-2}}


# ----------------------------------------------------------------------------- device helpers


class Device:
    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.type = name
        self.cuda = name == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def allocated(self) -> float | None:
        return self.torch.cuda.memory_allocated() / GIB if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def _round(x, nd=4):
    return None if x is None else round(float(x), nd)


# ----------------------------------------------------------------------------- setup


def build_models(cfg: dict, dev: Device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, cfg["dtype"])

    def make(spec: dict, seed: int):
        conf = LlamaConfig(
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=max(4096, cfg["seq_len"]),
            tie_word_embeddings=True,
            use_cache=False,
            **spec,
        )
        torch.manual_seed(seed)
        with torch.device(dev.type):  # initialise on the GPU: a CPU init of 1.2 B parameters takes minutes
            model = LlamaForCausalLM(conf)
        return model.to(dtype)

    student, teacher = make(cfg["student"], cfg["seed"]), make(cfg["teacher"], cfg["seed"] + 1)
    teacher.eval().requires_grad_(False)
    return student, teacher


def make_batch(cfg: dict, dev: Device) -> dict:
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 2)
    b, t = cfg["batch_size"], cfg["seq_len"]
    ids = torch.randint(3, cfg["vocab_size"], (b, t), generator=g)
    labels = ids.clone()
    labels[:, : cfg["prompt_len"]] = -100
    return {
        k: v.to(dev.type)
        for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()
    }


def _n_params(m) -> int:
    return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


def _training_args(cfg: dict, out_dir: str, dev: Device) -> dict:
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
        use_cpu=not dev.cuda,
        dataloader_num_workers=0,
        seed=cfg["seed"],
    )


def _optimizer(cfg: dict, model, dev: Device):
    """The Trainer's own default optimizer (fused AdamW), so the plain arms match the TRL arm."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as d:
        targs = TrainingArguments(**_training_args(cfg, d, dev))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


# ----------------------------------------------------------------------------- arms


def _plain_loop(cfg: dict, dev: Device, student, loss_fn) -> dict:
    import torch

    opt = _optimizer(cfg, student, dev)
    student.train()
    times, losses = [], []
    dev.sync()
    base = dev.allocated()
    for i in range(cfg["warmup"] + cfg["steps"]):
        if i == cfg["warmup"]:
            dev.sync()
            dev.reset_peak()
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dev.sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        del loss
    peak = dev.peak()
    del opt
    return _arm_result(cfg, times, losses, base, peak)


def _arm_result(cfg: dict, times: list, losses: list, base, peak) -> dict:
    w = cfg["warmup"]
    return {
        "step_time_s": _round(median(times[w:])),
        "step_time_min_s": _round(min(times[w:])),
        "step_times_s": [_round(t) for t in times[w:]],
        "warmup_times_s": [_round(t, 3) for t in times[:w]],
        "peak_gib": _round(peak, 3),
        "base_gib": _round(base, 3),
        "peak_over_base_gib": None if peak is None else _round(peak - base, 3),
        "loss": losses[0],
        "losses": [_round(x, 6) for x in losses],
    }


def _kd_pieces(student, teacher, batch):
    from potstill.models import final_hidden, output_head
    from potstill.signals import OnlineTeacher, target_index, target_rows

    index = target_index(batch["labels"])
    targets = batch["labels"][:, 1:].reshape(-1).index_select(0, index)
    online = OnlineTeacher(teacher)

    def student_rows():
        return target_rows(final_hidden(student, batch["input_ids"], batch["attention_mask"]), index)

    return index, targets, online, student_rows, output_head


def arm_floor(cfg, dev, student, teacher, batch):
    import torch

    from potstill.divergences import chunked_kd_loss

    index, targets, _, student_rows, output_head = _kd_pieces(student, teacher, batch)

    def loss_fn():
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # full logits, discarded
        loss, _ = chunked_kd_loss(
            student_rows(),
            output_head(student),
            targets,
            None,
            alpha=1.0,
            normalizer=index.numel(),
            chunk_size=cfg["chunk_size"],
        )
        return loss

    return _plain_loop(cfg, dev, student, loss_fn)


def _kd_arm(cfg, dev, student, teacher, batch, loss_impl, chunk_size, **extra):
    index, targets, online, student_rows, output_head = _kd_pieces(student, teacher, batch)

    def loss_fn():
        signal = online.signal(batch)
        loss, _ = loss_impl(
            student_rows(),
            output_head(student),
            targets,
            signal,
            divergence="forward_kl",
            alpha=0.0,
            temperature=1.0,
            normalizer=index.numel(),
            chunk_size=chunk_size,
            **extra,
        )
        return loss

    out = _plain_loop(cfg, dev, student, loss_fn)
    out["chunk_size"] = chunk_size
    return out


def arm_potstill(cfg, dev, student, teacher, batch):
    from potstill.divergences import chunked_kd_loss

    return _kd_arm(cfg, dev, student, teacher, batch, chunked_kd_loss, cfg["chunk_size"])


def arm_potstill_chunk1024(cfg, dev, student, teacher, batch):
    from potstill.divergences import chunked_kd_loss

    return _kd_arm(cfg, dev, student, teacher, batch, chunked_kd_loss, 1024)


def arm_liger(cfg, dev, student, teacher, batch):
    from potstill.divergences.liger import liger_kd_loss, require_liger

    require_liger(dev.type)  # RuntimeError -> recorded as skipped
    return _kd_arm(cfg, dev, student, teacher, batch, liger_kd_loss, 1024, compiled=True)


def arm_naive(cfg, dev, student, teacher, batch):
    import torch
    import torch.nn.functional as F

    v = cfg["vocab_size"]
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    mask = (labels[:, 1:] != -100).reshape(-1)

    def loss_fn():
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=am).logits
        s_logits = student(input_ids=ids, attention_mask=am).logits
        s = F.log_softmax(s_logits[:, :-1].reshape(-1, v).float(), dim=-1)
        t = F.log_softmax(t_logits[:, :-1].reshape(-1, v).float(), dim=-1)
        kl = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)  # KL(p_teacher || q_student) per position
        return (kl * mask).sum() / mask.sum().clamp_min(1)

    return _plain_loop(cfg, dev, student, loss_fn)


def _tokenizer():
    """A 3-token tokenizer built in memory: TRL insists on a processing_class."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def arm_trl_gkd(cfg, dev, student, teacher, batch):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = Dataset.from_dict({k: v.cpu().tolist() for k, v in batch.items()}).with_format("torch")
    times, losses, marks = [], [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            dev.sync()
            if len(times) == cfg["warmup"]:
                dev.reset_peak()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dev.sync()
            times.append(time.perf_counter() - self.t0)

    class Recording(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    with tempfile.TemporaryDirectory() as out_dir:
        args = GKDConfig(
            **_training_args(cfg, out_dir, dev),
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            bf16=False,
            gradient_checkpointing=False,
            max_length=None,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        trainer = Recording(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            data_collator=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]},
            processing_class=_tokenizer(),
        )
        trainer.add_callback(Timer())
        dev.sync()
        marks["base"] = dev.allocated()
        trainer.train()
        peak = dev.peak()
        del trainer
    if len(times) != cfg["warmup"] + cfg["steps"]:
        raise RuntimeError(f"GKDTrainer ran {len(times)} steps, expected {cfg['warmup'] + cfg['steps']}")
    return _arm_result(cfg, times, losses, marks["base"], peak)


# ----------------------------------------------------------------------------- bf16 vs fp32 parity


def _reference64(h, w_s, h_t, w_t, y, *, divergence, alpha, temperature, beta=0.5):
    """float64 CE + divergence, summed over rows / rows, from the definitions (not potstill's code)."""
    import torch

    z = h.double() @ w_s.double().T
    with torch.no_grad():
        zt = h_t.double() @ w_t.double().T
    ce = -torch.log_softmax(z, -1).gather(-1, y[:, None]).sum()
    lq, lp = torch.log_softmax(z / temperature, -1), torch.log_softmax(zt / temperature, -1)
    q, p = lq.exp(), lp.exp()
    if divergence == "forward_kl":
        d = (p * (lp - lq)).sum()
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        d = (beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)).sum()
    return (alpha * ce + (1 - alpha) * d) / y.shape[0]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parity(cfg, dev, student, teacher, batch) -> dict:
    """potstill's (and Liger's) loss and gradients in bf16 and fp32 vs a float64 reference, on real rows."""
    import torch

    from potstill.divergences import chunked_kd_loss
    from potstill.divergences.liger import liger_available, liger_kd_loss
    from potstill.signals.types import DenseSignal, Head

    index, targets, online, student_rows, output_head = _kd_pieces(student, teacher, batch)
    m = min(cfg["parity_rows"], index.numel())
    with torch.no_grad():
        h_s = student_rows()[:m].detach()
        h_t = online.signal(batch).hidden[:m]
    w_s, w_t, y = output_head(student).weight.detach(), output_head(teacher).weight.detach(), targets[:m]
    impls = {"potstill": chunked_kd_loss}
    if dev.cuda and liger_available():
        impls["liger"] = lambda *a, **k: liger_kd_loss(*a, compiled=False, **k)
    cases = {
        "forward_kl_alpha0.2": dict(divergence="forward_kl", alpha=0.2, temperature=1.0),
        "jsd0.5_T2": dict(divergence="generalized_jsd", alpha=0.0, temperature=2.0),
    }
    out: dict = {"rows": m, "tolerance_rel": PARITY_TOL}
    ok = True
    for case, kw in cases.items():
        hs = h_s.double().requires_grad_(True)
        ws = w_s.double().requires_grad_(True)
        ref = _reference64(hs, ws, h_t, w_t, y, **kw)
        g_ref = torch.autograd.grad(ref, [hs, ws])
        del hs, ws
        res = {"reference_loss_fp64": float(ref.detach())}
        for name, fn in impls.items():
            for dtype in (torch.float32, torch.bfloat16):
                hs = h_s.to(dtype).requires_grad_(True)
                ws = w_s.to(dtype).requires_grad_(True)
                sig = DenseSignal(hidden=h_t.to(dtype), head=Head(weight=w_t.to(dtype)))
                div_kw = {"beta": 0.5} if kw["divergence"] == "generalized_jsd" else {}
                loss, _ = fn(
                    hs,
                    Head(weight=ws),
                    y,
                    sig,
                    divergence=kw["divergence"],
                    divergence_kwargs=div_kw,
                    alpha=kw["alpha"],
                    temperature=kw["temperature"],
                    normalizer=m,
                    chunk_size=cfg["chunk_size"],
                )
                gh, gw = torch.autograd.grad(loss, [hs, ws])
                key = str(dtype).removeprefix("torch.")
                r = {
                    "loss_rel": _rel(loss.detach(), ref.detach()),
                    "grad_rows_rel": _rel(gh, g_ref[0]),
                    "grad_head_rel": _rel(gw, g_ref[1]),
                }
                tol = PARITY_TOL[key]
                r["ok"] = r["loss_rel"] <= tol["loss"] and max(r["grad_rows_rel"], r["grad_head_rel"]) <= tol["grad"]
                ok = ok and r["ok"]
                res[f"{name}_{key}"] = {k: (_round(v, 8) if isinstance(v, float) else v) for k, v in r.items()}
                del hs, ws, sig, loss, gh, gw
                dev.free()
        out[case] = res
    out["ok"] = ok
    if "liger" not in impls:
        out["liger"] = "skipped: " + ("no CUDA" if not dev.cuda else "liger-kernel not importable")
    return out


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3 smoke


def deepspeed_smoke(cfg: dict, dev: Device) -> dict:
    """KDTrainer under ZeRO-3 for 2 steps on tiny models, in a child process (DeepSpeed keeps global state)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not importable (not carried: PyPI has no binary wheel of it)"}
    if not dev.cuda:
        return {"skipped": "ZeRO-3 needs CUDA"}
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--deepspeed-worker", path], env=env, timeout=240, capture_output=True, text=True
        )
        if proc.returncode != 0:
            return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
        return json.loads(Path(path).read_text())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out after 240 s"}
    finally:
        os.unlink(path)


def deepspeed_worker(path: str) -> None:
    import math

    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from potstill.kd import KDConfig, KDTrainer

    def make(layers, hidden, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=1024,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                use_cache=False,
            )
        )

    student, teacher = make(1, 64, 0), make(2, 128, 1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1024, (8, 64), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    rows = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    ).with_format("torch")
    ds = {
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    with tempfile.TemporaryDirectory() as d:
        args = KDConfig(
            output_dir=d,
            per_device_train_batch_size=4,
            max_steps=2,
            learning_rate=1e-4,
            bf16=True,
            deepspeed=ds,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            alpha=0.1,
        )
        tr = KDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            data_collator=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]},
        )
        out = tr.train()
    loss = float(out.training_loss)
    Path(path).write_text(json.dumps({"ok": math.isfinite(loss), "training_loss": loss, "steps": 2}))


# ----------------------------------------------------------------------------- driver


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "trl",
        "liger-kernel",
        "triton",
        "datasets",
        "deepspeed",
        "potstill",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _why_not_importable(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as err:  # a missing wheel, or one whose own needs are missing
        return f"{module} not importable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    return None


def _ratios(arms: dict) -> dict:
    ok = {k: v for k, v in arms.items() if "step_time_s" in v}
    out = {}

    def ratio(a, b, key, name):
        if a in ok and b in ok and ok[a].get(key) and ok[b].get(key):
            out[name] = round(ok[a][key] / ok[b][key], 3)

    for a, b in (
        ("potstill", "floor"),
        ("potstill_chunk1024", "floor"),
        ("liger", "floor"),
        ("naive", "floor"),
        ("trl_gkd", "floor"),
        ("potstill", "naive"),
        ("potstill", "trl_gkd"),
        ("liger", "potstill"),
        ("potstill_chunk1024", "potstill"),
    ):
        ratio(a, b, "step_time_s", f"{a}_over_{b}_time")
        ratio(a, b, "peak_over_base_gib", f"{a}_over_{b}_mem")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, CUDA-only arms skipped (< 1 min)")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; --cpu-smoke: a temp file)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per arm (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 3; smoke 1)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the arms (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepspeed-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.deepspeed_worker:
        deepspeed_worker(a.deepspeed_worker)
        return 0

    import torch

    t_start = time.perf_counter()
    if not a.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run it on a GPU (see the docstring), or use --cpu-smoke here")
    dev = Device("cpu" if a.cpu_smoke else "cuda")
    cfg = dict(CPU_SMOKE if a.cpu_smoke else FULL)
    cfg.update(seed=a.seed, lr=5e-5, dtype="bfloat16", device=dev.type)
    if a.steps is not None:
        cfg["steps"] = a.steps
    if a.warmup is not None:
        cfg["warmup"] = a.warmup
    cfg["chunk_size"] = _kdconfig_chunk_size()
    out_path = (
        Path(a.out)
        if a.out
        else (Path(tempfile.gettempdir()) / "gpu_check.cpu_smoke.json" if a.cpu_smoke else DEFAULT_OUT)
    )

    report: dict = {
        "benchmark": "gpu_check",
        "mode": "cpu_smoke" if a.cpu_smoke else "full",
        "config": cfg,
        "device": torch.cuda.get_device_name() if dev.cuda else "cpu",
        "versions": _versions(),
        "arms": {},
    }

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json_atomic(out_path, report)

    student, teacher = build_models(cfg, dev)
    batch = make_batch(cfg, dev)
    cfg["n_loss_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    report["params"] = {"student": _n_params(student), "teacher": _n_params(teacher)}
    init_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    print(
        f"[gpu_check] {report['device']}: student {report['params']['student'] / 1e9:.3f} B, teacher "
        f"{report['params']['teacher'] / 1e9:.3f} B params, batch {cfg['batch_size']}x{cfg['seq_len']}, "
        f"{cfg['n_loss_tokens']} loss tokens; built in {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )

    trl_missing = _why_not_importable("trl.experimental.gkd")
    plan = [
        ("floor", arm_floor, None),
        ("potstill", arm_potstill, None),
        ("naive", arm_naive, None),
        ("parity", None, None),
        ("liger", arm_liger, None if dev.cuda else "Liger's backend runs on CUDA only"),
        ("potstill_chunk1024", arm_potstill_chunk1024, None),
        ("trl_gkd", arm_trl_gkd, trl_missing),
        ("deepspeed", None, None),
    ]
    wanted = None if a.arms is None else set(a.arms.split(","))
    for name, fn, skip in plan:
        if wanted is not None and name not in wanted:
            continue
        elapsed = time.perf_counter() - t_start
        t0 = time.perf_counter()
        if elapsed > cfg["time_budget_s"]:
            res = {"skipped": f"time budget: {elapsed:.0f} s of {cfg['time_budget_s']} s used"}
        elif skip:
            res = {"skipped": skip}
        else:
            student.load_state_dict(init_state)
            student.zero_grad(set_to_none=True)
            dev.free()
            try:
                if name == "parity":
                    res = parity(cfg, dev, student, teacher, batch)
                elif name == "deepspeed":
                    res = deepspeed_smoke(cfg, dev)
                else:
                    res = fn(cfg, dev, student, teacher, batch)
            except RuntimeError as err:
                if "loss_backend 'liger'" in str(err):  # require_liger: not importable / no CUDA
                    res = {"skipped": str(err)}
                else:
                    res = {"error": f"{type(err).__name__}: {err}"[:2000], "trace": traceback.format_exc()[-3000:]}
            except Exception as err:
                res = {"error": f"{type(err).__name__}: {err}"[:2000], "trace": traceback.format_exc()[-3000:]}
            res["arm_wall_s"] = round(time.perf_counter() - t0, 1)
        key = {"parity": "bf16_vs_fp32"}.get(name, name)
        if name in ("parity", "deepspeed"):
            report[key] = res
        else:
            report["arms"][name] = res
        brief = {
            k: res.get(k)
            for k in ("step_time_s", "peak_over_base_gib", "loss", "ok", "skipped", "error")
            if res.get(k) is not None
        }
        print(f"[gpu_check] {name}: {json.dumps(brief)[:400]} [{time.perf_counter() - t0:.0f} s]", flush=True)
        report["ratios"] = _ratios(report["arms"])
        save()
        dev.free()

    arms = report["arms"]
    naive = arms.get("naive", {}).get("loss")
    report["loss_check"] = {
        "first_step_loss": {k: v["loss"] for k, v in arms.items() if "loss" in v and k != "floor"},
        **(
            {
                f"{k}_vs_naive_rel_diff": abs(v["loss"] - naive) / max(abs(naive), 1e-12)
                for k, v in arms.items()
                if "loss" in v and k not in ("floor", "naive")
            }
            if naive
            else {}
        ),
    }
    r = report["ratios"]
    met = {}
    if "potstill_over_floor_time" in r:
        met["potstill_time_le_1.10x_floor"] = r["potstill_over_floor_time"] <= TARGET_TIME_VS_FLOOR
    if "potstill_over_trl_gkd_mem" in r:
        met["potstill_mem_le_0.6x_trl"] = r["potstill_over_trl_gkd_mem"] <= TARGET_MEM_VS_TRL
    if isinstance(report.get("bf16_vs_fp32"), dict) and "ok" in report["bf16_vs_fp32"]:
        met["parity_bf16_fp32"] = report["bf16_vs_fp32"]["ok"]
    report["targets_met"] = met
    save()
    print(f"[gpu_check] wrote {out_path}")
    skipped = [k for k, v in arms.items() if "skipped" in v] + [
        k for k in ("deepspeed",) if "skipped" in report.get(k, {})
    ]
    failed = [k for k, v in arms.items() if "error" in v] + [
        k for k in ("bf16_vs_fp32", "deepspeed") if "error" in report.get(k, {})
    ]
    print(
        summary_line(
            "gpu_check",
            {
                **r,
                **{k: ("yes" if v else "NO") for k, v in met.items()},
                "skipped": ",".join(skipped) or "none",
                "failed": ",".join(failed) or "none",
                "wall_s": report["wall_s"],
            },
        ),
        flush=True,
    )
    return 0


def _kdconfig_chunk_size() -> int:
    """``KDConfig.chunk_size``'s default, read from the source (importing potstill.kd needs datasets)."""
    import ast

    tree = ast.parse((HERE.parent / "src" / "potstill" / "kd" / "logit.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "chunk_size":
            for kw in getattr(node.value, "keywords", []):
                if kw.arg == "default":
                    return int(ast.literal_eval(kw.value))
    return 256


if __name__ == "__main__":
    sys.exit(main())
