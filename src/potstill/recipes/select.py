"""The ``potstill select`` recipe: choose the training subset a student will learn from. Two flavours by ``kind``
(absent: ``classification``; see :func:`potstill.recipes.base.kind_of`):

* ``causal_lm`` (:class:`SelectRecipe`): the teacher, the scoring student, the data (the pool is *exactly* the
  train split that ``potstill distill`` makes from the same ``data`` section), an optional teacher-signal
  cache, and a ``select`` section: a scorer (a discriminated union on ``kind``), filters, and a budget;
* ``classification`` (:class:`ClsSelectRecipe`): ``per_class`` examples of every label of the pool that
  ``potstill eval-data`` and ``potstill condense`` draw for the same ``dataset``, ``seed`` and ``data``.

Importable without torch; :mod:`potstill.runners.select` runs it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from potstill.errors import PotstillError
from potstill.recipes.base import (
    RecipeFile,
    Strict,
    apply_overrides,
    by_kind,
    format_validation_error,
    read_recipe_file,
    validate_recipe,
)
from potstill.recipes.condense import CondenseData, CondenseLearner
from potstill.recipes.distill import CacheConfig, Recipe, resolve_data_source
from potstill.recipes.divergences import DivergenceConfig, ForwardKL
from potstill.recipes.eval_data import EvalDataTeacher
from potstill.recipes.models import DataConfig, FromTeacherStudent, StudentConfig, TeacherConfig

__all__ = [
    "KD_SCORERS",
    "RECIPE",
    "VALUATION_SCORERS",
    "ClsSelectConfig",
    "ClsSelectRecipe",
    "SelectConfig",
    "SelectRecipe",
    "ValuationConfig",
    "distill_recipe",
    "kd_scorer",
    "load_cls_select_recipe",
    "load_select_recipe",
    "scalar_scorer",
    "select_recipe_from_dict",
]

ScoringModel = Literal["student", "teacher"]
Embeddings = Literal["minilm", "student_hidden"]


# ------------------------------------------------------------------------------ scorers


class RandomScorer(Strict):
    kind: Literal["random"] = "random"


class PerplexityScorer(Strict):
    kind: Literal["perplexity"] = "perplexity"
    model: ScoringModel = Field("student", description="Whose perplexity of the response given the prompt.")


class IfdLossRatioScorer(Strict):
    kind: Literal["ifd_loss_ratio"] = "ifd_loss_ratio"
    model: ScoringModel = Field(
        "teacher",
        description="The model whose losses L(A|Q) / L(A) give Cherry LLM's IFD. The teacher by default: "
        "IFD asks whether the instruction helps a model that follows instructions, and a freshly cut or "
        "random-init student does not (its IFD is > 1 almost everywhere); a pretrained student may score too.",
    )


class IfdPplRatioScorer(Strict):
    kind: Literal["ifd_ppl_ratio"] = "ifd_ppl_ratio"
    model: ScoringModel = Field(
        "teacher",
        description="The model whose PPL(A|Q) / PPL(A) gives Superfiltering's "
        "IFD (see ifd_loss_ratio for the default).",
    )


class KdDivergenceScorer(Strict):
    kind: Literal["kd_divergence"] = "kd_divergence"
    divergence: DivergenceConfig = Field(
        default_factory=ForwardKL, description="Teacher-student divergence averaged over each response's tokens."
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Distillation temperature of the scores (a sparse cache must hold this temperature)."
    )


class ConfidentTeacherUnsureStudentScorer(Strict):
    kind: Literal["confident_teacher_unsure_student"] = "confident_teacher_unsure_student"
    temperature: float = Field(1.0, gt=0.0, description="Temperature of both distributions.")


class LessScorer(Strict):
    kind: Literal["less"] = "less"
    proj_dim: int = Field(8192, ge=1, description="Random-projection size of the LoRA gradients (LESS: 8192).")
    target: Literal["pool", "eval"] = Field(
        "pool",
        description="Target set whose loss the selection should lower: a seeded slice of the pool (held "
        "out of the selection) or the recipe's eval split (then the eval metrics are no longer held out).",
    )
    target_size: int = Field(16, ge=1, description="Target examples (pool: drawn with select.seed; eval: the first).")
    warmup_steps: int = Field(8, ge=1, description="AdamW steps of LoRA warmup on the pool before taking gradients.")
    learning_rate: float = Field(1e-4, gt=0.0, description="Warmup learning rate.")
    lora_r: int = Field(8, ge=1, description="LoRA rank of the gradient features (attention projections).")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    adam: bool = Field(True, description="Score with the Adam update direction (LESS) instead of the SGD gradient.")


class KCenterScorer(Strict):
    kind: Literal["k_center"] = "k_center"
    embeddings: Embeddings = Field(
        "minilm",
        description="minilm: all-MiniLM-L6-v2 over prompt + response text; student_hidden: the scoring "
        "student's final hidden state averaged over the example's tokens (L2-normalized).",
    )


class KMeansMedoidsScorer(Strict):
    kind: Literal["kmeans_medoids"] = "kmeans_medoids"
    embeddings: Embeddings = Field("minilm", description="See k_center.")
    iters: int = Field(100, ge=1, description="Lloyd iterations at most.")


class HerdingScorer(Strict):
    kind: Literal["herding"] = "herding"
    embeddings: Embeddings = Field("minilm", description="See k_center.")


ScoreConfig = Annotated[
    PerplexityScorer
    | IfdLossRatioScorer
    | IfdPplRatioScorer
    | KdDivergenceScorer
    | ConfidentTeacherUnsureStudentScorer,
    Field(discriminator="kind"),
]


class DeitaScorer(Strict):
    kind: Literal["deita"] = "deita"
    score: ScoreConfig = Field(
        default_factory=KdDivergenceScorer,
        description="Per-example score walked best first (select.largest says which end).",
    )
    threshold: float = Field(
        0.9, ge=-1.0, le=1.0, description="Skip an example whose cosine similarity to a chosen one exceeds this."
    )
    embeddings: Embeddings = Field("minilm", description="See k_center.")


ScorerConfig = Annotated[
    RandomScorer
    | PerplexityScorer
    | IfdLossRatioScorer
    | IfdPplRatioScorer
    | KdDivergenceScorer
    | ConfidentTeacherUnsureStudentScorer
    | LessScorer
    | KCenterScorer
    | KMeansMedoidsScorer
    | HerdingScorer
    | DeitaScorer,
    Field(discriminator="kind"),
]

KD_SCORERS = ("kd_divergence", "confident_teacher_unsure_student")
"""Scorers that read the teacher's distribution (from the cache when the recipe has one)."""


# ------------------------------------------------------------------------------ filters


class MinHashFilter(Strict):
    kind: Literal["minhash_dedup"] = "minhash_dedup"
    threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity of shingle sets at or above "
        "which a later example is a near-duplicate of a kept one.",
    )
    num_perm: int = Field(128, ge=2, description="MinHash permutations.")
    ngram: int = Field(5, ge=1, description="Shingle size.")
    unit: Literal["word", "char"] = Field("word", description="Shingles of words or of characters.")


class IfdAboveOneFilter(Strict):
    kind: Literal["drop_ifd_above_one"] = "drop_ifd_above_one"
    model: ScoringModel = Field(
        "teacher",
        description="The model whose L(A|Q) > L(A) marks a misaligned pair (see ifd_loss_ratio for the default).",
    )


FilterConfig = Annotated[MinHashFilter | IfdAboveOneFilter, Field(discriminator="kind")]


# ------------------------------------------------------------------------------- recipe


class SelectConfig(Strict):
    scorer: ScorerConfig = Field(default_factory=KdDivergenceScorer, description="How examples are ranked or chosen.")
    budget: int | float = Field(
        0.1, description="Examples to keep: a fraction of the pool in (0, 1] (0.1 = 10%, rounded up) or a count >= 1."
    )
    largest: bool = Field(
        True,
        description="Keep the highest scores (hardest: most divergence, perplexity, IFD, "
        "influence); false keeps the lowest. Ignored by random and embedding selectors.",
    )
    filters: list[FilterConfig] = Field(default_factory=list, description="Applied in order before the budget.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of random picks, k-means, k-center's first point and LESS."
    )
    batch_size: int = Field(8, ge=1, description="Examples per scoring forward pass.")
    chunk_size: int = Field(256, ge=1, description="Token rows per chunk of [rows, vocab] logits while scoring.")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, bool):
            raise ValueError("budget must be a fraction in (0, 1] or a count >= 1")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"budget={v} keeps nothing; give a count >= 1 or a fraction in (0, 1]")
        if isinstance(v, float) and not (0.0 < v <= 1.0 and math.isfinite(v)):
            raise ValueError(f"budget={v} must be a fraction in (0, 1] (or an integer count)")
        return v


class SelectRecipe(RecipeFile):
    verb: Literal["select"] = Field("select", description="The potstill command this recipe is for.")
    kind: Literal["causal_lm"] = Field(
        "causal_lm", description="causal_lm: score an LLM recipe's instruction data (classification: a text pool)."
    )
    output_dir: str = Field("runs/select", description="Where selection.json, selected.jsonl and the report go.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher (as in the distill recipe).")
    student: StudentConfig = Field(
        default_factory=FromTeacherStudent,
        description="The scoring student: the KD student's initial state (as in the distill recipe).",
    )
    student_seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="The distill recipe's train.seed: the initial weights of a scaled (random-init) scoring student.",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The distill recipe's data section: the pool is its train split, example for example.",
    )
    cache: CacheConfig | None = Field(
        None,
        description="The distill recipe's cache section: KD-aware scores read the teacher from this cache "
        "(written by `potstill cache`) instead of running it.",
    )
    select: SelectConfig = Field(default_factory=SelectConfig, description="Scorer, filters and budget.")
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")

    def resolve_paths(self, base_dir: Path | None) -> None:
        """$POTSTILL_DATA/ and recipe-relative file paths, exactly as a distill recipe resolves them."""
        resolve_data_source(self.data.source, base_dir)  # distill's rule for a data section

    @model_validator(mode="after")
    def _check(self) -> SelectRecipe:
        if self.data.selection is not None:
            raise ValueError(
                "data.selection belongs in the distill recipe; a select recipe scores the whole pool, remove it"
            )
        kinds = score_kinds(self.select)
        if self.teacher.model is None:
            needs = sorted(k for k in kinds if k in KD_SCORERS) + sorted(
                f"{k} (model: teacher)" for k, m in model_uses(self.select) if m == "teacher"
            )
            if needs:
                raise ValueError(
                    f"{', '.join(needs)} need the teacher's weights, which a black-box teacher "
                    "(teacher.model null) does not have; choose another scorer or name a teacher"
                )
        kd = kd_scorer(self.select)
        if self.cache is not None and kd is not None and self.cache.signal.kind != "dense":
            t = self.cache.temperature
            if t is not None and t != kd.temperature:
                raise ValueError(
                    f"cache.temperature={t} but the scorer's temperature is {kd.temperature}; a "
                    f"{self.cache.signal.kind} cache holds one temperature: make them equal"
                )
        return self


def score_kinds(sel: SelectConfig) -> set[str]:
    s = sel.scorer
    return {s.kind} | ({s.score.kind} if isinstance(s, DeitaScorer) else set())


def scalar_scorer(sel: SelectConfig):
    """The per-example score config of the selection (DEITA's inner score), or None."""
    s = sel.scorer
    return s.score if isinstance(s, DeitaScorer) else s


def kd_scorer(sel: SelectConfig):
    s = scalar_scorer(sel)
    return s if s.kind in KD_SCORERS else None


def model_uses(sel: SelectConfig) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [(f.kind, f.model) for f in sel.filters if isinstance(f, IfdAboveOneFilter)]
    s = scalar_scorer(sel)
    if isinstance(s, (PerplexityScorer, IfdLossRatioScorer, IfdPplRatioScorer)):
        out.append((s.kind, s.model))
    return out


def select_recipe_from_dict(
    data: dict, overrides: list[str] | None = None, base_dir: Path | None = None
) -> SelectRecipe:
    """Validate a causal-LM select recipe (``key=value`` overrides applied first); data paths resolved as
    distill does."""
    data = apply_overrides(dict(data or {}), overrides or [])
    return validate_recipe(SelectRecipe, data, "select", base_dir)


def distill_recipe(sr: SelectRecipe) -> Recipe:
    """The distill :class:`~potstill.recipes.distill.Recipe` whose train split is this selection's pool.

    Teacher, student (and ``train.seed``), data and device are the select recipe's; the
    cache is kept only when a KD-aware scorer reads it; one run stands for the scorer
    (its divergence and temperature, so the cache's temperature resolves as distill's does).
    """
    kd = kd_scorer(sr.select)
    black_box = sr.teacher.model is None
    run: dict[str, Any] = {"name": "select", "alpha": 1.0 if black_box else 0.0}
    if kd is not None:
        run["temperature"] = kd.temperature
        if isinstance(kd, KdDivergenceScorer):
            run["divergence"] = kd.divergence.model_dump(mode="json")
    d = {
        "output_dir": sr.output_dir,
        "teacher": sr.teacher.model_dump(mode="json"),
        "student": sr.student.model_dump(mode="json"),
        "data": sr.data.model_dump(mode="json"),
        "train": {"seed": sr.student_seed, "chunk_size": sr.select.chunk_size},
        "runs": [run],
        "eval": {"include_untrained": False},
        "device": sr.device,
    }
    if sr.cache is not None and kd is not None:
        d["cache"] = sr.cache.model_dump(mode="json")
    try:
        return Recipe.model_validate(d)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, d, "select")) from None


# ------------------------------------------------------------------------------- classification


VALUATION_SCORERS = ("knn_shapley", "tmc_shapley")
"""Classification scorers that value every example and keep the highest values per class."""


class ValuationConfig(Strict):
    val_size: int = Field(
        200,
        ge=1,
        description="Held-out validation points (the test points of the valuation), drawn from the pool with "
        "select.seed and never selected; the eval split is never used.",
    )
    k: int = Field(10, ge=1, description="knn_shapley: neighbours K of the unweighted K-NN classifier (Jia 2019).")
    permutations: int = Field(200, ge=1, description="tmc_shapley: Monte-Carlo permutations at most.")
    tolerance: float = Field(
        0.01,
        ge=0.0,
        description="tmc_shapley: truncate a permutation once the running validation accuracy is within this "
        "of the full-data accuracy (Ghorbani & Zou 2019, Alg. 1; 0: never truncate).",
    )
    convergence: float | None = Field(
        0.05,
        gt=0.0,
        description="tmc_shapley: stop early when the values changed by less than this fraction over the last "
        "100 permutations (the paper's rule; null: run all permutations).",
    )
    max_pool: int = Field(
        1000, ge=1, description="tmc_shapley: refuse to value more examples than this (its cost grows as N^2)."
    )
    suspect_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of the valued examples with the lowest values listed as suspected mislabels "
        "(selection_report.json `suspects`).",
    )


class ClsSelectConfig(Strict):
    per_class: int = Field(..., ge=1, description="Examples kept per label (DiLM's budgets: 5, 10, 20).")
    scorer: Literal["random", "k_center", "kmeans_medoids", "herding", "knn_shapley", "tmc_shapley"] = Field(
        "herding",
        description="How the examples of each class are picked among the survivors; knn_shapley (Jia et al. "
        "2019, exact K-NN Shapley) and tmc_shapley (Ghorbani & Zou 2019, nearest-centroid learner) keep the "
        "highest data values.",
    )
    valuation: ValuationConfig = Field(
        default_factory=ValuationConfig, description="knn_shapley / tmc_shapley only: validation split and settings."
    )
    teacher_confident: float | None = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Keep only examples whose label "
        "the pool-trained teacher gives at least this probability (null: "
        "no filter, no teacher).",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of random picks, k-means, k-center's first point and valuation."
    )

    @model_validator(mode="after")
    def _valuation_only_for_valuers(self) -> ClsSelectConfig:
        if "valuation" in self.model_fields_set and self.scorer not in VALUATION_SCORERS:
            raise ValueError(
                f"select.valuation applies to scorers {', '.join(VALUATION_SCORERS)}, not {self.scorer}; "
                "remove it or choose one of them"
            )
        return self


class ClsSelectRecipe(RecipeFile):
    verb: Literal["select"] = Field("select", description="The potstill command this recipe is for.")
    kind: Literal["classification"] = Field(
        "classification",
        description="classification: pick from a labelled text pool "
        "(without it, select works on an LLM recipe's instruction data).",
    )
    dataset: Literal["sst2", "sms_spam"] = Field(
        ..., description="The data the pool comes from, read from $POTSTILL_DATA (as eval-data and condense)."
    )
    output_dir: str = Field("runs/select_cls", description="Where selection.json and its report go.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the pool draw and of the teacher (as eval-data's seed)."
    )
    data: CondenseData = Field(
        default_factory=CondenseData,
        description="Pool size (and eval split) exactly as the eval-data recipe that judges the selection.",
    )
    learner: CondenseLearner = Field(
        default_factory=CondenseLearner,
        description="The learner whose features give the coreset space and whose pool-trained top is the teacher.",
    )
    teacher: EvalDataTeacher = Field(default_factory=EvalDataTeacher, description="Training of the teacher.")
    select: ClsSelectConfig = Field(..., description="per_class, scorer, teacher_confident, seed.")


RECIPE = by_kind(ClsSelectRecipe, SelectRecipe)


def load_select_recipe(path: str | Path, overrides: list[str] | None = None):
    """Read a YAML select recipe (``yaml.safe_load``) and apply ``key=value`` overrides: a
    :class:`ClsSelectRecipe` (the default ``kind``, classification) or a :class:`SelectRecipe` (``kind:
    causal_lm``)."""
    data = read_recipe_file(path, "kind, teacher, student, data, select")
    apply_overrides(data, overrides or [], example="select.per_class=10")
    return validate_recipe(RECIPE, data, "select", Path(path).parent)


def load_cls_select_recipe(data: dict, overrides: Sequence[str] = ()) -> ClsSelectRecipe:
    """A validated classification recipe from a dict, with ``key.path=value`` overrides; problems raise one line."""
    data = apply_overrides(copy.deepcopy(data), list(overrides), example="select.per_class=10")
    return validate_recipe(ClsSelectRecipe, data, "select")
