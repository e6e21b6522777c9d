"""The ``potstill classify`` recipe: task-specific KD of a text classifier (teacher, student, loss, training,
evaluation). Importable without torch; :mod:`potstill.runners.classify` runs it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from potstill.errors import PotstillError
from potstill.recipes.base import RecipeFile, Strict, apply_overrides, format_validation_error, read_recipe_file
from potstill.recipes.models import check_temperature
from potstill.recipes.options import SGLDSettings

__all__ = [
    "BayesianMethod",
    "ClassifierData",
    "ClassifierEval",
    "ClassifierKD",
    "ClassifierRecipe",
    "ClassifierTeacher",
    "ClassifierTrain",
    "KDMethod",
    "LayerSubsetStudent",
    "NarrowStudent",
    "RECIPE",
    "SGLDSettings",
    "load_classifier_recipe",
]


class ClassifierData(Strict):
    train_size: int | None = Field(
        None, ge=2, description="Use a seeded random subset of this many training examples (null: all)."
    )
    eval_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="SMS spam only: stratified held-out share (SST-2 is evaluated on its dev split).",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the split and of the subsets.")


class ClassifierTeacher(Strict):
    model: str = Field(
        "all-minilm-l6-v2",
        description="Encoder: a short name (all-minilm-l6-v2), a local "
        "directory or a hub id; fine-tuned with a new head, weights cached in output_dir.",
    )
    steps: int = Field(200, ge=1, description="Fine-tuning steps of the teacher (hard labels only).")
    batch_size: int = Field(16, ge=1, description="Teacher fine-tuning batch size.")
    lr: float = Field(1e-4, gt=0.0, description="Teacher fine-tuning learning rate (AdamW).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the teacher's head init, batches and dropout.")


class LayerSubsetStudent(Strict):
    kind: Literal["layers"] = "layers"
    layers: int | list[int] = Field(
        2,
        description="Teacher layers kept (count, evenly spaced, or indices); "
        "embeddings, layers and head copied from the fine-tuned teacher.",
    )


class NarrowStudent(Strict):
    kind: Literal["narrow"] = "narrow"
    num_layers: int = Field(..., ge=1, description="Layers of the random-init student.")
    hidden_size: int = Field(..., ge=8, description="Width of the student.")
    num_attention_heads: int = Field(..., ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; default 4 * hidden_size.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the random init.")


class ClassifierKD(Strict):
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the hard-label CE; 1 - alpha on the "
        "T^2-scaled KL to the teacher's soft labels (Hinton et al. 2015).",
    )
    temperature: float = Field(2.0, gt=0.0, description="Distillation temperature of both softmaxes.")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        check_temperature(v, "kd.temperature")
        return v

    hidden_weight: float = Field(1.0, ge=0.0, description="Weight of the hidden-state MSE (TinyBERT eq. 7).")
    layer_map: list[tuple[int, int]] | None = Field(
        None,
        description="(student, teacher) hidden-state index pairs, 0 = embeddings; null: each student layer "
        "to the teacher layer it was copied from (narrow students: TinyBERT's uniform map).",
    )


class KDMethod(Strict):
    kind: Literal["kd"] = Field("kd", description="Hinton KD (the kd: section) against the no-teacher student.")


class BayesianMethod(Strict):
    kind: Literal["bayesian"] = Field(
        "bayesian",
        description="Bayesian KD (Fang et al. ICML 2024): a teacher-informed Dirichlet prior on the student's "
        "class probabilities, the posterior sampled with SGLD; adds a bayesian_student to the comparison.",
    )
    prior_strength: float = Field(
        4.0, gt=0.0, description="lambda: Dirichlet concentration 1 + lambda * teacher probabilities (at temperature)."
    )
    temperature: float = Field(
        2.0, gt=0.0, description="tau of the teacher soft labels and of the prior's student side."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        check_temperature(v, "method.temperature")
        return v

    warm_start: bool = Field(
        True,
        description="Start the chain at the posterior mode: train.steps AdamW steps of the equivalent KD loss "
        "(alpha = tau^2 / (tau^2 + lambda), no hidden-state term) from the student init.",
    )
    level: float = Field(0.95, gt=0.0, lt=1.0, description="Credible level of the per-example intervals.")
    sgld: SGLDSettings = Field(default_factory=SGLDSettings, description="The SGLD sampler.")


class ClassifierTrain(Strict):
    steps: int = Field(200, ge=1, description="Training steps of each student (same for KD and no-teacher).")
    batch_size: int = Field(16, ge=1, description="Student batch size.")
    lr: float = Field(1e-4, gt=0.0, description="Student learning rate (AdamW, warmup then linear decay).")
    max_length: int = Field(64, ge=8, description="Truncate every text to this many tokens (teacher too).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the students' batches and dropout.")


class ClassifierEval(Strict):
    size: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out examples (seeded subset; null: all)."
    )
    batch_size: int = Field(64, ge=1, description="Evaluation batch size.")
    latency_batch_size: int = Field(32, ge=1, description="Batch of the latency measurement.")
    latency_repeats: int = Field(5, ge=1, description="Timed forwards; the median is reported.")


class ClassifierRecipe(RecipeFile):
    verb: Literal["classify"] = Field("classify", description="The potstill command this recipe is for.")
    dataset: Literal["sms_spam", "sst2"] = Field(
        ..., description="sms_spam (ham=0/spam=1) or sst2 (negative=0/positive=1), read from $POTSTILL_DATA."
    )
    output_dir: str = Field(
        "runs/classify",
        description="Where metrics.json, report.md, the resolved recipe and the cached teacher weights go.",
    )
    data: ClassifierData = Field(default_factory=ClassifierData, description="Split and subset of the data.")
    teacher: ClassifierTeacher = Field(default_factory=ClassifierTeacher, description="The fine-tuned teacher.")
    student: Annotated[LayerSubsetStudent | NarrowStudent, Field(discriminator="kind")] = Field(
        default_factory=LayerSubsetStudent, description="How the student is built: kind layers or narrow."
    )
    kd: ClassifierKD = Field(default_factory=ClassifierKD, description="Distillation loss of the KD student.")
    method: Annotated[KDMethod | BayesianMethod, Field(discriminator="kind")] = Field(
        default_factory=KDMethod, description="kind kd (the KD student only) or bayesian (also Bayesian KD)."
    )
    train: ClassifierTrain = Field(default_factory=ClassifierTrain, description="Training of both students.")
    eval: ClassifierEval = Field(default_factory=ClassifierEval, description="Held-out evaluation and latency.")

    @model_validator(mode="before")
    @classmethod
    def _default_student_kind(cls, data: Any) -> Any:
        student = data.get("student") if isinstance(data, dict) else None
        if isinstance(student, dict) and "kind" not in student:
            data = {**data, "student": {"kind": "layers", **student}}
        method = data.get("method") if isinstance(data, dict) else None
        if isinstance(method, dict) and "kind" not in method:
            raise ValueError("method needs a kind: use method: {kind: kd} or method: {kind: bayesian, ...}")
        return data

    @model_validator(mode="after")
    def _student_fits(self) -> ClassifierRecipe:
        s = self.student
        if isinstance(s, NarrowStudent) and s.hidden_size % s.num_attention_heads:
            raise ValueError(
                f"student.hidden_size={s.hidden_size} is not divisible by num_attention_heads={s.num_attention_heads}"
            )
        return self


RECIPE = ClassifierRecipe


def load_classifier_recipe(source: str | Path | dict, overrides: Sequence[str] = ()) -> ClassifierRecipe:
    """A validated :class:`ClassifierRecipe` from a YAML file (``yaml.safe_load``) or a dict, with
    ``key.path=value`` overrides; any problem raises :class:`PotstillError` naming the key."""
    sections = "dataset, teacher, student, kd, train, ..."
    data = copy.deepcopy(source) if isinstance(source, dict) else read_recipe_file(source, sections)
    apply_overrides(data, overrides, example="kd.temperature=4")
    try:
        return ClassifierRecipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "classify")) from None
