"""One logit-KD training step on CPU: potstill's KDTrainer vs two floors, a naive step and TRL GKD.

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
  step could do with stock parts: one student step and one teacher forward.
* (c2) ``floor_chunked``: potstill's own SFT step -- ``KDTrainer`` with ``alpha=1`` (pure
  cross-entropy through the same chunked reducer, same ``chunk_size``, no teacher signal) --
  plus the same no-grad teacher forward as (c), run at the top of ``compute_loss``. Timed
  like (a): (a) and (c2) differ only in the loss (teacher signal + divergence vs CE).
* (d) ``trl_gkd``: ``trl.experimental.gkd.GKDTrainer`` with lmbda=0 (no on-policy generation),
  beta=0 (forward KL), bf16 off, gradient checkpointing off; timed like (a).

The plain-loop arms (b, c) mirror what ``Trainer`` does per step: backward, clip the grad
norm to ``max_grad_norm=1.0``, the Trainer's default optimizer (``AdamW``, fused on CPU,
same lr/betas/eps), ``zero_grad(set_to_none=True)``.

Interleaving: every arm lives in its own long-lived worker subprocess (so memory stays per
arm), and the parent drives them step by step in rounds over stdin/stdout (JSON lines): round
``r`` runs one step of each arm, one arm at a time, in an order rotated by one each round, so
a slow period of a shared machine hits every arm alike and no arm always runs first or last.
A Trainer arm blocks in ``on_step_begin`` until the parent says "step" and reports after
``on_step_end`` once it is idle again (its between-step work never overlaps another arm's
step). Per arm: the measured step times (after the warmup rounds), their median and min;
the ratios of (a) over each floor at the median, at the min, and the median of the per-round
ratios (each round's (a) step over the same round's floor step).

Memory: after models, data (and, for Trainer arms, the trainer object) are built, each worker
resets its peak-RSS high-water mark and records the RSS; ``peak_mem_mb`` is the peak RSS
during all (warmup + measured) steps minus that baseline, i.e. what the training step costs
(gradients, AdamW state, activations, logits). ``peak_rss_mb`` is the absolute peak RSS
during the steps (models included). The memory ratios use ``peak_mem_mb``.

Loss check: arm (a)'s first-step loss must equal (b)'s (same weights, same batch, before
any update) to ~1e-5 relative, and (c2)'s must equal (c)'s (the same CE two ways);
otherwise the benchmark compares different losses.

Profile (``--profile``, its own worker, pieces timed alone in interleaved rounds on the same
models and batch): the bodies (student forward + backward, teacher forward without and with
its full logits), the pieces of one step of the chunked forward-KL loss at the default chunk
size (student head matmul, teacher head matmul on the loss rows, the teacher-logit finite
check, a log-softmax, an exp, the divergence value, the gradient ``q - p``, the gradient scale,
the student head's backward matmuls), and the whole chunked KD and CE losses (forward +
backward) at several chunk sizes, next to a reference forward-KL chunk loop written with the
fewest passes over ``[chunk, V]`` (``lean_fkl_loss``; not used by any arm), so that
``KD - CE`` splits into what logit KD needs and what it does not.

Usage: ``python benchmarks/kd_step.py [--steps 12] [--warmup 3] [--quick] [--out PATH]
[--arms a,b] [--chunk-size N] [--chunk-sweep 128,512] [--profile] [--profile-chunks 128,256,512]
[--threads N]``.
Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
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
ARMS = ("floor", "floor_chunked", "naive", "kdtrainer_chunked", "trl_gkd")
FLOORS = ("floor", "floor_chunked")

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
STEP_TIMEOUT_S = 900.0  # one step (or a worker's setup) of one arm; a hung worker fails the run


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


def _default_chunk(cfg: dict) -> int:
    from potstill.kd.logit import KDConfig

    if cfg["chunk_size"] is None:
        cfg["chunk_size"] = KDConfig.__dataclass_fields__["chunk_size"].default
    return cfg["chunk_size"]


# ----------------------------------------------------------------------------- the step protocol (worker side)


class _Pipe:
    """A worker's end of the protocol: one JSON object per line, commands on stdin, replies on
    the process's original stdout. Everything else the libraries print goes to stderr."""

    def __init__(self):
        sys.stdout.flush()
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, **msg) -> None:
        self._out.write(json.dumps(msg) + "\n")
        self._out.flush()

    def recv(self) -> dict:
        line = sys.stdin.readline()
        if not line:  # the parent is gone: nothing left to measure for
            os._exit(3)
        return json.loads(line)

    def wait_step(self) -> None:
        msg = self.recv()
        if msg.get("cmd") != "step":
            raise RuntimeError(f"expected a step command, got {msg!r}")

    def wait_finish(self) -> None:
        msg = self.recv()
        if msg.get("cmd") != "finish":
            raise RuntimeError(f"expected the finish command, got {msg!r}")


def _trainer_arm(trainer_cls, make_trainer, pipe: _Pipe) -> dict:
    """Run a Trainer for warmup + steps, one step per "step" command; time on_step_begin..on_step_end.

    The reply for a step is sent when the Trainer comes back to ``on_step_begin`` (or leaves
    ``train()``), i.e. once its between-step work (logging, the next batch) is done and the
    worker is idle: the parent then starts the next arm on a quiet machine.
    """
    from transformers import TrainerCallback

    losses: list[float] = []
    pending: list[dict] = []

    class Stepper(TrainerCallback):
        ready = False

        def on_step_begin(self, args, state, control, **kw):
            if pending:
                pipe.send(**pending.pop())
            elif not self.ready:
                pipe.send(ready=True)
                self.ready = True
            pipe.wait_step()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter() - self.t0
            pending.append({"t": t, "loss": losses[-1]})

    class Recording(trainer_cls):
        # Records the loss compute_loss returns (a float() of a CPU scalar: no measurable cost).
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(Recording, out_dir)
        trainer.add_callback(Stepper())
        with PeakRSS() as mem:
            trainer.train()
    if pending:
        pipe.send(**pending.pop())
    return mem.as_dict()


def arm_kdtrainer_chunked(cfg, student, teacher, batch, pipe) -> dict:
    from potstill.kd.logit import KDConfig, KDTrainer

    def make(cls, out_dir):
        args = KDConfig(
            **_common_args(cfg, out_dir),
            alpha=0.0,
            divergence="forward_kl",
            temperature=1.0,
            chunk_size=_default_chunk(cfg),
        )
        return cls(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(batch), data_collator=_stack)

    return _trainer_arm(KDTrainer, make, pipe)


def arm_floor_chunked(cfg, student, teacher, batch, pipe) -> dict:
    import torch

    from potstill.kd.logit import KDConfig, KDTrainer

    teacher.eval().requires_grad_(False)

    class SFTPlusTeacherForward(KDTrainer):
        # alpha=1: KDTrainer never builds a teacher signal; the teacher forward is added by hand.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )  # full logits, discarded
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    def make(cls, out_dir):
        args = KDConfig(**_common_args(cfg, out_dir), alpha=1.0, chunk_size=_default_chunk(cfg))
        return cls(model=student, args=args, train_dataset=_dataset(batch), data_collator=_stack)

    return _trainer_arm(SFTPlusTeacherForward, make, pipe)


def arm_trl_gkd(cfg, student, teacher, batch, pipe) -> dict:
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

    return _trainer_arm(GKDTrainer, make, pipe)


def _plain_loop(cfg, student, loss_fn, pipe: _Pipe) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(**_common_args(cfg, out_dir))
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(targs)  # the Trainer's own optimizer
    opt = opt_cls(student.parameters(), **opt_kwargs)
    student.train()
    with PeakRSS() as mem:
        pipe.send(ready=True)
        for _ in range(cfg["warmup"] + cfg["steps"]):
            pipe.wait_step()
            t0 = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), targs.max_grad_norm)
            opt.step()
            student.zero_grad(set_to_none=True)
            t = time.perf_counter() - t0
            value = float(loss.detach())
            del loss
            pipe.send(t=t, loss=value)
    return mem.as_dict()


def arm_naive(cfg, student, teacher, batch, pipe) -> dict:
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

    return _plain_loop(cfg, student, loss_fn, pipe)


def arm_floor(cfg, student, teacher, batch, pipe) -> dict:
    import torch

    teacher.eval().requires_grad_(False)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def loss_fn():
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=am)  # full [B, T, V] logits, discarded
        return student(input_ids=ids, attention_mask=am, labels=labels).loss

    return _plain_loop(cfg, student, loss_fn, pipe)


ARM_FNS = {
    "floor": arm_floor,
    "floor_chunked": arm_floor_chunked,
    "naive": arm_naive,
    "kdtrainer_chunked": arm_kdtrainer_chunked,
    "trl_gkd": arm_trl_gkd,
}


def arm_worker(arm: str, cfg: dict) -> None:
    """Serve one arm: build, say ready, run a step per "step", report memory on "finish"."""
    import torch

    pipe = _Pipe()
    student, teacher = build_models(cfg)
    batch = make_batch(cfg)
    mem = ARM_FNS[arm.split("@")[0]](cfg, student, teacher, batch, pipe)
    pipe.wait_finish()
    chunked = arm.split("@")[0] in ("kdtrainer_chunked", "floor_chunked")
    pipe.send(
        done=True, **mem, threads=torch.get_num_threads(), **({"chunk_size": cfg["chunk_size"]} if chunked else {})
    )


# ----------------------------------------------------------------------------- profile (worker side)


def lean_fkl_loss(rows, weight, targets, teacher_rows, teacher_weight, chunk_size: int):
    """Forward KL(p_teacher || q_student) summed over rows / n, and its gradients, with the fewest
    passes over each ``[chunk, V]`` block: a reference for the profile, not used by any arm.

    ``rows [n, H_s]`` and ``teacher_rows [n, H_t]`` are the final hidden states of the loss rows,
    ``weight [V, H_s]`` / ``teacher_weight [V, H_t]`` the heads (plain linear, fp32, T = 1).
    Per chunk: ``ls = log_softmax(h W^T)``, ``lt = log_softmax(h_t W_t^T)`` (after a finite check
    of the teacher logits through their row max and min), ``p = exp(lt)``; the value
    ``sum p (lt - ls)`` as a batched dot product of ``p`` with ``lt - ls`` written over ``lt``;
    ``dL/dz = q - p`` written over ``ls``. Returns ``(loss, grad_rows, grad_weight)`` divided by ``n``.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        n = rows.shape[0]
        grad_rows = torch.zeros_like(rows)
        grad_w = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = rows[s:e]
            ls = torch.log_softmax(F.linear(h, weight), dim=-1)
            tl = F.linear(teacher_rows[s:e], teacher_weight)
            if not bool((torch.isfinite(tl.amax(-1)) & torch.isfinite(tl.amin(-1))).all()):
                raise RuntimeError("non-finite teacher logits")
            lt = torch.log_softmax(tl, dim=-1)
            del tl
            p = lt.exp()
            d = lt.sub_(ls)
            total += torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).sum()
            del d, lt
            g = ls.exp_().sub_(p)  # q - p
            del p
            grad_rows[s:e] = g @ weight
            grad_w.addmm_(g.t(), h)
        return total / n, grad_rows.div_(n), grad_w.div_(n)


def profile(cfg: dict) -> dict:
    """Where (a)'s time goes vs the floors: each piece timed alone, all pieces in interleaved rounds."""
    import torch
    import torch.nn.functional as F

    from potstill.divergences import chunked_kd_loss
    from potstill.models import final_hidden, output_head
    from potstill.signals import OnlineTeacher, target_index, target_rows
    from potstill.signals.types import Head

    cs = _default_chunk(cfg)
    student, teacher = build_models(cfg)
    batch = make_batch(cfg)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    online = OnlineTeacher(teacher)
    student.train()
    index = target_index(labels)
    n = int(index.numel())
    targets = labels[:, 1:].reshape(-1).index_select(0, index)
    head = output_head(student)
    W = head.weight
    sig = online.signal(batch)  # teacher hidden rows [n, H_t] + its head
    Wt = sig.head.weight
    with torch.no_grad():
        h_rows = target_rows(final_hidden(student, ids, am), index).contiguous()
    spans = [(s, min(s + cs, n)) for s in range(0, n, cs)]
    # One step's worth of per-chunk inputs for the per-op pieces (computed once, read many times).
    with torch.no_grad():
        z = [F.linear(h_rows[s:e], W) for s, e in spans]
        tl = [sig.chunk_logits(s, e) for s, e in spans]
        ls = [torch.log_softmax(x, -1) for x in z]
        lt = [torch.log_softmax(x, -1) for x in tl]
        p = [x.exp() for x in lt]
        q = [x.exp() for x in ls]
        g = [a - b for a, b in zip(q, p)]
        buf = [torch.empty_like(x) for x in z]  # an existing [chunk, V] buffer: what an in-place op writes to
    grad_w = torch.zeros_like(W)
    g_rows = torch.randn_like(h_rows)
    h_leaf = h_rows.clone().requires_grad_(True)
    w_leaf = W.detach().clone().requires_grad_(True)
    s_head = Head(weight=w_leaf)

    def over_chunks(fn):
        def run():
            for i in range(len(spans)):
                fn(i)

        return run

    pieces: dict[str, object] = {}

    # bodies (per step)
    def student_body_fwd_bwd():
        rows = target_rows(final_hidden(student, ids, am), index)
        rows.backward(g_rows)
        student.zero_grad(set_to_none=True)

    pieces["student_body_fwd_bwd"] = student_body_fwd_bwd
    pieces["teacher_body_fwd (OnlineTeacher.signal, no head)"] = lambda: online.signal(batch)

    def teacher_full():
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=am)

    pieces["teacher_fwd_full_logits (the floors' teacher forward)"] = teacher_full

    def hf_ce():
        student(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        student.zero_grad(set_to_none=True)

    pieces["student_sft_fwd_bwd (HF CE, full logits; floor's student part)"] = hf_ce
    # the pieces of the chunked forward-KL loss, one step's worth (all chunks)
    ops = {
        "student_head_fwd (h W^T)": lambda i: F.linear(h_rows[spans[i][0] : spans[i][1]], W),
        "teacher_head_fwd (h_t W_t^T, loss rows)": lambda i: sig.chunk_logits(*spans[i]),
        "log_softmax (one side)": lambda i: torch.log_softmax(z[i], -1),
        "finite_check isfinite().all(-1) (current)": lambda i: ~torch.isfinite(tl[i]).all(-1),
        "finite_check isfinite(amax) & isfinite(amin) (lean)": lambda i: (
            ~(torch.isfinite(tl[i].amax(-1)) & torch.isfinite(tl[i].amin(-1)))
        ),
        "exp into a new tensor (current: q and p)": lambda i: lt[i].exp(),
        "exp into existing memory (lean: q)": lambda i: torch.exp(ls[i], out=buf[i]),
        "fkl_value xlogy(p,p) - p*ls (current)": lambda i: (torch.xlogy(p[i], p[i]) - p[i] * ls[i]).sum(-1),
        "fkl_value p.(lt - ls), in place + bmm (lean)": lambda i: torch.bmm(
            p[i].unsqueeze(1), torch.sub(lt[i], ls[i], out=buf[i]).unsqueeze(2)
        ),
        "grad q - p, in place": lambda i: torch.sub(q[i], p[i], out=buf[i]),
        "grad scale mul_(1.0) (current; a no-op at alpha=0, T=1)": lambda i: g[i].mul_(1.0),
        "student_head_bwd (g W, grad_W += g^T h)": lambda i: (
            g[i] @ W,
            grad_w.addmm_(g[i].t(), h_rows[spans[i][0] : spans[i][1]]),
        ),
    }
    for name, fn in ops.items():
        pieces["op: " + name] = over_chunks(fn)

    # whole losses, forward + backward (the reducer computes the gradients in its forward)
    losses: dict[str, float] = {}

    def kd_loss(c, alpha):
        def run():
            loss, _ = chunked_kd_loss(
                h_leaf, s_head, targets, sig if alpha < 1 else None, alpha=alpha, normalizer=n, chunk_size=c
            )
            loss.backward()
            losses[f"chunked alpha={alpha} chunk {c}"] = float(loss.detach())
            h_leaf.grad = None
            w_leaf.grad = None

        return run

    def lean(c):
        def run():
            loss, _, _ = lean_fkl_loss(h_rows, W, targets, sig.hidden, Wt, c)
            losses[f"lean chunk {c}"] = float(loss)

        return run

    chunks = sorted({cs, *cfg["profile_chunks"]})
    for c in chunks:
        pieces[f"loss: kd chunked_kd_loss fwd+bwd (alpha=0, chunk {c})"] = kd_loss(c, 0.0)
        pieces[f"loss: ce chunked_kd_loss fwd+bwd (alpha=1, chunk {c})"] = kd_loss(c, 1.0)
        pieces[f"loss: kd lean_fkl_loss fwd+bwd (chunk {c})"] = lean(c)

    names = list(pieces)
    times: dict[str, list[float]] = {k: [] for k in names}
    w = cfg["warmup"]
    for r in range(w + cfg["steps"]):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            pieces[name]()
            times[name].append(time.perf_counter() - t0)
    out: dict = {
        "what": (
            f"seconds per training step ({n} loss rows, chunk {cs} unless named): median and min over "
            f"{cfg['steps']} rounds after {w}, all pieces interleaved, each piece alone"
        ),
        "pieces": {k: {"median_s": round(median(v[w:]), 4), "min_s": round(min(v[w:]), 4)} for k, v in times.items()},
        "losses": losses,
    }
    out["breakdown"] = _breakdown(out["pieces"], cs)

    # A top-ops table for one KDTrainer-equivalent step (student body + teacher body + chunked loss).
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    def kd_step():
        hidden = final_hidden(student, ids, am)
        rows = target_rows(hidden, index)
        s = online.signal(batch)
        loss, _ = chunked_kd_loss(rows, head, targets, s, alpha=0.0, normalizer=n, chunk_size=cs)
        loss.backward()
        student.zero_grad(set_to_none=True)

    kd_step()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        kd_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr, flush=True)
    out["top_ops_self_cpu"] = [
        {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    return out


def _breakdown(pieces: dict, cs: int) -> dict:
    """The profile's pieces put together: KD loss vs CE loss and (a)'s step vs (c2)'s, by median and by min.

    ``kd_minus_ce``: the chunked forward-KL loss minus the chunked CE loss (both forward + backward,
    chunk ``cs``). Forward KL's gradient ``q - p`` replaces CE's ``q - onehot``, so ``q = exp(ls)``,
    the student head's matmuls and its log-softmax are paid by both; what logit KD needs on top
    (``inherent_ops``) is the teacher head on the loss rows, the teacher's log-softmax,
    ``p = exp(lt)``, a finite check of the teacher logits (row max and min), the value ``sum p (lt - ls)``
    and ``q - p``. What the current reducer spends beyond that (``avoidable_ops``): ``isfinite``
    over every logit instead of the row max and min, the value as ``xlogy(p, p) - p * ls`` (recomputes
    ``log p`` and makes three ``[chunk, V]`` temporaries), ``q`` into a fresh tensor rather than
    over ``ls``, and ``g.mul_(1.0)``. ``lean_fkl_loss`` is the loss with only the inherent passes.

    ``step_*``: (a)'s and (c2)'s steps without what they share (optimizer, clip, Trainer): (a) =
    student body + teacher body + KD loss; (c2) = student body + teacher forward with its full
    logits + CE loss; ``step_a_lean`` with ``lean_fkl_loss`` in place of the KD loss.
    """

    def m(name, key):
        return pieces[name][key]

    out = {}
    for key, tag in (("median_s", ""), ("min_s", "_min")):
        kd = m(f"loss: kd chunked_kd_loss fwd+bwd (alpha=0, chunk {cs})", key)
        ce = m(f"loss: ce chunked_kd_loss fwd+bwd (alpha=1, chunk {cs})", key)
        lean = m(f"loss: kd lean_fkl_loss fwd+bwd (chunk {cs})", key)
        inherent = {
            "teacher_head_fwd": m("op: teacher_head_fwd (h_t W_t^T, loss rows)", key),
            "teacher_log_softmax": m("op: log_softmax (one side)", key),
            "p_exp": m("op: exp into a new tensor (current: q and p)", key),
            "finite_check_amax_amin": m("op: finite_check isfinite(amax) & isfinite(amin) (lean)", key),
            "fkl_value_dot": m("op: fkl_value p.(lt - ls), in place + bmm (lean)", key),
            "grad_q_minus_p": m("op: grad q - p, in place", key),
        }
        avoidable = {
            "finite_check_isfinite_vs_amax_amin": m("op: finite_check isfinite().all(-1) (current)", key)
            - m("op: finite_check isfinite(amax) & isfinite(amin) (lean)", key),
            "fkl_value_xlogy_vs_dot": m("op: fkl_value xlogy(p,p) - p*ls (current)", key)
            - m("op: fkl_value p.(lt - ls), in place + bmm (lean)", key),
            "q_new_tensor_vs_in_place": m("op: exp into a new tensor (current: q and p)", key)
            - m("op: exp into existing memory (lean: q)", key),
            "grad_scale_mul_by_1": m("op: grad scale mul_(1.0) (current; a no-op at alpha=0, T=1)", key),
        }
        s_body = m("student_body_fwd_bwd", key)
        t_body = m("teacher_body_fwd (OnlineTeacher.signal, no head)", key)
        t_full = m("teacher_fwd_full_logits (the floors' teacher forward)", key)
        step_a, step_c2, step_a_lean = s_body + t_body + kd, s_body + t_full + ce, s_body + t_body + lean
        out[tag.lstrip("_") or "median"] = {
            "kd_loss_s": kd,
            "ce_loss_s": ce,
            "lean_kd_loss_s": lean,
            "kd_minus_ce_s": round(kd - ce, 4),
            "lean_minus_ce_s": round(lean - ce, 4),
            "kd_minus_lean_s": round(kd - lean, 4),
            "inherent_ops_s": {k: round(v, 4) for k, v in inherent.items()},
            "inherent_ops_sum_s": round(sum(inherent.values()), 4),
            "avoidable_ops_s": {k: round(v, 4) for k, v in avoidable.items()},
            "avoidable_ops_sum_s": round(sum(avoidable.values()), 4),
            "teacher_head_all_rows_s (in the floors' teacher forward)": round(t_full - t_body, 4),
            "step_a_s": round(step_a, 4),
            "step_c2_s": round(step_c2, 4),
            "step_a_lean_s": round(step_a_lean, 4),
            "step_a_over_c2": round(step_a / step_c2, 3),
            "step_a_lean_over_c2": round(step_a_lean / step_c2, 3),
        }
    return out


def profile_worker(cfg: dict, result_path: str) -> None:
    res = profile(cfg)
    with open(result_path, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- driver


class _Worker:
    """The parent's handle on one arm's worker process."""

    def __init__(self, name: str, cfg: dict):
        self.name = name
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--config", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )

    def send(self, **msg) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = STEP_TIMEOUT_S) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.name}: no reply within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_interleaved(names: list[str], cfgs: dict[str, dict]) -> tuple[dict, list[list[str]]]:
    """Start one worker per arm, then run warmup + steps rounds, one step of each arm per round,
    the order rotated by one each round. Returns the per-arm results and each round's order."""
    workers = {name: _Worker(name, cfgs[name]) for name in names}
    try:
        for w in workers.values():
            msg = w.recv()
            if not msg.get("ready"):
                raise RuntimeError(f"{w.name}: expected ready, got {msg!r}")
        cfg = cfgs[names[0]]
        times = {name: [] for name in names}
        losses = {name: [] for name in names}
        orders = []
        for r in range(cfg["warmup"] + cfg["steps"]):
            k = r % len(names)
            order = names[k:] + names[:k]
            orders.append(order)
            for name in order:
                w = workers[name]
                w.send(cmd="step")
                rep = w.recv()
                times[name].append(rep["t"])
                losses[name].append(rep["loss"])
            print(f"[kd_step] round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in order), flush=True)
        results = {}
        for name, w in workers.items():
            w.send(cmd="finish")
            results[name] = {"times": times[name], "losses": losses[name], **w.recv()}
            w.proc.wait(timeout=120)
    finally:
        for w in workers.values():
            w.close()
    return results, orders


def _summarize(raw: dict, cfg: dict) -> dict:
    w = cfg["warmup"]
    times = raw["times"]
    meas = times[w:]
    return {
        "step_time_s": round(median(meas), 4),
        "step_time_min_s": round(min(meas), 4),
        "step_times_s": [round(t, 4) for t in meas],
        "warmup_times_s": [round(t, 4) for t in times[:w]],
        **{k: raw[k] for k in ("peak_mem_mb", "peak_rss_mb", "baseline_rss_mb", "setup_peak_rss_mb", "peak_reset")},
        "loss": raw["losses"][0],
        "losses": raw["losses"],
        "threads": raw["threads"],
        **({"chunk_size": raw["chunk_size"]} if "chunk_size" in raw else {}),
    }


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
    p.add_argument("--steps", type=int, default=None, help="measured steps (rounds) per arm (default 12; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured rounds first (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (seconds)")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT}; with --quick a temp file)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument(
        "--chunk-size", type=int, default=None, help="KDConfig.chunk_size for (a) and (c2) (default: KDConfig's)"
    )
    p.add_argument("--chunk-sweep", default="", help="also run (a) at these chunk sizes, interleaved, e.g. 128,512")
    p.add_argument("--profile", action="store_true", help="also time the pieces of (a) vs the floors")
    p.add_argument("--profile-chunks", default="128,256,512", help="chunk sizes of the whole-loss pieces in --profile")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: torch's, all cores); 1 steadies a machine shared with others",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        cfg = json.loads(a.config)
        if cfg.get("threads"):
            import torch

            torch.set_num_threads(cfg["threads"])
    if a.worker == "profile":
        profile_worker(json.loads(a.config), a.result)
        return 0
    if a.worker:
        arm_worker(a.worker, json.loads(a.config))
        return 0

    cfg = dict(QUICK if a.quick else FULL)
    cfg.update(
        steps=a.steps if a.steps is not None else (2 if a.quick else 12),
        warmup=a.warmup if a.warmup is not None else (1 if a.quick else 3),
        seed=a.seed,
        threads=a.threads,
        lr=5e-5,
        chunk_size=a.chunk_size if a.chunk_size is not None else _default_chunk({"chunk_size": None}),
        dtype="float32",
        device="cpu",
        profile_chunks=[int(c) for c in a.profile_chunks.split(",") if c],
    )
    cfg["n_loss_tokens"] = cfg["batch_size"] * (cfg["seq_len"] - cfg["prompt_len"])
    if cfg["steps"] < 1 or cfg["warmup"] < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    out_path = (
        Path(a.out) if a.out else (Path(tempfile.gettempdir()) / "kd_step.quick.json" if a.quick else DEFAULT_OUT)
    )
    arms = [x for x in a.arms.split(",") if x]
    for x in arms:
        if x not in ARMS:
            p.error(f"unknown arm {x!r}")
    skipped = {}
    if "trl_gkd" in arms:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            skipped["trl_gkd"] = "trl is not installed (pip install -e '.[bench]')"
            arms.remove("trl_gkd")
            print(f"[kd_step] skipping trl_gkd: {skipped['trl_gkd']}", flush=True)
    cfgs = {arm: cfg for arm in arms}
    sweep_names = []
    for cs in [int(c) for c in a.chunk_sweep.split(",") if c]:
        if cs != cfg["chunk_size"]:
            name = f"kdtrainer_chunked@{cs}"
            cfgs[name] = {**cfg, "chunk_size": cs}
            sweep_names.append(name)

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    raw, orders = run_interleaved(list(cfgs), cfgs)
    everything = {name: _summarize(r, cfgs[name]) for name, r in raw.items()}
    results = {k: everything[k] for k in arms}
    for name, res in everything.items():
        print(
            f"[kd_step] {name}: median {res['step_time_s']} s, min {res['step_time_min_s']} s {res['step_times_s']}, "
            f"peak +{res['peak_mem_mb']} MB (abs {res['peak_rss_mb']} MB), loss0 {res['loss']!r}",
            flush=True,
        )
    sweep = {}
    if sweep_names and "kdtrainer_chunked" in results:
        sweep[str(cfg["chunk_size"])] = results["kdtrainer_chunked"]
    for name in sweep_names:
        sweep[name.split("@")[1]] = everything[name]
    sweep = {
        k: {f: v[f] for f in ("step_time_s", "step_time_min_s", "step_times_s", "peak_mem_mb", "peak_rss_mb", "loss")}
        for k, v in sweep.items()
    }

    prof = None
    if a.profile:
        prof = run_worker(__file__, ["--worker", "profile", "--config", json.dumps(cfg)], timeout=3600)

    A, B, D = (results.get(k) for k in ("kdtrainer_chunked", "naive", "trl_gkd"))
    w = cfg["warmup"]
    ratios, targets, loss_check = {}, {}, {}
    for fl in FLOORS:
        C = results.get(fl)
        if not (A and C):
            continue
        ratios[f"a_over_{fl}_time"] = round(A["step_time_s"] / C["step_time_s"], 3)
        ratios[f"a_over_{fl}_time_min"] = round(A["step_time_min_s"] / C["step_time_min_s"], 3)
        per_round = [x / y for x, y in zip(raw["kdtrainer_chunked"]["times"][w:], raw[fl]["times"][w:])]
        ratios[f"a_over_{fl}_time_paired"] = round(median(per_round), 3)
        targets[f"a_time_le_1.10x_{fl}"] = ratios[f"a_over_{fl}_time"] <= TARGET_TIME_VS_FLOOR
        targets[f"a_time_min_le_1.10x_{fl}"] = ratios[f"a_over_{fl}_time_min"] <= TARGET_TIME_VS_FLOOR
    if A and D:
        ratios["a_over_trl_time"] = round(A["step_time_s"] / D["step_time_s"], 3)
        ratios["a_over_trl_time_min"] = round(A["step_time_min_s"] / D["step_time_min_s"], 3)
        ratios["a_over_trl_mem"] = round(A["peak_mem_mb"] / D["peak_mem_mb"], 3)
        ratios["a_over_trl_rss"] = round(A["peak_rss_mb"] / D["peak_rss_mb"], 3)
        targets["a_mem_le_0.6x_trl"] = ratios["a_over_trl_mem"] <= TARGET_MEM_VS_TRL
    if A and B:
        ratios["a_over_naive_time"] = round(A["step_time_s"] / B["step_time_s"], 3)
        ratios["a_over_naive_mem"] = round(A["peak_mem_mb"] / B["peak_mem_mb"], 3)
        ratios["a_over_naive_rss"] = round(A["peak_rss_mb"] / B["peak_rss_mb"], 3)
        targets["a_mem_lt_naive"] = A["peak_mem_mb"] < B["peak_mem_mb"]
    for x in ("naive", "trl_gkd"):
        for fl in FLOORS:
            if results.get(x) and results.get(fl):
                ratios[f"{x}_over_{fl}_time"] = round(results[x]["step_time_s"] / results[fl]["step_time_s"], 3)
    if results.get("floor_chunked") and results.get("floor"):
        ratios["floor_chunked_over_floor_time"] = round(
            results["floor_chunked"]["step_time_s"] / results["floor"]["step_time_s"], 3
        )
    if A and B:
        loss_check["a_vs_naive_rel_diff"] = _rel(A["loss"], B["loss"])
        targets["loss_a_matches_naive"] = loss_check["a_vs_naive_rel_diff"] <= LOSS_RTOL
    if D and B:
        loss_check["trl_vs_naive_rel_diff"] = _rel(D["loss"], B["loss"])
    if A and D:
        loss_check["a_vs_trl_rel_diff"] = _rel(A["loss"], D["loss"])
    if results.get("floor_chunked") and results.get("floor"):
        loss_check["floor_chunked_vs_floor_rel_diff"] = _rel(results["floor_chunked"]["loss"], results["floor"]["loss"])
        targets["loss_floor_chunked_matches_floor"] = loss_check["floor_chunked_vs_floor_rel_diff"] <= LOSS_RTOL
    loss_check["first_step_loss"] = {k: v["loss"] for k, v in results.items()}
    loss_check["rtol"] = LOSS_RTOL

    report = {
        "benchmark": "kd_step",
        "config": {k: v for k, v in cfg.items() if k != "profile_chunks"},
        "timing": (
            "one long-lived worker process per arm, driven in rounds: each round runs one step of every arm, one at "
            "a time, in an order rotated by one per round (round_orders); the first `warmup` rounds are not measured. "
            "step_time_s = median, step_time_min_s = min of the measured steps; *_paired = median over rounds of "
            "(a)'s step / the floor's step in the same round."
        ),
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
        "round_orders": orders,
        **({"skipped_arms": skipped} if skipped else {}),
        **({"chunk_sweep": sweep} if sweep else {}),
        **({"profile": prof} if prof else {}),
        **_versions(),
        "wall_s": round(time.perf_counter() - t_start, 1),
        # Step times are only comparable on an otherwise idle machine; this says how idle it was.
        "loadavg_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(),
    }
    write_json_atomic(out_path, report)

    print("[kd_step] first-step loss: " + ", ".join(f"{k}={v!r}" for k, v in loss_check["first_step_loss"].items()))
    if prof:
        print("[kd_step] profile breakdown: " + json.dumps(prof["breakdown"]))
    if sweep:
        print(
            "[kd_step] chunk sweep: "
            + ", ".join(
                f"{k}: {v['step_time_s']} s (min {v['step_time_min_s']}) / +{v['peak_mem_mb']} MB"
                for k, v in sweep.items()
            )
        )
    print(f"[kd_step] wrote {out_path}")
    print(summary_line("kd_step", {**ratios, **{k: ("yes" if v else "NO") for k, v in targets.items()}}), flush=True)
    return 1 if a.strict and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
