"""Each training method's options, as the trainers read them (``run.on_policy``, ``run.feature``, ...).

A recipe states a method as one tagged choice (:mod:`potstill.recipes.methods`); these are the views the
runner and the trainers read, and the shape of recipes written before the ``method:`` key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from potstill.recipes.base import Strict
from potstill.recipes.divergences import DivergenceConfig, SkewReverseKL
from potstill.recipes.models import check_temperature


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


class Sampling(Strict):
    """How the student samples its own responses."""

    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the student (not the KD one).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the student.")
    max_new_tokens: int = Field(32, ge=1, description="Length cap of the student's samples.")
    validation_size: int = Field(
        16, ge=1, description="Training examples (seeded pick) the validation loss is taken on."
    )

    @field_validator("temperature")
    @classmethod
    def _sampling_temperature(cls, v: float) -> float:
        return check_temperature(v, "method.temperature")


class Replay(Strict):
    """DistiLLM's replay buffer of the student's samples."""

    replay_size: int = Field(0, ge=0, description="DistiLLM replay buffer capacity in examples (0: none).")
    replay_reuse: float = Field(0.0, ge=0.0, le=1.0, description="On a student step, chance to reuse the buffer.")

    @model_validator(mode="after")
    def _replay(self) -> Replay:
        if self.replay_reuse > 0 and self.replay_size == 0:
            raise ValueError("replay_reuse > 0 needs a replay buffer; set replay_size >= 1")
        return self


class StudentSteps(Strict):
    """GKD's share of steps on the student's samples, and DistiLLM's adaptive rise of it."""

    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="GKD's lambda: share of steps on the student's own samples.")
    adaptive: bool = Field(False, description="DistiLLM: raise lmbda whenever the validation loss rises.")
    adaptive_step: float = Field(0.1, gt=0.0, le=1.0, description="Rise of lmbda per validation-loss increase.")
    adaptive_max: float = Field(1.0, ge=0.0, le=1.0, description="Cap of the adaptive lmbda.")
    adaptive_every: int = Field(10, ge=1, description="Steps between validation-loss measurements.")


class OnPolicyOptions(StudentSteps, Sampling, Replay):
    """Student-generated data as the trainers read it: GKD (Agarwal et al. 2024), DistiLLM (Ko et al. 2024),
    DistiLLM-2 (Ko et al. 2025), MiniLLM (Gu et al. 2024)."""

    contrastive: ContrastiveOptions | None = Field(
        None, description="DistiLLM-2: every step trains on both the data and the student's samples (lmbda unused)."
    )
    minillm: MiniLLMOptions | None = Field(
        None, description="MiniLLM: every step on teacher-mixed samples, reverse KL by policy gradient (lmbda unused)."
    )


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

    align: Literal["uld", "vocab_map"] = Field(
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
    teacher_view: Literal["student_text", "own"] | None = Field(
        None,
        description="What the teacher reads. student_text (live default): the text the student's ids spell, chat "
        "markup included; own (a cache's view): its own encoding of each pair, its own chat template, rows aligned "
        "on the response (vocab_map only).",
    )

    @model_validator(mode="after")
    def _own_view(self):
        if self.teacher_view == "own" and self.align != "vocab_map":
            raise ValueError("teacher_view own aligns rows on the response and needs align vocab_map (not uld)")
        if self.teacher_view == "own" and self.max_teacher_length is not None:
            raise ValueError(
                "teacher_view own reads the teacher's own encoding, cut at data.max_length; remove max_teacher_length"
            )
        return self


class MultiTeacherOptions(Strict):
    """Combine the teacher with `extra_teachers` per token (one with another tokenizer joins on aligned rows)."""

    mode: Literal["mean", "confidence", "select", "student_aware"] = Field(
        "mean",
        description="mean: fixed weights; confidence: per-token teacher confidence; select: per example; "
        "student_aware: per example, softmax over teachers of -(student's mean KL(p_k || q) on the example) / tau, "
        "recomputed every step (after DiverseDistill, Liu et al. 2024; needs a trainer that passes the student).",
    )
    confidence: Literal["entropy", "maxprob"] = Field("entropy", description="Confidence measure of mode confidence.")
    weights: list[float] | None = Field(
        None,
        description="Weights of mode mean, teacher first (default: equal); the prior weights w_k of mode student_aware "
        "(a_k proportional to w_k exp(-d_k / tau)).",
    )
    tau: float = Field(
        1.0,
        gt=0.0,
        description="student_aware: temperature of the softmax over teachers, in nats of mean per-token KL; "
        "small: the best-understood teacher takes (nearly) all; large: mode mean.",
    )
    favor: Literal["understood", "gap"] = Field(
        "understood",
        description="student_aware: understood: the teacher the student is closest to (lowest KL) weighs most "
        "(the paper's filtering of low-relevance teachers); gap: the teacher it is furthest from weighs most.",
    )
    ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="student_aware: smooth each example's per-teacher KL over its visits, s = ema * s + (1 - ema) * d "
        "(0: the current step's KL alone).",
    )
    cross_kinds: list[Literal["exact", "normalized", "mined"]] = Field(
        ["exact", "normalized", "mined"],
        min_length=1,
        description="Vocab-map matches that carry the mass of an extra teacher with another tokenizer.",
    )

    @model_validator(mode="after")
    def _student_aware_fields(self) -> MultiTeacherOptions:
        # compared with the defaults, not model_fields_set: a dumped recipe states every field
        own = {"tau": 1.0, "favor": "understood", "ema": 0.0}
        stray = [k for k, v in own.items() if getattr(self, k) != v] if self.mode != "student_aware" else []
        if stray:
            raise ValueError(f"only mode student_aware reads {', '.join(stray)}; set mode: student_aware or drop them")
        return self


class SGLDSettings(Strict):
    """Stochastic gradient Langevin dynamics (Welling & Teh 2011) of Bayesian KD's posterior sampling."""

    lr: float = Field(
        2e-7,
        gt=0.0,
        description="SGLD base step size eps (Welling & Teh 2011): theta -= eps/2 grad U + N(0, eps), with U the "
        "negative log posterior summed over the training set (so eps scales like 1 / train size).",
    )
    gamma: float = Field(0.0, ge=0.0, description="Step-size decay eps_t = lr (b / (b + t))^gamma; 0: constant.")
    decay_offset: float = Field(100.0, gt=0.0, description="b of the step-size decay.")
    burn_in: int = Field(40, ge=0, description="SGLD steps discarded before the first sample.")
    samples: int = Field(8, ge=2, description="Posterior samples kept (each evaluated on the held-out set).")
    thin: int = Field(5, ge=1, description="SGLD steps between two kept samples.")
    noise_scale: float = Field(
        1.0, ge=0.0, description="Variance multiplier of the injected noise: 1 samples the posterior, 0 is MAP descent."
    )
    batch_size: int | None = Field(None, ge=1, description="SGLD batch size (null: train.batch_size).")
