"""The ``potstill condense`` recipe: learn a small synthetic training set. Two flavours, told apart by ``kind``
(:func:`potstill.recipes.base.kind_of`: ``classification`` when absent, the one rule of every verb with flavours):

* ``classification``: a set of embeddings + soft labels for a text classifier (trajectory matching,
  Cazenavette et al. 2022, or gradient matching, Zhao et al. 2021; :mod:`potstill.dd.condense`);
* ``causal_lm``: soft prompts for an LLM student (experimental; :mod:`potstill.dd.condense_lm`).

Importable without torch; :mod:`potstill.runners.condense` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from potstill.errors import PotstillError
from potstill.recipes.base import (
    RecipeFile,
    Strict,
    apply_overrides,
    by_kind,
    read_source,
    validate_recipe,
)
from potstill.recipes.distill import Recipe, resolve_as_distill
from potstill.recipes.models import DataConfig, FromTeacherStudent, StudentConfig, TeacherConfig

__all__ = [
    "RECIPE",
    "CondenseData",
    "CondenseLMEval",
    "CondenseLMRecipe",
    "CondenseLMSettings",
    "CondenseLearner",
    "CondenseRecipe",
    "GradientMethod",
    "TrajectoryMethod",
    "load_condense_recipe",
]

# ------------------------------------------------------------------------------- classification


class CondenseData(Strict):
    pool_size: int = Field(
        2000,
        ge=4,
        description="Seeded random subset of the training split condensed from (and the random arm drawn from).",
    )
    eval_size: int = Field(872, ge=1, description="Held-out examples every arm is evaluated on (seeded subset).")
    eval_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="SMS spam only: stratified held-out share (SST-2 is evaluated on its dev split).",
    )


class CondenseLearner(Strict):
    encoder: str = Field(
        "all-minilm-l6-v2",
        description="Encoder of the learner: a short name, a local "
        "directory or a hub id (potstill.models.classifier.load_encoder).",
    )
    max_length: int = Field(48, ge=4, description="Tokens per example (real and synthetic).")
    trainable_layers: int = Field(
        0, ge=0, description="Top encoder layers the learner trains (0: a linear head on the frozen encoder)."
    )
    steps: int = Field(100, ge=1, description="Training steps of each evaluated learner (every arm).")
    lr: float = Field(1e-2, gt=0.0, description="Learning rate of each evaluated learner (AdamW).")
    batch_size: int = Field(16, ge=1, description="Batch size of each evaluated learner.")
    seeds: int = Field(3, ge=1, description="Learners per arm (seeds 0..seeds-1); mean and std are reported.")


class _MethodCommon(Strict):
    iterations: int = Field(40, ge=1, description="Outer iterations (one update of the synthetic set each).")
    lr_embed: float = Field(5e-2, gt=0.0, description="Adam lr of the synthetic embeddings.")
    lr_label: float = Field(1e-2, gt=0.0, description="Adam lr of the soft-label logits.")
    learn_labels: bool = Field(True, description="Learn the soft labels too.")
    reg_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the latent regularizer (distance to the "
        "nearest token embedding; keeps the text projection close).",
    )
    reg_kind: Literal["cosine", "l2", "sq"] = Field("cosine", description="Distance of the latent regularizer.")
    params: list[str] | None = Field(
        None,
        description="Matched parameter subset of the learner's top: names or "
        "dotted prefixes (e.g. [head]); null: all of them.",
    )


class TrajectoryMethod(_MethodCommon):
    kind: Literal["trajectory"] = "trajectory"
    syn_steps: int = Field(20, ge=1, description="Differentiable student steps on the synthetic set per iteration.")
    expert_span: int = Field(2, ge=1, description="Expert snapshots the student must cover (M).")
    syn_lr: float = Field(0.5, gt=0.0, description="Initial student learning rate.")
    learn_lr: bool = Field(True, description="Learn the student learning rate.")
    lr_lr: float = Field(1e-2, gt=0.0, description="Adam lr of the log student learning rate.")
    experts: int = Field(5, ge=1, description="Expert trajectories trained on the pool.")
    expert_steps: int = Field(100, ge=1, description="SGD steps of each expert.")
    save_every: int = Field(10, ge=1, description="Expert snapshot interval (steps).")
    expert_lr: float = Field(0.5, gt=0.0, description="Expert SGD learning rate.")
    expert_batch: int = Field(32, ge=1, description="Expert batch size.")

    @model_validator(mode="after")
    def _enough_snapshots(self) -> TrajectoryMethod:
        if self.save_every > self.expert_steps:
            raise ValueError(f"save_every={self.save_every} exceeds expert_steps={self.expert_steps}")
        if self.expert_steps // self.save_every < self.expert_span:
            raise ValueError(
                f"expert_span={self.expert_span} needs at least {self.expert_span + 1} snapshots, "
                f"experts keep {self.expert_steps // self.save_every + 1}; lower expert_span or save_every"
            )
        return self


class GradientMethod(_MethodCommon):
    kind: Literal["gradient"] = "gradient"
    inner_steps: int = Field(2, ge=1, description="Synthetic-set updates per learner init.")
    net_steps: int = Field(1, ge=1, description="Learner SGD steps on the synthetic set between updates.")
    real_batch: int = Field(128, ge=1, description="Real examples per class per gradient.")
    lr_net: float = Field(1e-2, gt=0.0, description="Learner SGD lr between updates.")
    n_inits: int | None = Field(
        None, ge=1, description="Cycle through this many fixed learner inits (null: a fresh one per iteration)."
    )


class CondenseRecipe(RecipeFile):
    verb: Literal["condense"] = Field("condense", description="The potstill command this recipe is for.")
    kind: Literal["classification"] = Field(
        "classification", description="classification (the default): a synthetic set for a text classifier."
    )
    dataset: Literal["sst2", "sms_spam"] = Field(
        ..., description="sst2 (negative=0/positive=1) or sms_spam (ham=0/spam=1), read from $POTSTILL_DATA."
    )
    output_dir: str = Field(
        "runs/condense", description="Where the condensed set, condensed.jsonl and condense_report.json go."
    )
    per_class: int = Field(10, ge=1, description="Synthetic examples per class.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the pool, eval subset, initial subset and condensation."
    )
    data: CondenseData = Field(default_factory=CondenseData, description="Pool and evaluation sizes.")
    learner: CondenseLearner = Field(
        default_factory=CondenseLearner, description="The learner (condensation and evaluation protocol)."
    )
    method: Annotated[TrajectoryMethod | GradientMethod, Field(discriminator="kind")] = Field(
        default_factory=TrajectoryMethod, description="Condensation objective: kind trajectory or gradient."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_method_kind(cls, data: Any) -> Any:
        method = data.get("method") if isinstance(data, dict) else None
        if isinstance(method, dict) and "kind" not in method:
            data = {**data, "method": {"kind": "trajectory", **method}}
        return data

    @model_validator(mode="after")
    def _pool_fits(self) -> CondenseRecipe:
        if self.data.pool_size < 2 * self.per_class:
            raise ValueError(f"data.pool_size={self.data.pool_size} is below 2 * per_class={2 * self.per_class}")
        return self


# ------------------------------------------------------------------------------- causal LM


class CondenseLMSettings(Strict):
    sequences: int = Field(8, ge=1, description="Soft-prompt sequences in the set.")
    length: int = Field(32, ge=2, description="Tokens per sequence.")
    init: Literal["real", "random"] = Field(
        "real", description="Start from a `length`-token window of seeded pool examples, or from random text tokens."
    )
    window: Literal["end", "start"] = Field(
        "end",
        description="Which tokens of a real example a window keeps: the "
        "last `length` (the end of the response) or the first (the chat "
        "header and prompt). Also the random real subsets of the evaluation.",
    )
    labels: Literal["teacher", "learned"] = Field(
        "teacher", description="Targets: the teacher on the current embeddings, or free logits started from it."
    )
    theta: Literal["student", "fresh"] = Field(
        "student",
        description="Match gradients at the student's own weights, or at freshly drawn ones every outer step.",
    )
    outer_steps: int = Field(40, ge=1, description="Outer steps (one set update per inner step).")
    inner_steps: int = Field(1, ge=1, description="Set updates per outer step (theta trained on the set between).")
    net_steps: int = Field(1, ge=1, description="SGD steps of theta on the set between inner steps.")
    lr_embed: float = Field(1e-3, gt=0.0, description="Adam lr of the soft-prompt embeddings.")
    lr_label: float = Field(1e-2, gt=0.0, description="Adam lr of learned label logits.")
    lr_net: float = Field(1e-2, gt=0.0, description="SGD lr of theta between inner steps.")
    reg_weight: float = Field(
        0.1, ge=0.0, description="Weight of the latent-space regularizer (distance to the nearest token embedding)."
    )
    real_batch: int = Field(8, ge=1, description="Pool sequences per real matching batch.")
    seed: int = Field(0, description="Seed of the initial examples, the random tokens and fresh thetas.")


class CondenseLMEval(Strict):
    steps: int = Field(50, ge=1, description="Adam steps of every evaluated student (each arm).")
    lr: float = Field(1e-3, gt=0.0, description="Adam lr of every evaluated student.")
    seeds: int = Field(3, ge=1, description="Random real subsets of the set's size (one per seed).")


class CondenseLMRecipe(RecipeFile):
    verb: Literal["condense"] = Field("condense", description="The potstill command this recipe is for.")
    kind: Literal["causal_lm"] = Field(
        ...,
        description="causal_lm: soft prompts for an LLM student (without it, condense learns a classification set).",
    )
    output_dir: str = Field("runs/condense_lm", description="Where the set, its text and the report go.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher (as in distill).")
    student: StudentConfig = Field(
        default_factory=FromTeacherStudent,
        description="The student (as in distill); it must share the teacher's tokenizer and embedding width.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="The distill data section: pool and held-out.")
    seed: int = Field(0, description="distill's train.seed: the initial weights of a scaled student.")
    condense: CondenseLMSettings = Field(default_factory=CondenseLMSettings, description="The set and its matching.")
    evaluate: CondenseLMEval | None = Field(
        default_factory=CondenseLMEval,
        description="Students trained on the set vs random real subsets of its size (null: skip).",
    )
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")

    def distill_recipe(self) -> Recipe:
        """The distill recipe of the student, teacher and data (what :class:`Prepared` loads)."""
        return Recipe.model_validate(
            {
                "output_dir": self.output_dir,
                "teacher": self.teacher.model_dump(mode="json"),
                "student": self.student.model_dump(mode="json"),
                "data": self.data.model_dump(mode="json"),
                "train": {"seed": self.seed},
                "runs": [{"name": "kd", "alpha": 0.0}],
                "device": self.device,
            }
        )

    def resolve_paths(self, base_dir: Path | None) -> None:
        """Data paths resolve as in distill; called once after validation, it also runs distill's own checks
        of the teacher, student and data sections (one line naming the key)."""
        if self.teacher.model is None:
            raise PotstillError("teacher.model is null: the soft prompts' labels are the teacher's; name a teacher")
        resolve_as_distill(self, base_dir, "condense")


RECIPE = by_kind(CondenseRecipe, CondenseLMRecipe)


def load_condense_recipe(source: str | Path | dict, overrides: Sequence[str] = ()):
    """A validated :class:`CondenseRecipe` (or, with ``kind: causal_lm``, a :class:`CondenseLMRecipe`) from a
    YAML file (``yaml.safe_load``) or a dict, with ``key.path=value`` overrides (``method.iterations=5``);
    any problem raises :class:`PotstillError` naming the key."""
    data = read_source(source, "dataset, per_class, method, learner, ...")
    apply_overrides(data, overrides, example="method.iterations=5")
    return validate_recipe(RECIPE, data, "condense", None if isinstance(source, dict) else Path(source).parent)
