"""One run of a distill recipe and its method: a tagged choice on ``method.kind``, each kind with only its own
fields.

=================  ===========================================================================================
``kd``             (default) token-level KD on the data's responses; token weights, several teachers, curricula
``on_policy``      GKD (Agarwal et al. 2024) / DistiLLM (Ko et al. 2024): a share ``lmbda`` of the steps on the
                   student's own samples, with DistiLLM's replay buffer and adaptive ``lmbda``
``distillm2``      DistiLLM-2 (Ko et al. 2025): every step on the data and on the student's samples
``minillm``        MiniLLM (Gu et al. 2024): sequence-level reverse KL by policy gradient on teacher-mixed samples
``feature``        hidden states (FitNets, TinyBERT) and/or attention relations (MiniLMv2) next to the logits
``cross_tokenizer``  a teacher with another tokenizer: ULD, or its distribution mapped onto the student's vocabulary
=================  ===========================================================================================

Recipes written before ``method:`` (flat ``on_policy:``, ``feature:``, ``cross_tokenizer:``, ``multi_teacher:``,
``token_weighting:``, ``curriculum:`` keys in a run) still load: they are translated, with a ``FutureWarning``,
until the next minor version. The trainers read the method through the views ``run.on_policy``,
``run.feature``, ... (:mod:`potstill.recipes.options`).
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from potstill.recipes.base import Strict
from potstill.recipes.divergences import AlphaBeta, DivergenceConfig, ForwardKL
from potstill.recipes.models import check_temperature
from potstill.recipes.options import (
    ContrastiveOptions,
    CrossTokenizerOptions,
    FeatureOptions,
    MiniLLMOptions,
    MultiTeacherOptions,
    OnPolicyOptions,
    Replay,
    Sampling,
    ScheduleOptions,
    SGLDSettings,
    StudentSteps,
)

RESERVED_RUN_NAMES = ("teacher", "student_init")


RUN_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


TokenWeighting = Literal["none", "teacher_confidence", "teacher_maxprob", "student_entropy", "keypoint"]
Curriculum = Literal["none", "easy_to_hard", "hard_to_easy", "progressive_rationale"]
RATIONALE_KD = ("keypoint", "progressive_rationale")  # method kd only: they read the cot targets' columns


class KeypointOptions(Strict):
    """KPOD (Feng et al. 2024): keypoint weights on rationale tokens and the in-rationale progressive curriculum
    (:mod:`potstill.kd.keypoint`; cot targets ``"<rationale> The answer is X."``)."""

    scale: float = Field(
        1.0,
        ge=0.0,
        description="token_weighting keypoint: lambda of w_t = (1 + lambda * s_t / mean(s)) / (1 + lambda), s_t "
        "the teacher's answer log-likelihood drop when rationale token t is masked (clipped at 0); mean weight 1, "
        "0 is plain KD.",
    )
    start_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="curriculum progressive_rationale: share of each rationale's steps (lines or sentences), "
        "counted from the end, whose tokens get the divergence at the start of training.",
    )
    ramp: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="curriculum progressive_rationale: share of training over which that share rises linearly "
        "to all steps (0: all steps from the start).",
    )
    mask_token: str | None = Field(
        None,
        description="token that replaces a rationale token when its significance is measured; default the "
        "tokenizer's unk, else pad, else eos token.",
    )
    batch_size: int = Field(32, ge=1, description="masked copies of an example per teacher forward.")


class BayesianLMOptions(Strict):
    """Bayesian KD (Fang, Chen, Zhong & Ma, ICML 2024) for an LLM student, once the run has trained: each response
    token is a categorical example with the teacher's next-token distribution as its Dirichlet prior, and the
    posterior over a fresh LoRA adapter on the trained student is sampled by SGLD (:mod:`potstill.kd.bayesian_lm`).
    The report gains the posterior predictive's token calibration (ECE, Brier, interval coverage) beside the
    trained student's own (its point estimate)."""

    prior_strength: float = Field(
        4.0, gt=0.0, description="lambda: Dirichlet concentration 1 + lambda * teacher next-token probabilities."
    )
    temperature: float = Field(1.0, gt=0.0, description="tau of the teacher soft labels and the prior's student side.")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        check_temperature(v, "method.bayesian.temperature")
        return v

    level: float = Field(0.95, gt=0.0, lt=1.0, description="Credible level of the per-token intervals.")
    eval_batch_size: int = Field(
        4,
        ge=1,
        description="Held-out examples per predictive batch (samples x response tokens x vocabulary probabilities "
        "are held at once).",
    )
    sgld: SGLDSettings = Field(
        default_factory=SGLDSettings,
        description="The SGLD sampler over the LoRA parameters (its potential sums over every training response "
        "token, so lr scales like 1 / tokens).",
    )


class _Curriculum(Strict):
    curriculum: Curriculum = Field(
        "none", description="Order training examples by the initial teacher-student divergence."
    )


class _TokenTerms(_Curriculum):
    """What acts on the token-level KD term: per-token weights and several teachers."""

    token_weighting: TokenWeighting = Field(
        "none",
        description="Per-token KD weights: teacher certainty, or selective KD on the student's most "
        "uncertain positions (student_entropy).",
    )
    token_weighting_ratio: float = Field(
        0.5, gt=0.0, le=1.0, description="student_entropy: share of response positions that get the divergence."
    )
    multi_teacher: MultiTeacherOptions | None = Field(
        None, description="Distill from the teacher and `extra_teachers` combined."
    )


class PlainKD(_TokenTerms):
    """Token-level KD on the data's responses."""

    kind: Literal["kd"] = "kd"
    keypoint: KeypointOptions | None = Field(
        None,
        description="Options of token_weighting keypoint / curriculum progressive_rationale (KPOD); "
        "defaults when either is chosen.",
    )
    bayesian: BayesianLMOptions | None = Field(
        None,
        description="After training, sample the Bayesian-KD posterior over a LoRA adapter by SGLD and report the "
        "posterior predictive's token calibration (needs train.lora and a live teacher).",
    )

    @model_validator(mode="after")
    def _keypoint_used(self) -> PlainKD:
        used = self.token_weighting == "keypoint" or self.curriculum == "progressive_rationale"
        if self.keypoint is not None and not used:
            raise ValueError(
                "method.keypoint is set but neither token_weighting keypoint nor curriculum progressive_rationale "
                "is chosen; choose one or remove keypoint"
            )
        if used and self.keypoint is None:
            self.keypoint = KeypointOptions()
        return self


class OnPolicyKD(StudentSteps, Sampling, Replay, _TokenTerms):
    """GKD / DistiLLM: a share of the steps on the student's own samples, scored by the teacher."""

    kind: Literal["on_policy"] = "on_policy"


class DistiLLM2KD(Sampling, Replay, _Curriculum, ContrastiveOptions):
    """DistiLLM-2: every step pairs the data's (teacher) responses with the student's own samples for the same
    prompts; the run's divergence scores the first, ``student_divergence`` the second."""

    kind: Literal["distillm2"] = "distillm2"


class MiniLLMKD(Sampling, _Curriculum, MiniLLMOptions):
    """MiniLLM: sequence-level reverse KL by policy gradient on teacher-mixed samples, one update per sample."""

    kind: Literal["minillm"] = "minillm"


class FeatureKD(FeatureOptions, _TokenTerms):
    """Hidden-state distillation (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020) and/or attention
    relations (MiniLMv2, Wang et al. 2021), next to the logit loss."""

    kind: Literal["feature"] = "feature"


class CrossTokenizerKD(CrossTokenizerOptions):
    """Distill across tokenizers: the teacher reads the same text in its own tokens."""

    kind: Literal["cross_tokenizer"] = "cross_tokenizer"


MethodConfig = Annotated[
    PlainKD | OnPolicyKD | DistiLLM2KD | MiniLLMKD | FeatureKD | CrossTokenizerKD, Field(discriminator="kind")
]
ON_POLICY_KINDS = ("on_policy", "distillm2", "minillm")
_FLAT_KEYS = (
    "on_policy",
    "feature",
    "cross_tokenizer",
    "multi_teacher",
    "token_weighting",
    "token_weighting_ratio",
    "curriculum",
)


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _set(options: dict | None, model: type[Strict]) -> dict:
    """The keys of an old-style option section that differ from their defaults (a model instance dumps all)."""
    if not options:
        return {}
    defaults = model.model_construct().model_dump()
    return {k: v for k, v in options.items() if k not in defaults or _plain(defaults[k]) != _plain(v)}


def _flat_to_method(old: dict) -> dict:
    """A run's flat method keys (before ``method:``) as the ``method`` section; the old combination errors kept."""
    op, feat, cross = (_plain(old.pop(k, None)) for k in ("on_policy", "feature", "cross_tokenizer"))
    terms = {k: _plain(v) for k, v in old.items() if v is not None}
    weighted = terms.get("token_weighting", "none") != "none" or terms.get("multi_teacher") is not None
    if cross is not None:
        used = [k for k, on in (("on_policy", op), ("feature", feat)) if on is not None]
        used += [k for k in ("multi_teacher", "token_weighting", "curriculum") if terms.get(k) not in (None, "none")]
        if used:
            raise ValueError(
                f"cross_tokenizer cannot be combined with {', '.join(used)} in one run yet; split them into separate runs"
            )
        cross = dict(cross)
        return {"kind": "cross_tokenizer", **({"align": cross.pop("method")} if "method" in cross else {}), **cross}
    if op is not None and feat is not None:
        raise ValueError("on_policy and feature cannot be combined in one run; split them into two runs")
    if feat is not None:
        return {"kind": "feature", **feat, **terms}
    if op is None:
        return {"kind": "kd", **terms}
    op = dict(op)
    contrastive, minillm = _plain(op.pop("contrastive", None)), _plain(op.pop("minillm", None))
    for name, extra in (("minillm", minillm), ("contrastive", contrastive)):
        if extra is not None and weighted:
            raise ValueError(
                f"on_policy.{name} cannot be combined with token_weighting or multi_teacher in one run; "
                "split them into separate runs"
            )
    sampling = _set(op, OnPolicyOptions)
    if minillm is not None or contrastive is not None:
        sampling.pop("lmbda", None)  # unused by MiniLLM and DistiLLM-2: every step samples
    if minillm is not None:
        if contrastive is not None or sampling.get("adaptive") or sampling.get("replay_size"):
            raise ValueError(
                "on_policy.minillm samples on-policy and updates once per sample; remove contrastive, "
                "adaptive and replay_size from this run"
            )
        return {"kind": "minillm", **sampling, **_set(minillm, MiniLLMOptions), **terms}
    if contrastive is not None:
        if sampling.get("adaptive"):
            raise ValueError(
                "on_policy.contrastive trains every step on both the data and student samples, so "
                "DistiLLM's adaptive lmbda has nothing to move; set adaptive false"
            )
        return {"kind": "distillm2", **sampling, **_set(contrastive, ContrastiveOptions), **terms}
    return {"kind": "on_policy", **sampling, **terms}


class RunConfig(Strict):
    name: str = Field(
        ...,
        pattern=RUN_NAME_PATTERN,
        max_length=128,
        description="Run name: a plain directory name (letters, digits, _ . -; not starting with '.'); "
        "not 'teacher' or 'student_init', which are rows of the report.",
    )
    alpha: float = Field(
        0.0, ge=0.0, le=1.0, description="Weight of cross-entropy on labels; (1 - alpha) weights the divergence."
    )
    divergence: DivergenceConfig = Field(default_factory=ForwardKL, description="Divergence to the teacher.")
    temperature: float = Field(1.0, gt=0.0, description="Distillation temperature (not the generation one).")
    scale_t2: bool = Field(False, description="Multiply the divergence by T^2 (Hinton et al. 2015).")
    schedule: ScheduleOptions | None = Field(None, description="Schedules of alpha and temperature.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="This run's optimizer steps in place of train.max_steps (compare's `match: flops` sets it so "
        "that a cheaper run gets the costliest run's compute).",
    )
    method: MethodConfig = Field(
        default_factory=PlainKD,
        description="The training method, by `kind`: kd (default), on_policy, distillm2, minillm, feature, "
        "cross_tokenizer; each takes only its own options.",
    )

    @model_validator(mode="before")
    @classmethod
    def _translate_flat_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in _FLAT_KEYS):
            return data
        data = dict(data)
        old = {k: data.pop(k) for k in _FLAT_KEYS if k in data}
        if "method" in data:
            raise ValueError(f"a run states its method once; move {sorted(old)} into `method`")
        keys = sorted(old)
        data["method"] = _flat_to_method(old)
        warnings.warn(
            f"run keys {keys} are deprecated and will be refused from potstill 0.2; write the run's "
            f"method as `method: {{kind: {data['method']['kind']}, ...}}` (see `potstill schema distill`)",
            FutureWarning,
            stacklevel=2,
        )
        return data

    @model_validator(mode="after")
    def _method_fits_run(self) -> RunConfig:
        m = self.method
        if m.kind in ON_POLICY_KINDS and self.alpha >= 1.0:
            raise ValueError("on_policy steps are scored by the teacher; set alpha < 1 or use method kd")
        if isinstance(m, MiniLLMKD) and (self.divergence.name != "reverse_kl" or self.alpha != 0.0):
            raise ValueError(
                "method minillm minimizes the reverse KL on samples (no CE target there); set "
                "divergence {name: reverse_kl} and alpha 0"
            )
        if isinstance(m, MiniLLMKD) and (
            self.temperature != 1.0
            or m.temperature != 1.0
            or m.top_p != 1.0
            or (self.schedule is not None and self.schedule.temperature_end is not None)
        ):
            raise ValueError(
                "method minillm samples from the plain teacher-student mixture and scores at temperature 1; set "
                "temperature 1, method.temperature 1, method.top_p 1 and no temperature schedule"
            )
        if isinstance(m, DistiLLM2KD) and m.adaptive_skew:
            skews = ("skew_forward_kl", "skew_reverse_kl")
            bad = [d.name for d in (self.divergence, m.student_divergence) if d.name not in skews]
            if bad:
                raise ValueError(
                    f"adaptive_skew adapts the alpha of skew divergences, but {bad} is not "
                    "one; use skew_forward_kl / skew_reverse_kl or set adaptive_skew false"
                )
        chosen = [v for v in (self.token_weighting, self.curriculum) if v in RATIONALE_KD]
        if chosen and m.kind != "kd":
            raise ValueError(
                f"rationale KD ({', '.join(chosen)}) reads the data's cot targets and needs method kind kd, not {m.kind}; "
                "use method {kind: kd, ...}"
            )
        sft = self.alpha >= 1.0 and (self.schedule is None or self.schedule.alpha_end in (None, 1.0))
        if sft and (self.token_weighting != "none" or self.multi_teacher is not None or self.curriculum != "none"):
            raise ValueError(
                "token_weighting, multi_teacher and curriculum act on the KD term; set alpha < 1 "
                "(or a schedule.alpha_end < 1)"
            )
        return self

    # The views the runner and the trainers read (None where the method has no such part).
    @property
    def on_policy(self) -> OnPolicyOptions | None:
        m = self.method
        if m.kind not in ON_POLICY_KINDS:
            return None
        own = m.model_dump(exclude={"kind", "curriculum", "token_weighting", "token_weighting_ratio", "multi_teacher"})
        sampling = {k: own.pop(k) for k in list(own) if k in OnPolicyOptions.model_fields}
        if isinstance(m, DistiLLM2KD):
            return OnPolicyOptions(**sampling, contrastive=ContrastiveOptions(**own))
        if isinstance(m, MiniLLMKD):
            return OnPolicyOptions(**sampling, minillm=MiniLLMOptions(**own))
        return OnPolicyOptions(**sampling)

    @property
    def feature(self) -> FeatureOptions | None:
        m = self.method
        if not isinstance(m, FeatureKD):
            return None
        return FeatureOptions(**m.model_dump(include=set(FeatureOptions.model_fields)))

    @property
    def cross_tokenizer(self) -> CrossTokenizerOptions | None:
        m = self.method
        if not isinstance(m, CrossTokenizerKD):
            return None
        return CrossTokenizerOptions(**m.model_dump(exclude={"kind"}))

    @property
    def multi_teacher(self) -> MultiTeacherOptions | None:
        return getattr(self.method, "multi_teacher", None)

    @property
    def token_weighting(self) -> TokenWeighting:
        return getattr(self.method, "token_weighting", "none")

    @property
    def token_weighting_ratio(self) -> float:
        return getattr(self.method, "token_weighting_ratio", 0.5)

    @property
    def keypoint(self) -> KeypointOptions | None:
        return getattr(self.method, "keypoint", None)

    @property
    def curriculum(self) -> Curriculum:
        return getattr(self.method, "curriculum", "none")

    @property
    def bayesian(self) -> BayesianLMOptions | None:
        return getattr(self.method, "bayesian", None)

    @property
    def uses_teacher(self) -> bool:
        """Whether the run reads the teacher at all (KD term at some step, or hidden states)."""
        end = None if self.schedule is None else self.schedule.alpha_end
        return self.alpha < 1.0 or (end is not None and end < 1.0) or self.feature is not None

    def flat_dump(self) -> dict[str, Any]:
        """The run in the shape of recipes before ``method:`` (JSON-ready): what fingerprints of finished runs
        were taken over, so runs finished before the change still verify."""
        dump = lambda m: None if m is None else m.model_dump(mode="json")  # noqa: E731
        cross = dump(self.cross_tokenizer)  # its `align` was called `method` then
        # KPOD's options only when set: fingerprints of runs without them stay as they were
        keypoint = {} if self.keypoint is None else {"keypoint": dump(self.keypoint)}
        # a run's own step count likewise (compare's match: flops): unset, the fingerprint is what it was
        keypoint |= {} if self.max_steps is None else {"max_steps": self.max_steps}
        return keypoint | {
            "name": self.name,
            "alpha": self.alpha,
            "divergence": self.divergence.model_dump(mode="json"),
            "temperature": self.temperature,
            "scale_t2": self.scale_t2,
            "on_policy": dump(self.on_policy),
            "token_weighting": self.token_weighting,
            "token_weighting_ratio": self.token_weighting_ratio,
            "schedule": dump(self.schedule),
            "feature": dump(self.feature),
            "multi_teacher": dump(self.multi_teacher),
            "curriculum": self.curriculum,
            # teacher_view only when set: fingerprints of runs without it stay as they were
            "cross_tokenizer": None
            if cross is None
            else {"method": cross.pop("align"), **{k: v for k, v in cross.items() if k != "teacher_view" or v}},
        }

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        return check_temperature(v, "temperature")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_RUN_NAMES:
            raise ValueError(
                f"run name '{v}' is a row of the report already ({' and '.join(RESERVED_RUN_NAMES)}); rename the run"
            )
        return v


def default_runs() -> list[RunConfig]:
    return [
        RunConfig(name="sft", alpha=1.0),
        RunConfig(name="kd_forward_kl", alpha=0.0, divergence=ForwardKL()),
        RunConfig(name="kd_alpha_beta", alpha=0.0, divergence=AlphaBeta(alpha=0.9, beta=0.1)),
    ]
