"""Preflight: what a distill recipe asks of the machine, models and engines, checked before anything is
written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from potstill.checkpoints import checkpoint_dir, resume_point
from potstill.distributed import (
    layer_classes,
    process_rank,
    require_deepspeed,
    world_size,
)
from potstill.errors import PotstillError
from potstill.finished import (
    DONE,
    run_fingerprint,
    verify_finished,
)
from potstill.recipes.distill import Recipe
from potstill.runners.prepare import Prepared

log = logging.getLogger("potstill")


def preflight(prep: Prepared) -> None:
    """Checks that need the loaded models, run before anything is written: every run's layer indices and LoRA
    targets exist, and every finished student on disk verifies (or there is none)."""
    from potstill.models.head import text_config

    r = prep.recipe
    if r.train.eval_steps is not None and getattr(prep, "cross", False):
        raise PotstillError(
            "train.eval_steps compares the student with the teacher token by token, but the student "
            "has another tokenizer; remove train.eval_steps (the report measures it at the end)"
        )
    n_s = int(text_config(prep.student0).num_hidden_layers)
    n_t = None if prep.teacher is None else int(text_config(prep.teacher).num_hidden_layers)
    for run in r.runs:
        pairs = [] if run.feature is None else [("method.layers", p) for p in run.feature.layers or []]
        if run.feature is not None and run.feature.relations is not None:
            pairs += [("method.relations.layers", p) for p in run.feature.relations.layers]
        for key, (i_s, i_t) in pairs:
            for who, i, n in (("student", i_s, n_s), ("teacher", i_t, n_t)):
                if n is not None and not -(n + 1) <= i <= n:
                    raise PotstillError(
                        f"run {run.name}: {key} names {who} layer {i}, but the {who} has {n} layers; "
                        f"use 0..{n} (0 the embeddings) or -1 for the last"
                    )
    if r.data.packing:
        check_packing_models(prep)
    lora = r.train.lora
    if lora is not None and lora.target_modules != "all-linear":
        names = [n for n, _ in prep.student0.named_modules()]
        missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in prep.student0.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
                }
            )
            raise PotstillError(
                f"train.lora.target_modules {missing} are not modules of the student; use some of "
                f"{linear} or all-linear"
            )
    if r.train.distributed == "fsdp2":
        for who, model in (("student", prep.student0), ("teacher", getattr(prep, "teacher", None))):
            if model is not None and not layer_classes(model):
                raise PotstillError(
                    f"train.distributed fsdp2: the {who} ({type(model).__name__}) declares no "
                    "decoder-layer classes (_no_split_modules) to shard one by one; set "
                    "train.distributed ddp"
                )
    out = Path(r.output_dir)
    for run in r.runs:
        verify_finished(out / "runs" / run.name, run_fingerprint(r, run))
        if r.train.save_steps is not None and not (out / "runs" / run.name / DONE).is_file():
            resume_point(checkpoint_dir(out, run.name), run_fingerprint(r, run))  # another recipe's: refused now


def check_packing_models(prep: Prepared) -> None:
    """``data.packing``: every model that reads the packed rows keeps each example's attention to itself."""
    from potstill.data.packing import check_packing

    r = prep.recipe
    models = [("student", prep.student0)]
    if any(run.uses_teacher for run in r.runs) and r.cache is None:
        models.append(("teacher", prep.teacher))
    for i, t in enumerate(prep.extra_teachers()):
        if t.tokenizer is not None:
            raise PotstillError(
                f"data.packing: extra_teachers[{i}] has another tokenizer and reads each row of a "
                "batch as one example; set data.packing false or give it the student's tokenizer"
            )
        models.append((f"extra_teachers[{i}]", t.model))
    for who, model in models:
        check_packing(model, who)


def check_distributed(recipe: Recipe, device: torch.device) -> None:
    """Refuse, in one line, a ``train.distributed`` that does not match how the processes were started."""
    kind, world = recipe.train.distributed, world_size()
    if world > 1 and kind == "none":
        raise PotstillError(
            f"this is process {process_rank()} of {world} (accelerate launch / torchrun), but "
            "train.distributed is none, so every process would train its own copy; set "
            "train.distributed ddp or fsdp2, or start one process"
        )
    if world == 1 and kind != "none":
        raise PotstillError(
            f"train.distributed {kind} splits the work over the processes of `accelerate launch "
            f"--num_processes N`, but this is one process with nothing to share with; start it "
            "that way, or set train.distributed none"
        )
    if kind != "none" and device.type not in ("cpu", "cuda"):
        raise PotstillError(
            f"train.distributed {kind} runs on cuda or cpu processes, not {device.type}; set device cuda or cpu"
        )
    if recipe.train.loss_backend == "liger":
        from potstill.divergences.liger import require_liger

        try:
            require_liger(device)
        except RuntimeError as err:
            raise PotstillError(str(err)) from None
    if recipe.train.deepspeed_config is not None:
        _check_deepspeed_config(kind, recipe.train.deepspeed_config)
    if kind == "zero3":
        require_deepspeed()
    if kind in ("fsdp2", "zero3"):
        for run in recipe.runs:
            minillm = run.on_policy is not None and run.on_policy.minillm is not None and kind == "zero3"
            if minillm or run.cross_tokenizer is not None:
                what = "method minillm" if minillm else "method cross_tokenizer"
                why = {
                    "method minillm": "its teacher-mixed sampling runs the partitioned teacher once per new "
                    "token, and a process whose samples ended stops calling it while the others still gather "
                    "its weights; fsdp2 gathers the teacher once for the whole generation",
                    "method cross_tokenizer": "the cross-tokenizer trainer has not been run with sharded models",
                }[what]
                alt = "fsdp2 or ddp" if minillm else "ddp"
                raise PotstillError(
                    f"run {run.name}: {what} is not supported under train.distributed {kind} yet "
                    f"({why}); set train.distributed {alt}"
                )


# The module each tracker of ``train.report_to`` needs (tensorboard: torch's SummaryWriter writes with it).
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_watch(recipe: Recipe) -> None:
    """Refuse, in one line, trackers that are not installed and ``eval_steps`` where models are sharded."""
    import importlib.util

    for name in recipe.train.report_to:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise PotstillError(
                f"train.report_to {name} needs the {TRACKER_MODULES[name]} package; pip install "
                f"'potstill[tracking]' (tensorboard) or {TRACKER_MODULES[name]}, or remove it"
            )
    if recipe.train.eval_steps is not None and recipe.train.distributed in ("fsdp2", "zero3"):
        raise PotstillError(
            f"train.eval_steps measures with whole models in the first process, but under "
            f"train.distributed {recipe.train.distributed} they are sharded; remove train.eval_steps "
            "(the held-out figures are measured at the end) or use ddp"
        )


def _check_deepspeed_config(kind: str, path: str) -> None:
    import json

    if kind != "zero3":
        raise PotstillError(
            f"train.deepspeed_config is for train.distributed zero3, not {kind}; remove it or set "
            "train.distributed zero3"
        )
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError) as err:
        raise PotstillError(
            f"train.deepspeed_config {path}: cannot read it as a DeepSpeed JSON config "
            f"({type(err).__name__}); fix the path or the file"
        ) from None
    if stage != 3:
        raise PotstillError(
            f"train.deepspeed_config {path}: zero_optimization.stage is {stage}, but train.distributed "
            "zero3 needs stage 3; set it to 3 (or use train.distributed ddp)"
        )


def start_processes(device: torch.device) -> None:
    """The process group of a multi-process run, made before the models are sharded (the Trainer reuses it)."""
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
