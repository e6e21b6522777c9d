"""``potstill distill_vlm``: load a VLM teacher and student (AutoModelForImageTextToText + AutoProcessor), measure
the held-out forward KL on text tokens, train the student by :class:`potstill.kd.vlm.VLMKDTrainer`, measure again,
and write ``output_dir``::

    recipe.yaml       the resolved recipe
    student/          the trained student (safetensors) and its processor, moved into place when complete
    metrics.json      held-out KL before/after, steps, examples, tokens (written atomically, last)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from potstill.errors import PotstillError
from potstill.io import atomic_write_json, atomic_write_text
from potstill.paths import resolve_data_path
from potstill.recipes.distill_vlm import VLMModel, VLMRecipe

__all__ = ["load_vlm", "read_vlm_jsonl", "run", "summary_line"]


def read_vlm_jsonl(path: str) -> list[dict]:
    """The examples of a JSONL file of ``{image, prompt, answer}``; relative image paths are taken from the
    file's folder, ``$POTSTILL_DATA/...`` from the shared data directory. Bad lines are refused in one line."""
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"data file '{p}' does not exist; set data.train / data.eval to a JSONL of image examples")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PotstillError(f"{p}:{n} is not JSON; each line must be {{image, prompt, answer}}") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in ("image", "prompt", "answer")):
            raise PotstillError(f"{p}:{n} needs string fields image, prompt and answer; fix that line")
        image = resolve_data_path(row["image"], p.parent)
        if not Path(image).is_file():
            raise PotstillError(f"{p}:{n}: image '{image}' does not exist; fix the path")
        rows.append({"image": image, "prompt": row["prompt"], "answer": row["answer"]})
    if not rows:
        raise PotstillError(f"data file '{p}' holds no examples; add {{image, prompt, answer}} lines")
    return rows


def load_vlm(spec: VLMModel):
    """``(model, processor)`` of a VLM: a local directory or a hub id (offline unless the hub is reachable)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kw = {"trust_remote_code": spec.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(spec.model, **kw)
        model = AutoModelForImageTextToText.from_pretrained(spec.model, dtype=getattr(torch, spec.dtype), **kw)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PotstillError(
            f"cannot load VLM '{spec.model}' ({first}); give a local directory or a reachable hub id "
            "of an image-text-to-text model"
        ) from None
    return model, processor


def _split(recipe: VLMRecipe) -> tuple[list[dict], list[dict]]:
    d = recipe.data
    train = read_vlm_jsonl(d.train)
    rng = random.Random(d.seed)
    if d.eval is not None:
        held = read_vlm_jsonl(d.eval)
    else:
        rng.shuffle(train)
        k = max(1, round(len(train) * d.eval_fraction))
        if k >= len(train):
            raise PotstillError(f"{len(train)} examples leave none to train on; add data or lower data.eval_fraction")
        train, held = train[:-k], train[-k:]
    if d.max_train is not None:
        train = train[: d.max_train]
    if d.max_eval is not None:
        held = held[: d.max_eval]
    return train, held


def _save_student(model, processor, out: Path) -> Path:
    """The student and its processor into ``out/student`` via a temporary sibling and a rename (never half-written)."""
    final = out / "student"
    tmp = Path(tempfile.mkdtemp(prefix=".student-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if final.exists():  # a directory this runner wrote on a previous run of this output_dir
            old = Path(tempfile.mkdtemp(prefix=".student-old-", dir=out))
            os.replace(final, old / "student")
            shutil.rmtree(old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def run(recipe: VLMRecipe) -> dict:
    """Train and evaluate one VLM student; returns (and writes) the metrics."""
    import torch

    from potstill.data.vlm import VLMPairCollator
    from potstill.kd.vlm import VLMKDConfig, VLMKDTrainer, vlm_forward_kl

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    train, held = _split(recipe)
    teacher, t_proc = load_vlm(recipe.teacher)
    student, s_proc = load_vlm(recipe.student)
    tr, ls = recipe.train, recipe.loss
    collator = VLMPairCollator(t_proc, s_proc, loss_on=ls.loss_on, max_length=tr.max_length)
    args = VLMKDConfig(
        output_dir=str(out / "trainer"),
        max_steps=tr.max_steps,
        per_device_train_batch_size=tr.batch_size,
        gradient_accumulation_steps=tr.grad_accum,
        learning_rate=tr.lr,
        warmup_steps=tr.warmup_steps,
        lr_scheduler_type="constant_with_warmup",
        seed=tr.seed,
        use_cpu=tr.use_cpu,
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, tr.max_steps // 10),
        disable_tqdm=True,
        divergence=ls.divergence,
        alpha=ls.alpha,
        temperature=ls.temperature,
        chunk_size=tr.chunk_size,
        loss_on=ls.loss_on,
    )
    trainer = VLMKDTrainer(student, teacher, args, data_collator=collator, train_dataset=train)
    device = trainer.args.device
    student.to(device)
    teacher.to(device)
    ev = dict(batch_size=recipe.eval.batch_size, temperature=1.0, chunk_size=tr.chunk_size)
    before = vlm_forward_kl(student, teacher, held, collator, **ev)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = vlm_forward_kl(student, teacher, held, collator, **ev)
    path = _save_student(student, s_proc, out)
    metrics = {
        "verb": "distill-vlm",
        "teacher": recipe.teacher.model,
        "student": recipe.student.model,
        "n_train": len(train),
        "n_eval": len(held),
        "steps": tr.max_steps,
        "loss_on": ls.loss_on,
        "divergence": ls.divergence,
        "heldout_forward_kl_before": before,
        "heldout_forward_kl_after": after,
        "kl_ratio_after_before": after / before if before > 0 else None,
        "loss_tokens": trainer.loss_tokens,
        "train_seconds": round(seconds, 3),
        "device": str(device),
        "dtype": str(next(student.parameters()).dtype).removeprefix("torch."),
        "student_dir": str(path),
        "torch": torch.__version__,
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def summary_line(metrics: dict) -> str:
    """One line: held-out forward KL on text tokens before -> after, and the ratio."""
    ratio = metrics.get("kl_ratio_after_before")
    r = f" ({ratio:.3f}x)" if ratio is not None else ""
    return (
        f"distill-vlm: held-out forward KL {metrics['heldout_forward_kl_before']:.5f} -> "
        f"{metrics['heldout_forward_kl_after']:.5f}{r} after {metrics['steps']} steps"
    )
