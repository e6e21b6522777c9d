"""The ``potstill eval-data`` recipe: judge distilled or selected training sets against real subsets of the same
size under one protocol. Two flavours by ``kind`` (absent: ``classification``; see
:func:`potstill.recipes.base.kind_of`): sets of labelled sentences for a text classifier, or
(``causal_lm``) instruction data and LLM students. Importable without torch; :mod:`potstill.runners.eval_data`
runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from potstill.errors import PotstillError
from potstill.recipes.base import RecipeFile, Strict, apply_overrides, by_kind, read_source, validate_recipe
from potstill.recipes.condense import CondenseData, CondenseLearner
from potstill.recipes.distill import CacheConfig, Recipe, resolve_as_distill
from potstill.recipes.methods import RunConfig
from potstill.recipes.models import DataConfig, FromTeacherStudent, StudentConfig, TeacherConfig
from potstill.recipes.train import TrainConfig

__all__ = [
    "RECIPE",
    "Baseline",
    "EvalDataLMRecipe",
    "EvalDataLearner",
    "EvalDataRecipe",
    "EvalDataTeacher",
    "EvalSet",
    "LMBaseline",
    "LMSet",
    "load_eval_data_recipe",
    "load_lm_recipe",
]

Baseline = Literal["random", "k_center", "herding", "kmeans_medoids"]
LMBaseline = Literal["random", "k_center", "kmeans_medoids", "herding"]
_LABELS: list[Literal["hard", "soft"]] = ["hard", "soft"]
_BASELINES: list[Baseline] = ["random", "k_center"]
_LM_BASELINES: list[LMBaseline] = ["random", "kmeans_medoids"]


# ------------------------------------------------------------------------------- classification


class EvalSet(Strict):
    name: str = Field(..., min_length=1, description="Name of the arm in the report.")
    path: str = Field(
        ...,
        min_length=1,
        description="File or directory ($POTSTILL_DATA/... or relative to the working directory, like output_dir).",
    )
    format: Literal["jsonl", "selection", "dilm"] = Field(
        ..., description="jsonl rows, a selection.json over this pool, or a directory of DiLM set files."
    )
    construction_seconds: float | None = Field(
        None,
        ge=0.0,
        description="Seconds it took to build one set (null: read from a report beside the set, else unknown).",
    )


class EvalDataLearner(CondenseLearner):
    schedule: Literal["linear", "cosine"] = Field(
        "linear",
        description="Learning-rate schedule of each evaluated learner, after a linear warmup over 10 % of the "
        "steps: linear (decay to 0) or cosine (transformers' get_cosine_schedule_with_warmup, DiLM's fine-tuning "
        "schedule). The teacher keeps linear.",
    )


class EvalDataTeacher(Strict):
    steps: int = Field(500, ge=1, description="Training steps of the teacher (the learner on the whole pool).")
    lr: float | None = Field(None, gt=0.0, description="Teacher lr (null: learner.lr).")
    batch_size: int = Field(64, ge=1, description="Teacher batch size.")


class EvalDataRecipe(RecipeFile):
    verb: Literal["eval-data"] = Field("eval-data", description="The potstill command this recipe is for.")
    kind: Literal["classification"] = Field(
        "classification", description="classification (the default): sets of labelled sentences, a text classifier."
    )
    dataset: Literal["sst2", "sms_spam"] = Field(
        ..., description="The real data the pool and held-out set come from, read from $POTSTILL_DATA."
    )
    output_dir: str = Field("runs/eval_data", description="Where eval_data.json goes.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the pool, the held-out subset, the teacher and the random draws."
    )
    data: CondenseData = Field(default_factory=CondenseData, description="Pool and evaluation sizes.")
    learner: EvalDataLearner = Field(
        default_factory=EvalDataLearner,
        description="The one learner every arm is trained with (learner.seeds learners per set).",
    )
    labels: list[Literal["hard", "soft"]] = Field(
        default_factory=lambda: list(_LABELS),
        min_length=1,
        description="hard: the set's labels; soft: the teacher's class probabilities on the set's inputs.",
    )
    teacher: EvalDataTeacher = Field(default_factory=EvalDataTeacher, description="Soft-label teacher.")
    baselines: list[Baseline] = Field(
        default_factory=lambda: list(_BASELINES),
        min_length=1,
        description="Real subsets of the same size and class balance.",
    )
    sets: list[EvalSet] = Field(
        ..., min_length=1, description="The sets to judge: {name, path, format, construction_seconds}."
    )

    @field_validator("labels", "baselines", "sets")
    @classmethod
    def _unique(cls, v: list, info) -> list:
        names = [x.name if isinstance(x, EvalSet) else x for x in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"'{dup}' is listed twice; name each once")
        if info.field_name == "baselines" and "random" not in v:
            raise ValueError("must include random (the gains are over it)")
        return v


# ------------------------------------------------------------------------------- causal LM


def _default_lm_runs() -> list[RunConfig]:
    return [RunConfig(name="hard", alpha=1.0), RunConfig(name="soft", alpha=0.0)]


class LMSet(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Name of the arm in the report.")
    path: str = Field(
        ...,
        min_length=1,
        description="selection: a selection.json of `potstill select` over this "
        "recipe's pool (the same data section), or its folder; jsonl: a file of prompt/response rows.",
    )
    format: Literal["selection", "jsonl"] = Field(
        "selection",
        description="selection: a subset of the pool; "
        "jsonl: new examples, e.g. synthetic.jsonl of `potstill synthesize`.",
    )
    prompt_field: str = Field("prompt", description="jsonl: the column holding the prompt.")
    response_field: str = Field("response", description="jsonl: the column holding the response.")
    construction_seconds: float | None = Field(
        None,
        ge=0.0,
        description="Seconds it took to build the set "
        "(null: read from selection_report.json or synthesis_report.json "
        "beside it, else unknown).",
    )


class EvalDataLMRecipe(RecipeFile):
    verb: Literal["eval-data"] = Field("eval-data", description="The potstill command this recipe is for.")
    kind: Literal["causal_lm"] = Field(
        ...,
        description="causal_lm: instruction data and LLM students (without it, eval-data judges classification sets).",
    )
    output_dir: str = Field(
        "runs/eval_data_lm", description="Where eval_data.json, arms.json and the baseline selections go."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher (as in distill).")
    student: StudentConfig = Field(
        default_factory=FromTeacherStudent, description="The student every arm starts from (as in distill)."
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The distill data section: the pool is its train split, the held-out examples its eval split.",
    )
    cache: CacheConfig | None = Field(
        None,
        description="Teacher-signal cache the KD runs train from (built by "
        "`potstill cache` with the same data); null: the live teacher.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Optimization of every learner; max_steps is ignored (equal epochs decide the steps).",
    )
    runs: list[RunConfig] = Field(
        default_factory=_default_lm_runs,
        min_length=1,
        description="How each arm is trained (distill runs): default hard (SFT) and soft (KD, forward KL, T 1).",
    )
    epochs: float = Field(2.0, gt=0.0, description="Epochs of every learner over its own set.")
    seeds: int = Field(1, ge=1, description="Learners per arm (train.seed + i); random draws one subset per seed.")
    baselines: list[LMBaseline] = Field(
        default_factory=lambda: list(_LM_BASELINES),
        min_length=1,
        description="Real subsets of the same size, drawn by `potstill select`.",
    )
    embeddings: Literal["minilm", "student_hidden"] = Field("minilm", description="Space of the coreset baselines.")
    full: bool = Field(True, description="Also train on the whole pool (one learner per run): the reference.")
    eval_batch_size: int = Field(8, ge=1, description="Examples per evaluation batch.")
    keep_students: bool = Field(False, description="Keep every trained student under output_dir/students.")
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")
    sets: list[LMSet] = Field(
        ..., min_length=1, description="The selections to judge: {name, path, construction_seconds}."
    )

    @field_validator("baselines", "sets", "runs")
    @classmethod
    def _unique(cls, v: list, info) -> list:
        names = [x if isinstance(x, str) else x.name for x in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"'{dup}' is listed twice; name each once")
        if info.field_name == "baselines" and "random" not in v:
            raise ValueError("must include random (the gains are over it)")
        if info.field_name == "sets":
            clash = next((n for n in names if n in ("full", "student_init", *get_args(LMBaseline))), None)
            if clash is not None:
                raise ValueError(f"set name '{clash}' is reserved for a reference arm; rename it")
        return v

    @model_validator(mode="after")
    def _checks(self) -> EvalDataLMRecipe:
        if self.data.selection is not None:
            raise ValueError(
                "data.selection is set: eval-data judges the selections listed in `sets` against "
                "the whole pool; remove data.selection"
            )
        if self.teacher.model is None:
            raise ValueError("teacher.model is null: held-out forward KL needs the teacher's logits; name a teacher")
        new = next((s.name for s in self.sets if s.format == "jsonl"), None)
        if new is not None and self.cache is not None:
            raise ValueError(
                f"set '{new}' holds new examples that the cache does not cover; remove `cache` so every "
                "arm trains from the live teacher alike"
            )
        return self

    def distill_recipe(self) -> Recipe:
        """The distill :class:`~potstill.recipes.distill.Recipe` of this protocol (pool, models, runs, cache)."""
        d = {
            "output_dir": self.output_dir,
            "teacher": self.teacher.model_dump(mode="json"),
            "student": self.student.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json"),
            "runs": [r.model_dump(mode="json") for r in self.runs],
            "eval": {"include_untrained": True},
            "device": self.device,
        }
        if self.cache is not None:
            d["cache"] = self.cache.model_dump(mode="json")
        return Recipe.model_validate(d)

    def resolve_paths(self, base_dir: Path | None) -> None:
        """Data paths ($POTSTILL_DATA/..., relative to ``base_dir``, the recipe's folder) resolve as in distill
        and select, so the same data section means the same pool; ``$POTSTILL_DATA/...`` set paths name the
        shared data directory (when the set is read). Called once after validation, it also runs distill's own checks (cache vs runs,
        divergences, ...), in one line naming the key."""
        resolve_as_distill(self, base_dir, "eval-data")


RECIPE = by_kind(EvalDataRecipe, EvalDataLMRecipe)


def load_eval_data_recipe(source: str | Path | dict, overrides: Sequence[str] = ()):
    """A validated :class:`EvalDataRecipe` from a YAML file or a dict, with ``key.path=value``
    overrides; any problem raises :class:`PotstillError` naming the key. A recipe with
    ``kind: causal_lm`` gives a :class:`EvalDataLMRecipe` instead."""
    data = read_source(source, "dataset, data, learner, sets, ...")
    for item in overrides:  # refuse sets.0.path=... in one line: a set is overridden whole
        head, _, rest = item.partition("=")[0].partition(".")
        if rest and isinstance(data.get(head), list):
            raise PotstillError(f"override '{item}': '{head}' is a list; override it whole, e.g. {head}=[...]")
    apply_overrides(data, overrides, example="learner.steps=20")
    return validate_recipe(RECIPE, data, "eval-data", None if isinstance(source, dict) else Path(source).parent)


def load_lm_recipe(data: dict, base_dir: Path | None = None) -> EvalDataLMRecipe:
    """A validated causal-LM recipe from a dict (overrides already applied); problems raise one-line errors."""
    return validate_recipe(EvalDataLMRecipe, data, "eval-data", base_dir)
