"""The ``potstill distill`` recipe: teacher, student, data, runs, cache, generation, evaluation.

Every choice is a discriminated union on ``kind`` (or ``name`` for divergences), every model forbids unknown
keys, and every field is documented once, where it is declared. The resolved recipe is written into the output
directory next to the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from potstill.errors import PotstillError
from potstill.paths import resolve_data_path
from potstill.recipes.base import (
    RecipeFile,
    Seed,
    Strict,
    apply_overrides,
    format_validation_error,
    read_recipe_file,
)
from potstill.recipes.methods import RunConfig, default_runs
from potstill.recipes.models import (
    DataConfig,
    DistillTeacher,
    FileData,
    FromTeacherStudent,
    SelfTeacher,
    StudentConfig,
    TeacherConfig,
    check_temperature,
)
from potstill.recipes.train import TrainConfig

"""A seed numpy, torch and Python's random all accept (numpy refuses negatives and >= 2**32)."""


"""Rows of the report that are not runs: a run of that name would silently replace them."""


"""A plain directory name: no separators, and never '.' or '..' (a run dir must lie inside output_dir/runs)."""


class TopKCache(Strict):
    kind: Literal["topk"] = "topk"
    k: int = Field(32, ge=1, description="Teacher log-probs kept per token (the k most likely), plus the tail mass.")
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket", description="Tail handling: one extra outcome (bucket) or drop and renormalize (biased)."
    )


class SampledCache(Strict):
    kind: Literal["sampled"] = "sampled"
    draws: int = Field(12, ge=1, le=255, description="Tokens drawn per position (Anshumann et al. 2025); unbiased.")
    proposal_temperature: float = Field(
        1.0, gt=0.0, description="Draw from the teacher at this extra temperature (importance-weighted when != 1)."
    )

    @field_validator("proposal_temperature")
    @classmethod
    def _proposal(cls, v: float) -> float:
        return check_temperature(v, "cache.signal.proposal_temperature")


class DenseCache(Strict):
    kind: Literal["dense"] = "dense"


CacheSignalConfig = Annotated[TopKCache | SampledCache | DenseCache, Field(discriminator="kind")]


class RefreshConfig(Strict):
    threshold: float | None = Field(
        None,
        ge=0.0,
        description="`potstill cache --refresh` recomputes the examples whose drift KL(new || old), in nats per "
        "response token, exceeds this; default 0.01 unless `fraction` is given.",
    )
    fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Recompute this top fraction of examples by drift instead (one process)."
    )
    probe_tokens: int | None = Field(
        16, ge=1, description="Response tokens per example the drift is measured on (null: all of them, exact)."
    )

    @model_validator(mode="after")
    def _one_rule(self) -> RefreshConfig:
        if self.threshold is not None and self.fraction is not None:
            raise ValueError("cache.refresh: give threshold or fraction, not both")
        return self


class CertifyConfig(Strict):
    tolerance: float = Field(
        0.05,
        gt=0.0,
        description="Largest relative bias of the student's output-head gradient a setting may have (the loss and "
        "logit-gradient errors are reported beside it).",
    )
    noise_tolerance: float = Field(
        0.25,
        ge=0.0,
        description="Largest share a sampled signal's draws may add to the minibatch variance of a step's progress "
        "along the gradient (x progresses like the live teacher with a batch 1/(1+x) as large).",
    )
    probe_examples: int = Field(
        16, ge=2, description="Training examples the certificate's probe reads (two or more: it compares them)."
    )
    max_rows: int = Field(512, ge=1, description="Response tokens of the probe, at most.")
    seeds: int = Field(8, ge=2, description="Draw seeds a sampled setting is measured over (its spread).")
    candidates: list[int] | None = Field(
        None, description="k (topk) or draws (sampled) to certify; default 8..128 or 4..64 and the cache's own."
    )


class CacheConfig(Strict):
    dir: str | None = Field(None, description="Cache directory; default: <output_dir>/teacher_cache.")
    signal: CacheSignalConfig = Field(default_factory=TopKCache, description="What is stored per token.")
    dtype: Literal["fp32", "fp16", "bf16", "int8"] = Field("fp16", description="Storage of the log-probs.")
    temperature: float | None = Field(
        None, gt=0.0, description="Temperature of the stored distribution; default: the runs' temperature."
    )
    examples_per_shard: int = Field(256, ge=1, description="Examples per shard file (the unit of resume).")
    batch_size: int = Field(8, ge=1, description="Teacher batch size while caching.")
    seed: Seed = Field(0, description="Seed of the sampled draws (per example, so any sharding gives one cache).")
    verify: bool = Field(
        True,
        description="Check every shard's sha256 when the cache is opened, before training (sizes are always checked).",
    )
    refresh: RefreshConfig = Field(
        default_factory=RefreshConfig, description="Which examples `potstill cache --refresh` recomputes."
    )
    certify: CertifyConfig = Field(
        default_factory=CertifyConfig, description="What `potstill cache --certify` measures and tolerates."
    )
    allow_mixed: bool = Field(
        False,
        description="Train on a refreshed cache that still holds rows of an earlier teacher (refused by default).",
    )

    @field_validator("temperature")
    @classmethod
    def _cache_temperature(cls, v: float | None) -> float | None:
        return check_temperature(v, "cache.temperature")


class VLLMOptions(Strict):
    mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: a vLLM engine in this process, sharing the GPU with training (on-policy: "
        "the student's weights are copied into it after each optimizer step); server: a vLLM server you start "
        "(`trl vllm-serve --model ...`), reached over HTTP at server_url (weights synced through its "
        "weight-update endpoints).",
    )
    server_url: str = Field("http://localhost:8000", description="server mode: the server's base URL.")
    server_timeout: float = Field(240.0, gt=0, description="server mode: seconds to wait for the server to answer.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="colocate mode: share of the GPU's memory vLLM may take (weights + KV cache)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="colocate mode: GPUs one engine spans.")
    max_model_len: int | None = Field(
        None, ge=16, description="colocate mode: the engine's context length (default: the model's)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="colocate mode: the engine's weights dtype."
    )


class GenerationOptions(Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who generates: hf (transformers' generate, any device, the default) or vllm (pip install "
        "'potstill[vllm]', CUDA): the teacher's answers for the demo data and on-policy sampling.",
    )
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="Options of the vllm backend.")


class EvalConfig(Strict):
    max_new_tokens: int = Field(32, ge=1, description="Greedy generation length for ROUGE-L and tokens/s.")
    batch_size: int = Field(8, ge=1, le=2**16, description="Evaluation batch size.")
    include_untrained: bool = Field(True, description="Also evaluate the student before training.")
    embedding_diversity: bool = Field(
        True,
        description="Report each model's embedding spread (1 - mean pairwise cosine of its answers' "
        "all-MiniLM-L6-v2 embeddings); skipped with a warning when the encoder is not installed.",
    )
    harness: HarnessConfig | None = Field(
        None, description="Also score every model with lm-evaluation-harness; scores join metrics.json and the report."
    )
    collapse_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="A student whose distinct-2 or embedding spread is below this fraction of the teacher's is "
        "flagged as collapsed in the report.",
    )


class HarnessConfig(Strict):
    """lm-evaluation-harness on the teacher and every student (:mod:`potstill.eval.harness`; the `harness` extra)."""

    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="Tasks: potstill_sms_spam, potstill_sst2, potstill_pubmedqa, potstill_gsm8k (offline, from "
        "$POTSTILL_DATA) or any lm-eval task name (which downloads its data).",
    )
    limit: int | None = Field(50, ge=1, description="Examples per task (null: all; a CPU run wants a limit).")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (null: each task's own default).")
    max_gen_toks: int | None = Field(None, ge=1, description="Cap on generated tokens of generation tasks.")


class PushToHub(Strict):
    repo: str = Field(
        ...,
        min_length=3,
        description="Hub repository of each student, e.g. you/smol-student-{run} "
        "({run}: the run's name; needed with several runs).",
    )
    private: bool = Field(True, description="Create the repositories private.")


CompareMetric = Literal["forward_kl", "top1_agreement", "nll"]
COMPARE_METRICS: tuple[CompareMetric, ...] = ("forward_kl", "top1_agreement", "nll")


class CompareConfig(Strict):
    """`potstill compare`: the recipe's runs trained once per seed, and each against a baseline run, paired per
    held-out example (:mod:`potstill.eval.verdict`)."""

    seeds: list[Seed] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Training seeds; each run is trained once per seed.",
    )
    baseline: str | None = Field(None, description="The run every other run is compared with (default: the first).")
    metrics: list[CompareMetric] = Field(
        default_factory=lambda: list(COMPARE_METRICS),
        min_length=1,
        description="Per-example teacher-forced metrics compared (means over each example's response tokens).",
    )
    level: float = Field(
        0.95, gt=0.5, lt=1.0, description="Confidence level; Holm keeps the family-wise error below 1 - level."
    )
    n_boot: int = Field(2000, ge=200, description="Bootstrap resamples of seeds x held-out examples.")
    df: Literal["satterthwaite", "seeds"] = Field(
        "satterthwaite",
        description="Degrees of freedom of each interval: satterthwaite (the crossed seeds x examples design's, "
        "about S - 1 when the seeds dominate and more when the held-out examples do) or seeds (S - 1, the rule of "
        "potstill's verdicts before it; 4.3-fold wide at 3 seeds).",
    )
    match: Literal["steps", "flops"] = Field(
        "steps",
        description="steps: every run trains train.max_steps; flops: each run gets the steps that bring its "
        "estimated training compute (6 N_student + 2 N_teacher per token read) to the costliest run's at "
        "train.max_steps, so a cheaper run (SFT) trains longer.",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"compare.seeds repeats a seed: {v}; list each seed once")
        return v


class Recipe(RecipeFile):
    verb: Literal["distill"] = Field("distill", description="The command this recipe is for: `potstill distill`.")
    output_dir: str = Field("runs/demo", description="Where the resolved recipe, students, metrics and report go.")
    teacher: DistillTeacher = Field(
        default_factory=TeacherConfig,
        description="The teacher: a model (kind model, the default) or the student's own earlier self (kind self).",
    )
    extra_teachers: list[TeacherConfig] = Field(
        default_factory=list, description="Further teachers for runs with multi_teacher (any tokenizer)."
    )
    student: StudentConfig = Field(default_factory=FromTeacherStudent, description="How the student is built.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out examples.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization, equal for every run.")
    runs: list[RunConfig] = Field(default_factory=default_runs, description="Students to train and compare.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions, description="The generation engine (teacher answers, on-policy sampling)."
    )
    push_to_hub: PushToHub | None = Field(
        None,
        description="Upload each finished student to a hub repository after the report (off by default: "
        "nothing leaves this machine unless named here); needs a token (HF_TOKEN or huggingface-cli login).",
    )
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")
    cache: CacheConfig | None = Field(
        None, description="Distill from a teacher-signal cache (`potstill cache` writes it) instead of a live teacher."
    )
    compare: CompareConfig = Field(
        default_factory=CompareConfig,
        description="`potstill compare`: seeds, baseline run and metrics of the verdict table (distill ignores it).",
    )

    def resolve_paths(self, base_dir: Path | None) -> None:
        resolve_data_source(self.data.source, base_dir)

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"run names must be unique, repeated: {dup}")
        if not self.runs:
            raise ValueError("`runs` is empty; add at least one run")
        if self.cache is not None:
            self._check_cache(self.cache)
        if isinstance(self.teacher, SelfTeacher):
            self.teacher.check_recipe(self)
        elif self.teacher.model is None:
            self._check_black_box()
        if self.data.packing:
            self._check_packing()
        self._check_placement()
        if self.generation.backend == "vllm":
            self._check_vllm()
        if self.train.eval_steps is not None and self.teacher.kind == "model" and self.teacher.model is None:
            raise ValueError(
                "train.eval_steps measures the student against the teacher model, and a black-box "
                "teacher has none; remove train.eval_steps (metrics.json still has perplexity)"
            )
        multi = [r.name for r in self.runs if r.multi_teacher is not None]
        if multi and not self.extra_teachers:
            raise ValueError(f"run(s) {multi} use multi_teacher but extra_teachers is empty; list the other teachers")
        for r in self.runs:
            mt = r.multi_teacher
            if mt is not None and mt.weights is not None and len(mt.weights) != 1 + len(self.extra_teachers):
                raise ValueError(
                    f"run {r.name}: multi_teacher.weights has {len(mt.weights)} entries for "
                    f"{1 + len(self.extra_teachers)} teachers (teacher first)"
                )
        cross = [r.name for r in self.runs if r.cross_tokenizer is not None]
        if cross and self.student.kind != "pretrained":
            raise ValueError(
                f"run(s) {cross} use cross_tokenizer, which needs a student with its own tokenizer; "
                "use student.kind pretrained (with layers to cut it)"
            )
        if any(t.model is None for t in self.extra_teachers):
            raise ValueError("extra_teachers need weights (model: null is only for the main black-box teacher)")
        self._check_bayesian()
        base = self.compare.baseline
        if base is not None and base not in names:
            raise ValueError(f"compare.baseline {base!r} is not a run; name one of {names}")
        return self

    def _check_bayesian(self) -> None:
        bayes = [r.name for r in self.runs if r.bayesian is not None]
        if not bayes:
            return
        if self.train.lora is None:
            raise ValueError(
                f"run(s) {bayes}: method.bayesian samples LoRA parameters by SGLD; add train.lora (e.g. lora: {{r: 8}})"
            )
        live = not isinstance(self.teacher, SelfTeacher) and self.teacher.model is not None and self.cache is None
        if not live:
            raise ValueError(
                f"run(s) {bayes}: method.bayesian's prior is the live teacher's next-token distribution; name a "
                "teacher model and remove the cache section (a self or black-box teacher has none)"
            )
        if self.train.distributed != "none":
            raise ValueError(
                f"run(s) {bayes}: the SGLD chain of method.bayesian runs in one process; set train.distributed none"
            )

    def _check_placement(self) -> None:
        teachers = [("teacher", self.teacher)] + [
            (f"extra_teachers[{i}]", t) for i, t in enumerate(self.extra_teachers)
        ]
        placed = [who for who, t in teachers if t.placed]
        if not placed:
            return
        if self.train.distributed in ("fsdp2", "zero3"):
            raise ValueError(
                f"{placed[0]}.device / device_map: under train.distributed {self.train.distributed} the "
                "teacher is sharded over the processes instead; remove them"
            )
        feature = [r.name for r in self.runs if r.feature is not None or r.cross_tokenizer is not None]
        if feature:
            raise ValueError(
                f"run(s) {feature} (feature or cross-tokenizer KD) read the teacher's layers on the "
                f"student's device; remove {placed[0]}.device / device_map or those runs"
            )

    def _check_vllm(self) -> None:
        mixed = [r.name for r in self.runs if r.method.kind == "minillm"]
        if mixed:
            raise ValueError(
                f"generation.backend vllm: run(s) {mixed} (MiniLLM) mix the teacher into the student's "
                "sampling, which only the hf backend does; set generation.backend hf"
            )
        if any(r.on_policy is not None for r in self.runs) and self.train.distributed == "zero3":
            raise ValueError(
                "generation.backend vllm with train.distributed zero3: the student's partitioned weights "
                "are not synced into vLLM yet; use fsdp2 or ddp, or generation.backend hf"
            )

    def _check_packing(self) -> None:
        """What reads a batch row by row (not example by example) cannot take packed rows yet."""
        for r in self.runs:
            op = r.on_policy
            what = [
                k
                for k, on in (
                    ("method cross_tokenizer", r.cross_tokenizer is not None),
                    ("method distillm2", op is not None and op.contrastive is not None),
                    ("method minillm", op is not None and op.minillm is not None),
                    ("method.relations (feature)", r.feature is not None and r.feature.relations is not None),
                )
                if on
            ]
            if what:
                raise ValueError(
                    f"data.packing: run {r.name} uses {what[0]}, which reads each row of a batch as one "
                    "example; set data.packing false or remove it from the run"
                )

    def _check_black_box(self) -> None:
        if self.student.kind != "pretrained":
            raise ValueError(
                "a black-box teacher (teacher.model null) has no weights to build the student from; "
                "use student.kind pretrained"
            )
        white = [r.name for r in self.runs if r.uses_teacher]
        if white:
            raise ValueError(
                f"run(s) {white} need the teacher's logits (alpha < 1), which a black-box teacher "
                "(teacher.model null) does not have; set alpha 1 (sequence-level KD) or name a teacher"
            )
        if self.cache is not None:
            raise ValueError("a black-box teacher (teacher.model null) cannot be cached; remove the cache section")
        if self.data.source.kind == "demo":
            raise ValueError(
                "the demo data is answered by the teacher's weights; with teacher.model null give "
                "data.source kind file (prompts and the teacher's responses)"
            )

    def _check_cache(self, cache: CacheConfig) -> None:
        kd = [r for r in self.runs if r.alpha < 1.0]
        live = [r.name for r in kd if r.on_policy is not None]
        if live:
            raise ValueError(
                f"run(s) {live} train on the student's own samples, which needs the live teacher to score "
                "them; remove the cache section or use method kd"
            )
        live = [r.name for r in self.runs if r.feature is not None or r.multi_teacher is not None]
        if live:
            raise ValueError(
                f"run(s) {live} use feature or multi_teacher, which need live teachers "
                "(a cache holds one teacher's signal in its tokens); remove the cache section or them"
            )
        uld = [r.name for r in kd if r.cross_tokenizer is not None and r.cross_tokenizer.align == "uld"]
        if uld:
            raise ValueError(
                f"run(s) {uld} use align uld, which sorts the teacher's whole distribution (a cache holds part "
                "of it); use align vocab_map with a cache, or remove the cache section"
            )
        text = [
            r.name for r in kd if r.cross_tokenizer is not None and r.cross_tokenizer.teacher_view == "student_text"
        ]
        if text:
            raise ValueError(
                f"run(s) {text} set teacher_view student_text, but a cache holds the teacher's own view (its own "
                "encoding of each pair); remove teacher_view or the cache section"
            )
        cut = [r.name for r in kd if r.cross_tokenizer is not None and r.cross_tokenizer.max_teacher_length]
        if cut:
            raise ValueError(
                f"run(s) {cut} set max_teacher_length, which a cache (the teacher's signal on its own encoding, "
                "cut at data.max_length) does not follow; remove it"
            )
        sched = [r.name for r in self.runs if r.schedule is not None and r.schedule.temperature_end is not None]
        if sched and cache.signal.kind != "dense":
            raise ValueError(
                f"run(s) {sched} schedule the temperature, which a {cache.signal.kind} cache (one "
                "temperature) cannot follow; use cache.signal.kind dense or no temperature_end"
            )
        if cache.signal.kind == "sampled":
            bad = [r.name for r in kd if r.divergence.name == "adaptive_kl"]
            if bad:
                raise ValueError(
                    f"run(s) {bad} use adaptive_kl, which a sampled cache cannot estimate; "
                    "use cache.signal.kind topk or dense"
                )
        if cache.signal.kind == "dense":
            return
        temps = sorted({r.temperature for r in kd})
        if cache.temperature is None:
            if len(temps) > 1:
                raise ValueError(
                    f"the KD runs use temperatures {temps} but a {cache.signal.kind} cache holds one; "
                    "use one temperature or cache.signal.kind dense"
                )
            cache.temperature = temps[0] if temps else 1.0
        elif any(t != cache.temperature for t in temps):
            raise ValueError(
                f"cache.temperature={cache.temperature} but the KD runs use {temps}; "
                "make them equal (a sparse cache holds one temperature)"
            )

    @property
    def cache_dir(self) -> Path | None:
        if self.cache is None:
            return None
        return Path(self.cache.dir) if self.cache.dir else Path(self.output_dir) / "teacher_cache"


"""A data path starting with this names a file in the shared data directory (``$POTSTILL_DATA``)."""


def resolve_data_source(src: Any, base_dir: Path | None) -> None:
    """A data section's ``$POTSTILL_DATA/...`` paths, and a file source's recipe-relative ``path``, made absolute."""
    for key in ("path", "eval_path"):
        value = getattr(src, key, None)
        if isinstance(value, str):
            local = base_dir if isinstance(src, FileData) and key == "path" else None
            setattr(src, key, resolve_data_path(value, local))


def resolve_as_distill(recipe: Any, base_dir: Path | None, verb: str) -> None:
    """For a recipe that trains through distill (``recipe.distill_recipe()``): distill's own checks of its
    sections, in one line naming the key, then its data paths resolved as distill resolves them."""
    try:
        recipe.distill_recipe()
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, recipe.model_dump(mode="json"), verb)) from None
    resolve_data_source(recipe.data.source, base_dir)


def recipe_from_dict(data: dict, overrides: Sequence[str] | None = None, base_dir: Path | None = None) -> Recipe:
    data = apply_overrides(dict(data or {}), overrides or [], defaults=Recipe().model_dump(mode="json"))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data)) from None
    recipe.resolve_paths(base_dir)
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``None``: the embedded default) and apply ``key=value`` overrides."""
    if path is None:
        return recipe_from_dict({}, overrides)
    return recipe_from_dict(read_recipe_file(path), overrides, base_dir=Path(path).parent)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


RECIPE = Recipe
