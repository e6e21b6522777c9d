"""How a student is trained: the divergences, each method's options, LoRA, the training loop and one run."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from potstill.recipes.base import Seed, Strict
from potstill.recipes.models import check_temperature

RESERVED_RUN_NAMES = ("teacher", "student_init")


RUN_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


def _check_divergence(d: BaseModel) -> BaseModel:
    """Degenerate or undefined parameter end points are refused in one line (e.g. GKD's JSD at beta 0 is 0)."""
    from potstill.divergences.params import check_divergence_params

    check_divergence_params(d.name, d.model_dump(exclude={"name"}))
    return d


class _Div(Strict):
    @model_validator(mode="after")
    def _end_points(self) -> _Div:
        return _check_divergence(self)


class ForwardKL(_Div):
    name: Literal["forward_kl"] = "forward_kl"


class ReverseKL(_Div):
    name: Literal["reverse_kl"] = "reverse_kl"


class TotalVariation(_Div):
    name: Literal["total_variation"] = "total_variation"


class GeneralizedJSD(_Div):
    name: Literal["generalized_jsd"] = "generalized_jsd"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="GKD's beta: mixture weight of the teacher in m.")


class SkewForwardKL(_Div):
    name: Literal["skew_forward_kl"] = "skew_forward_kl"
    alpha: float = Field(0.1, ge=0.0, lt=1.0, description="DistiLLM's skew: KL(p || alpha p + (1-alpha) q).")


class SkewReverseKL(_Div):
    name: Literal["skew_reverse_kl"] = "skew_reverse_kl"
    alpha: float = Field(0.1, ge=0.0, lt=1.0, description="DistiLLM's skew: KL(q || alpha q + (1-alpha) p).")


class AlphaBeta(_Div):
    name: Literal["alpha_beta_divergence"] = "alpha_beta_divergence"
    alpha: float = Field(0.5, description="ABKD's alpha (weight on the teacher's probabilities).")
    beta: float = Field(0.5, description="ABKD's beta (weight on the student's probabilities).")


class AdaptiveKL(_Div):
    name: Literal["adaptive_kl"] = "adaptive_kl"
    mu: float = Field(0.5, gt=0.0, le=1.0, description="AKL's head/tail split on the teacher's cumulative mass.")


DivergenceConfig = Annotated[
    ForwardKL | ReverseKL | TotalVariation | GeneralizedJSD | SkewForwardKL | SkewReverseKL | AlphaBeta | AdaptiveKL,
    Field(discriminator="name"),
]


class ContrastiveOptions(Strict):
    """DistiLLM-2 (Ko et al. 2025): every step pairs the data's (teacher) responses with the student's own
    samples for the same prompts; the run's divergence scores the first, `student_divergence` the second."""

    student_divergence: DivergenceConfig = Field(
        default_factory=lambda: SkewReverseKL(alpha=0.1),
        description="Divergence on the student's samples (DistiLLM-2: skew reverse KL, alpha 0.1).",
    )
    beta: float = Field(1.0, ge=0.0, le=2.0, description="Loss = (2 - beta) * data term + beta * student term.")
    beta_end: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="Ramp beta linearly to this over the first half of training "
        "(DistiLLM-2 uses 1 -> 1.5); null: fixed.",
    )
    adaptive_skew: bool = Field(
        False,
        description="Per-sequence skew alpha from the teacher-student probability gap (DistiLLM-2's "
        "curriculum); both divergences must then be skew ones, their alpha the cap.",
    )


class MiniLLMOptions(Strict):
    """MiniLLM (Gu et al. 2024): sequence-level reverse KL by policy gradient on teacher-mixed samples."""

    mix: float = Field(0.2, ge=0.0, lt=1.0, description="Teacher share of the sampling distribution (paper: 0.2).")
    length_norm: bool = Field(True, description="Later-token return as a mean (length normalization), not a sum.")
    long_term: bool = Field(
        True,
        description="Keep the policy-gradient term of later tokens (false: single-step "
        "reverse KL on the samples only).",
    )


class OnPolicyOptions(Strict):
    """Student-generated data: GKD (Agarwal et al. 2024), DistiLLM (Ko et al. 2024), DistiLLM-2 (Ko et al. 2025)."""

    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="GKD's lambda: share of steps on the student's own samples.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the student (not the KD one).")

    @field_validator("temperature")
    @classmethod
    def _sampling_temperature(cls, v: float) -> float:
        return check_temperature(v, "on_policy.temperature")

    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the student.")
    max_new_tokens: int = Field(32, ge=1, description="Length cap of the student's samples.")
    replay_size: int = Field(0, ge=0, description="DistiLLM replay buffer capacity in examples (0: none).")
    replay_reuse: float = Field(0.0, ge=0.0, le=1.0, description="On a student step, chance to reuse the buffer.")
    adaptive: bool = Field(False, description="DistiLLM: raise lmbda whenever the validation loss rises.")
    adaptive_step: float = Field(0.1, gt=0.0, le=1.0, description="Rise of lmbda per validation-loss increase.")
    adaptive_max: float = Field(1.0, ge=0.0, le=1.0, description="Cap of the adaptive lmbda.")
    adaptive_every: int = Field(10, ge=1, description="Steps between validation-loss measurements.")
    validation_size: int = Field(
        16, ge=1, description="Training examples (seeded pick) the validation loss is taken on."
    )
    contrastive: ContrastiveOptions | None = Field(
        None, description="DistiLLM-2: every step trains on both the data and the student's samples (lmbda unused)."
    )
    minillm: MiniLLMOptions | None = Field(
        None, description="MiniLLM: every step on teacher-mixed samples, reverse KL by policy gradient (lmbda unused)."
    )

    @model_validator(mode="after")
    def _replay(self) -> OnPolicyOptions:
        if self.replay_reuse > 0 and self.replay_size == 0:
            raise ValueError("replay_reuse > 0 needs a replay buffer; set replay_size >= 1")
        if self.minillm is not None and (self.contrastive is not None or self.adaptive or self.replay_size):
            raise ValueError(
                "on_policy.minillm samples on-policy and updates once per sample; remove contrastive, "
                "adaptive and replay_size from this run"
            )
        if self.contrastive is not None and self.adaptive:
            raise ValueError(
                "on_policy.contrastive trains every step on both the data and student samples, so "
                "DistiLLM's adaptive lmbda has nothing to move; set adaptive false"
            )
        return self


class ScheduleOptions(Strict):
    """Dynamic KD: alpha and temperature move from the run's values to these over training."""

    kind: Literal["linear", "cosine"] = Field("linear", description="Shape of the schedule over optimizer steps.")
    alpha_end: float | None = Field(None, ge=0.0, le=1.0, description="CE weight at the last step (null: fixed).")
    temperature_end: float | None = Field(None, gt=0.0, description="Distillation temperature at the last step.")

    @field_validator("temperature_end")
    @classmethod
    def _temperature_end(cls, v: float | None) -> float | None:
        return check_temperature(v, "schedule.temperature_end")


class RelationOptions(Strict):
    """Attention-relation distillation (MiniLMv2, Wang et al. 2021), causal: q-q/k-k/v-v relations over past keys."""

    layers: list[tuple[int, int]] = Field(
        ..., min_length=1, description="Pairs [student_layer, teacher_layer] of decoder layers, 1-based; -1 the last."
    )
    kinds: list[Literal["q", "k", "v"]] = Field(
        ["q", "k", "v"], min_length=1, description="Relations to distill: q-q, k-k and/or v-v (averaged)."
    )
    heads: int = Field(
        ...,
        ge=1,
        description="Relation heads R; must divide the q/k/v projection widths of both "
        "models (k/v: num_key_value_heads * head_dim).",
    )
    weight: float = Field(1.0, ge=0.0, description="Weight of the relation term next to the logit loss.")

    @model_validator(mode="after")
    def _decoder_layers(self) -> RelationOptions:
        if any(0 in p for p in self.layers):
            raise ValueError("layer 0 is the embeddings (no attention); decoder layers are 1-based, -1 the last")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds {self.kinds} repeat an entry")
        return self


class FeatureOptions(Strict):
    """Hidden-state distillation (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020) and/or attention
    relations (MiniLMv2)."""

    layers: list[tuple[int, int]] | None = Field(
        None,
        min_length=1,
        description="Pairs [student_layer, teacher_layer] of hidden states; 0 is the embeddings, "
        "-1 the last layer. Optional when `relations` is set.",
    )
    loss: Literal["mse", "cosine"] = Field("mse", description="Distance between (projected) hidden states.")
    weight: float = Field(1.0, ge=0.0, description="Weight of the hidden-state term next to the logit loss.")
    relations: RelationOptions | None = Field(None, description="Add MiniLMv2 attention-relation distillation.")

    @model_validator(mode="after")
    def _some_term(self) -> FeatureOptions:
        if self.layers is None and self.relations is None:
            raise ValueError("feature needs layers (hidden-state pairs) or relations (attention-relation pairs)")
        return self


class CrossTokenizerOptions(Strict):
    """Distill across tokenizers: the teacher reads the same text in its own tokens."""

    method: Literal["uld", "vocab_map"] = Field(
        "vocab_map",
        description="uld: sorted-probability Wasserstein loss (Boizard et al. 2024); vocab_map: the "
        "teacher's distribution projected onto the student's vocabulary by token-string matches.",
    )
    kinds: list[Literal["exact", "normalized", "mined"]] = Field(
        ["exact", "normalized", "mined"],
        min_length=1,
        description="vocab_map: which matches carry teacher mass (exact bytes, NFKC/case, longest student prefix).",
    )
    max_teacher_length: int | None = Field(None, ge=8, description="Truncate the teacher's tokens to this many.")


class MultiTeacherOptions(Strict):
    """Combine the teacher with `extra_teachers` per token (one with another tokenizer joins on aligned rows)."""

    mode: Literal["mean", "confidence", "select"] = Field(
        "mean", description="mean: fixed weights; confidence: per-token teacher confidence; select: per example."
    )
    confidence: Literal["entropy", "maxprob"] = Field("entropy", description="Confidence measure of mode confidence.")
    weights: list[float] | None = Field(None, description="Weights of mode mean, teacher first (default: equal).")
    cross_kinds: list[Literal["exact", "normalized", "mined"]] = Field(
        ["exact", "normalized", "mined"],
        min_length=1,
        description="Vocab-map matches that carry the mass of an extra teacher with another tokenizer.",
    )


def divergence_params(d: _Div) -> dict[str, Any]:
    return d.model_dump(exclude={"name"})


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
    on_policy: OnPolicyOptions | None = Field(
        None, description="Train a share of the steps on the student's own samples (GKD / DistiLLM)."
    )
    token_weighting: Literal["none", "teacher_confidence", "teacher_maxprob", "student_entropy"] = Field(
        "none",
        description="Per-token KD weights: teacher certainty, or selective KD on the student's most "
        "uncertain positions (student_entropy).",
    )
    token_weighting_ratio: float = Field(
        0.5, gt=0.0, le=1.0, description="student_entropy: share of response positions that get the divergence."
    )
    schedule: ScheduleOptions | None = Field(None, description="Schedules of alpha and temperature.")
    feature: FeatureOptions | None = Field(
        None, description="Add hidden-state and/or attention-relation distillation between layer pairs."
    )
    multi_teacher: MultiTeacherOptions | None = Field(
        None, description="Distill from the teacher and `extra_teachers` combined."
    )
    curriculum: Literal["none", "easy_to_hard", "hard_to_easy"] = Field(
        "none", description="Order training examples by the initial teacher-student divergence."
    )
    cross_tokenizer: CrossTokenizerOptions | None = Field(
        None, description="The teacher has another tokenizer than the student: align and map (ULD or vocab_map)."
    )

    @model_validator(mode="after")
    def _on_policy_needs_teacher(self) -> RunConfig:
        if self.on_policy is not None and self.alpha >= 1.0:
            raise ValueError("on_policy steps are scored by the teacher; set alpha < 1 or remove on_policy")
        if self.on_policy is not None and self.feature is not None:
            raise ValueError("on_policy and feature cannot be combined in one run; split them into two runs")
        m = None if self.on_policy is None else self.on_policy.minillm
        if m is not None and (self.divergence.name != "reverse_kl" or self.alpha != 0.0):
            raise ValueError(
                "on_policy.minillm minimizes the reverse KL on samples (no CE target there); set "
                "divergence {name: reverse_kl} and alpha 0"
            )
        if m is not None and (
            self.temperature != 1.0
            or self.on_policy.temperature != 1.0
            or self.on_policy.top_p != 1.0
            or (self.schedule is not None and self.schedule.temperature_end is not None)
        ):
            raise ValueError(
                "on_policy.minillm samples from the plain teacher-student mixture and scores at "
                "temperature 1; set temperature 1, on_policy.temperature 1, on_policy.top_p 1 and no "
                "temperature schedule"
            )
        if m is not None and (self.token_weighting != "none" or self.multi_teacher is not None):
            raise ValueError(
                "on_policy.minillm cannot be combined with token_weighting or multi_teacher in one "
                "run; split them into separate runs"
            )
        c = None if self.on_policy is None else self.on_policy.contrastive
        if c is not None and c.adaptive_skew:
            skews = ("skew_forward_kl", "skew_reverse_kl")
            bad = [d.name for d in (self.divergence, c.student_divergence) if d.name not in skews]
            if bad:
                raise ValueError(
                    f"contrastive.adaptive_skew adapts the alpha of skew divergences, but {bad} is not "
                    "one; use skew_forward_kl / skew_reverse_kl or set adaptive_skew false"
                )
        if c is not None and (self.token_weighting != "none" or self.multi_teacher is not None):
            raise ValueError(
                "on_policy.contrastive cannot be combined with token_weighting or multi_teacher in one "
                "run yet; split them into separate runs"
            )
        sft = self.alpha >= 1.0 and (self.schedule is None or self.schedule.alpha_end in (None, 1.0))
        if sft and (self.token_weighting != "none" or self.multi_teacher is not None or self.curriculum != "none"):
            raise ValueError(
                "token_weighting, multi_teacher and curriculum act on the KD term; set alpha < 1 "
                "(or a schedule.alpha_end < 1)"
            )
        if self.cross_tokenizer is not None:
            other = [
                k
                for k, on in (
                    ("on_policy", self.on_policy is not None),
                    ("feature", self.feature is not None),
                    ("multi_teacher", self.multi_teacher is not None),
                    ("token_weighting", self.token_weighting != "none"),
                    ("curriculum", self.curriculum != "none"),
                )
                if on
            ]
            if other:
                raise ValueError(
                    f"cross_tokenizer cannot be combined with {', '.join(other)} in one run yet; "
                    "split them into separate runs"
                )
        return self

    @property
    def uses_teacher(self) -> bool:
        """Whether the run reads the teacher at all (KD term at some step, or hidden states)."""
        end = None if self.schedule is None else self.schedule.alpha_end
        return self.alpha < 1.0 or (end is not None and end < 1.0) or self.feature is not None

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
