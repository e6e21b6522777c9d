"""The training loop's settings: optimizer, steps, precision, engine, checkpoints, trackers, LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from potstill.recipes.base import Seed, Strict


class LoraConfig(Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt (never the lm_head)."
    )


class TrainConfig(Strict):
    max_steps: int = Field(40, ge=1, le=2**31 - 1, description="Optimizer steps per run (equal across runs).")
    batch_size: int = Field(8, ge=1, le=2**16, description="Per-device micro-batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=2**16, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: Seed = Field(0, description="Training seed (data order, init of random students).")
    chunk_size: int = Field(256, ge=1, description="Token rows per chunk in the fused lm_head + loss reducer.")
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    logging_steps: int = Field(5, ge=1, description="Log the loss every N steps (loss curves).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        [],
        description="Trackers the Trainer sends the logs to (each an optional extra; tensorboard writes "
        "under <output_dir>/logs/<run>). Empty (the default): nothing is sent or written anywhere else.",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Every N steps, measure the student on the held-out examples against the teacher "
        "(forward KL and top-1 agreement per response token) and log them as eval_forward_kl / "
        "eval_top1_agreement (trackers, train_info.json). Needs the teacher model.",
    )
    save_steps: int | None = Field(
        None,
        ge=1,
        description="Write a checkpoint every N steps under <output_dir>/checkpoints/<run>; a rerun of a "
        "killed run resumes from the latest one that verifies and ends with the same student. Off-policy runs "
        "(live teacher, caches, feature KD) and on-policy GKD / DistiLLM / DistiLLM-2 / MiniLLM; one process, ddp, "
        "fsdp2 or zero3.",
    )
    save_total_limit: int = Field(
        2,
        ge=2,
        le=1000,
        description="Checkpoints kept per run (the oldest go first; at "
        "least 2, so a kill while one is written leaves a whole one).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Student compute precision: fp32, or bf16/fp16 autocast (the Trainer's mixed precision; "
        "master weights stay float32, fp16 adds a loss scaler and needs a GPU).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the student's decoder layers in backward (non-reentrant activation "
        "checkpointing): less activation memory for about one more forward pass per step.",
    )
    loss_backend: Literal["potstill", "liger"] = Field(
        "potstill",
        description="Who computes the logit-KD loss: potstill's chunked reducer (every divergence and "
        "signal), or liger (Liger-Kernel's fused linear JSD: CUDA, pip install 'potstill[liger]', a live teacher, "
        "forward_kl / reverse_kl / generalized_jsd).",
    )
    distributed: Literal["none", "ddp", "fsdp2", "zero3"] = Field(
        "none",
        description="How the processes of `accelerate launch` share the work: none (one process), ddp "
        "(a whole student per process, gradients averaged), fsdp2 (student and teacher sharded with PyTorch "
        "FSDP2 through accelerate's plugin: each process holds 1/N of the weights, gradients and optimizer state) "
        "or zero3 (the same with DeepSpeed ZeRO stage 3: pip install 'potstill[deepspeed]').",
    )
    deepspeed_config: str | None = Field(
        None,
        description="With distributed zero3: a DeepSpeed JSON config (stage 3) used instead of the built-in "
        'one, e.g. to offload optimizer state or parameters to CPU; "auto" values are filled by the Trainer.',
    )
