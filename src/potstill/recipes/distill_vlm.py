"""The ``potstill distill_vlm`` recipe: a VLM teacher distilled into a VLM student on the text tokens of
image-text examples (image tokens masked, text tokens aligned across the two processors). Importable without
torch; :mod:`potstill.runners.distill_vlm` runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from potstill.paths import resolve_data_path
from potstill.recipes.base import RecipeFile, Seed, Strict
from potstill.recipes.models import check_temperature

__all__ = ["RECIPE", "VLMData", "VLMEval", "VLMLoss", "VLMModel", "VLMRecipe", "VLMTrain"]


class VLMModel(Strict):
    model: str = Field(
        ...,
        description="A local directory or a hub id loadable by AutoModelForImageTextToText + AutoProcessor "
        "(e.g. HuggingFaceTB/SmolVLM-256M-Instruct).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights' dtype (the student trains in it; float32 on CPU)."
    )


class VLMData(Strict):
    train: str = Field(
        ...,
        description="JSONL of {image, prompt, answer}: image a file path (relative to the JSONL's folder, absolute, "
        "or $POTSTILL_DATA/...); $POTSTILL_DATA/... and recipe-relative paths are resolved.",
    )
    eval: str | None = Field(
        None, description="Held-out JSONL of the same form (null: the last eval_fraction of train, seeded shuffle)."
    )
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Held-out share when eval is null.")
    max_train: int | None = Field(None, ge=1, description="Use at most this many training examples (null: all).")
    max_eval: int | None = Field(None, ge=1, description="Evaluate on at most this many examples (null: all).")
    seed: Seed = Field(0, description="Seed of the shuffle that splits and subsets the data.")


class VLMLoss(Strict):
    divergence: Literal["forward_kl", "reverse_kl", "total_variation"] = Field(
        "forward_kl", description="Per-token divergence D(p_teacher, q_student) on the aligned text tokens."
    )
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="Weight of CE on the labels; 1 - alpha on the divergence.")
    temperature: float = Field(1.0, gt=0.0, description="Distillation temperature of both softmaxes.")
    loss_on: Literal["answer", "text"] = Field(
        "answer", description="Which text tokens carry loss: the answer's, or every text token; image tokens never."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        check_temperature(v, "loss.temperature")
        return v


class VLMTrain(Strict):
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Examples per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(5e-5, gt=0.0, description="AdamW learning rate (linear warmup over warmup_steps, then constant).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_length: int | None = Field(
        None, ge=8, description="Refuse examples longer than this many tokens (image tokens included; null: no cap)."
    )
    chunk_size: int = Field(256, ge=1, description="Token rows per chunk of the fused lm_head + loss.")
    seed: Seed = Field(0, description="Seed of the batches and dropout.")
    use_cpu: bool = Field(False, description="Train on the CPU even when an accelerator is present.")


class VLMEval(Strict):
    batch_size: int = Field(8, ge=1, description="Evaluation batch size of the held-out forward KL.")


class VLMRecipe(RecipeFile):
    verb: Literal["distill-vlm"] = Field("distill-vlm", description="The potstill command this recipe is for.")
    teacher: VLMModel = Field(..., description="The VLM teacher.")
    student: VLMModel = Field(..., description="The VLM student (same tokenizer as the teacher, checked at load).")
    data: VLMData = Field(..., description="Image-text examples.")
    loss: VLMLoss = Field(default_factory=VLMLoss, description="The distillation loss.")
    train: VLMTrain = Field(default_factory=VLMTrain, description="Training of the student.")
    eval: VLMEval = Field(default_factory=VLMEval, description="Held-out forward KL on text tokens, before/after.")
    output_dir: str = Field(
        "runs/distill_vlm", description="Where the student (safetensors), metrics.json and the resolved recipe go."
    )

    @model_validator(mode="after")
    def _distinct(self) -> VLMRecipe:
        if self.data.eval is not None and self.data.eval == self.data.train:
            raise ValueError("data.eval is the training file; name a held-out file or set it to null")
        return self

    def resolve_paths(self, base_dir: Path | None) -> None:
        """``$POTSTILL_DATA/...`` and recipe-relative data paths made absolute; model paths are resolved
        against the recipe's folder only when they exist there (else they stay hub ids)."""
        self.data.train = resolve_data_path(self.data.train, base_dir)
        if self.data.eval is not None:
            self.data.eval = resolve_data_path(self.data.eval, base_dir)
        for m in (self.teacher, self.student):
            if m.model.startswith("$POTSTILL_DATA"):
                m.model = resolve_data_path(m.model, base_dir)
            elif base_dir is not None and not Path(m.model).is_absolute() and (base_dir / m.model).is_dir():
                m.model = str((base_dir / m.model).resolve())


RECIPE = VLMRecipe
