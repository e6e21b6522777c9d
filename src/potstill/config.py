"""The recipe: one validated pydantic model that fails at load time.

Every choice is a discriminated union on ``kind`` (or ``name`` for divergences), every
model forbids unknown keys, and every field is documented once, here. The resolved
recipe is written into the output directory next to the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import PotstillError


class _Strict(BaseModel):
    # allow_inf_nan=False: a learning rate, temperature or divergence parameter of inf/NaN is refused at load
    # time; otherwise it trains a NaN student and exits 0.
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
"""A seed numpy, torch and Python's random all accept (numpy refuses negatives and >= 2**32)."""

RESERVED_RUN_NAMES = ("teacher", "student_init")
"""Rows of the report that are not runs: a run of that name would silently replace them."""

RUN_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
"""A plain directory name: no separators, and never '.' or '..' (a run dir must lie inside output_dir/runs)."""


def _check_divergence(d: BaseModel) -> BaseModel:
    """Degenerate or undefined parameter end points are refused in one line (e.g. GKD's JSD at beta 0 is 0)."""
    from .divergences import check_divergence_params

    check_divergence_params(d.name, d.model_dump(exclude={"name"}))
    return d


def _check_temperature(value: float | None, what: str) -> float | None:
    if value is None:
        return value
    from .divergences import check_temperature

    check_temperature(value, what)
    return value


# ----------------------------------------------------------------------------- models

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]
_ATTN = (
    "Attention kernel (transformers' attn_implementation): eager, sdpa, flash_attention_2/3 (CUDA and the "
    "flash-attn package), flex_attention; default: transformers' choice (sdpa where it can)."
)


class Quantization(_Strict):
    bits: Literal[4, 8] = Field(
        ...,
        description="Load the teacher's linear layers in 4-bit (NF4) or 8-bit through "
        "bitsandbytes (pip install 'potstill[quantization]'; CUDA only).",
    )


class TeacherConfig(_Strict):
    model: str | None = Field(
        "smollm2-135m-instruct",
        description="Offline short name (smollm2-135m-instruct, gemma3-270m), a local directory, or a hub id; "
        "null: a black-box teacher known only by its responses in the data (sequence-level KD).",
    )
    dtype: Dtype = Field("float32", description="Weights dtype of the teacher.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)
    quantization: Quantization | None = Field(
        None,
        description="A frozen teacher in 4 or 8 bits (its output head stays unquantized, as the reducer reads "
        "it); a safetensors checkpoint on CUDA.",
    )
    device: str | None = Field(
        None,
        description="The torch device of this teacher when it is not the student's (e.g. cuda:1): its forward "
        "runs there and its final hidden states, with one copy of its output head, come to the student's device. "
        "Default: the recipe's device.",
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = Field(
        None,
        description="Spread the teacher over the GPUs, CPU RAM and disk with accelerate's big-model loading "
        "(transformers' from_pretrained device_map): 'auto' or {module: device, cpu or disk}; for a teacher larger "
        "than one device. Offloaded weights are loaded for the time of their forward.",
    )
    max_memory: dict[int | str, str] | None = Field(
        None, description="With device_map: the memory each place may take, e.g. {0: 20GiB, cpu: 60GiB}."
    )
    offload_folder: str | None = Field(None, description="With device_map: where weights offloaded to disk go.")

    @model_validator(mode="after")
    def _placement(self) -> TeacherConfig:
        if self.device is not None and self.device_map is not None:
            raise ValueError("teacher.device and teacher.device_map both place the teacher; keep one")
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError(
                "teacher.max_memory and teacher.offload_folder go with teacher.device_map; set it "
                "(e.g. auto) or remove them"
            )
        return self

    @property
    def placed(self) -> bool:
        """Whether the teacher is placed on its own (another device, or spread by a device map)."""
        return self.device is not None or self.device_map is not None


class FromTeacherStudent(_Strict):
    kind: Literal["from_teacher"] = "from_teacher"
    layers: int | list[int] = Field(
        6, description="Number of teacher layers to keep (evenly spaced) or their explicit indices."
    )
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)


class ScaledStudent(_Strict):
    kind: Literal["scaled"] = "scaled"
    num_layers: int = Field(..., ge=1, description="Decoder layers of the random-init student.")
    hidden_size: int | None = Field(None, ge=8, description="Width; default: the teacher's.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; default: scaled with hidden_size.")
    num_attention_heads: int | None = Field(None, ge=1, description="Attention heads; default: the teacher's.")
    num_key_value_heads: int | None = Field(None, ge=1, description="KV heads; default: the teacher's.")
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)


class PretrainedStudent(_Strict):
    kind: Literal["pretrained"] = "pretrained"
    model: str = Field(..., description="Short name, local directory or hub id of the student.")
    layers: int | list[int] | None = Field(
        None, description="Keep only these of the student's own layers (a count, evenly spaced, or indices)."
    )
    dtype: Dtype = Field("float32", description="Weights dtype of the student.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)


StudentConfig = Annotated[FromTeacherStudent | ScaledStudent | PretrainedStudent, Field(discriminator="kind")]


# ------------------------------------------------------------------------------- data


class DemoData(_Strict):
    kind: Literal["demo"] = "demo"
    num_prompts: int = Field(200, ge=2, description="How many of the embedded prompts to use.")
    max_new_tokens: int = Field(32, ge=1, description="Length cap of the teacher's cached responses.")


class FileData(_Strict):
    kind: Literal["file"] = "file"
    path: str = Field(
        ...,
        description="A .json, .jsonl, .csv or .parquet file (relative paths: to the recipe; "
        "a leading $POTSTILL_DATA/ is the shared data directory).",
    )
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    response_field: str = Field("response", description="Column holding the target response text.")
    messages_field: str | None = Field(
        None, description="Column holding a chat (list of {role, content}); the last assistant turn is the target."
    )


class HubData(_Strict):
    kind: Literal["hub"] = "hub"
    name: str = Field(..., description="Dataset name on the Hugging Face hub (or a local dataset script/dir).")
    config_name: str | None = Field(None, description="Dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    response_field: str = Field("response", description="Column holding the target response text.")
    messages_field: str | None = Field(None, description="Column holding a chat; last assistant turn is the target.")


RationaleMode = Literal["answer_only", "multitask", "cot"]


class ArithmeticData(_Strict):
    kind: Literal["arithmetic"] = "arithmetic"
    num_problems: int = Field(600, ge=2, description="Problems generated (held-out ones included).")
    level: int = Field(3, ge=1, le=5, description="Operations per problem (the number of rationale steps).")
    seed: Seed = Field(0, description="Seed of the generator (problem i is the same for any num_problems).")
    mode: RationaleMode = Field(
        "multitask",
        description="answer_only; multitask (Distilling step-by-step, answer + rationale tasks); "
        "cot (rationale then the answer in one target).",
    )
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of the training problems used (nested subsets).")


class Gsm8kData(_Strict):
    kind: Literal["gsm8k"] = "gsm8k"
    path: str | None = Field(None, description="Training JSONL; default $POTSTILL_DATA/gsm8k/train.jsonl.")
    eval_path: str | None = Field(
        None, description="Held-out JSONL (its first data.eval_size problems); default $POTSTILL_DATA/gsm8k/test.jsonl."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N training problems.")
    mode: RationaleMode = Field("multitask", description="answer_only, multitask or cot (see arithmetic).")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of the training problems used (nested subsets).")


DataSource = Annotated[DemoData | FileData | HubData | ArithmeticData | Gsm8kData, Field(discriminator="kind")]


class DataConfig(_Strict):
    source: DataSource = Field(default_factory=DemoData, description="Where the examples come from.")
    eval_size: int = Field(40, ge=1, description="Held-out examples (taken from the end after a seeded shuffle).")
    max_length: int = Field(256, ge=8, description="Truncate prompt + response to this many tokens.")
    system_prompt: str | None = Field(None, description="Optional system message put before every prompt.")
    seed: Seed = Field(0, description="Seed of the train/eval split.")
    selection: str | None = Field(
        None, description="Train only on the examples of a `potstill select` selection.json (same data section)."
    )
    packing: bool = Field(
        False,
        description="Pack each batch's examples into rows of max_length (position ids restart per example, "
        "attention stays inside each example): no padding computed. The batch still counts examples, so the loss, "
        "caches and on-policy sampling are those of the padded batch.",
    )


# ------------------------------------------------------------------------ divergences


class _Div(_Strict):
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


class ContrastiveOptions(_Strict):
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


class MiniLLMOptions(_Strict):
    """MiniLLM (Gu et al. 2024): sequence-level reverse KL by policy gradient on teacher-mixed samples."""

    mix: float = Field(0.2, ge=0.0, lt=1.0, description="Teacher share of the sampling distribution (paper: 0.2).")
    length_norm: bool = Field(True, description="Later-token return as a mean (length normalization), not a sum.")
    long_term: bool = Field(
        True,
        description="Keep the policy-gradient term of later tokens (false: single-step "
        "reverse KL on the samples only).",
    )


class OnPolicyOptions(_Strict):
    """Student-generated data: GKD (Agarwal et al. 2024), DistiLLM (Ko et al. 2024), DistiLLM-2 (Ko et al. 2025)."""

    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="GKD's lambda: share of steps on the student's own samples.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the student (not the KD one).")

    @field_validator("temperature")
    @classmethod
    def _sampling_temperature(cls, v: float) -> float:
        return _check_temperature(v, "on_policy.temperature")

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


class ScheduleOptions(_Strict):
    """Dynamic KD: alpha and temperature move from the run's values to these over training."""

    kind: Literal["linear", "cosine"] = Field("linear", description="Shape of the schedule over optimizer steps.")
    alpha_end: float | None = Field(None, ge=0.0, le=1.0, description="CE weight at the last step (null: fixed).")
    temperature_end: float | None = Field(None, gt=0.0, description="Distillation temperature at the last step.")

    @field_validator("temperature_end")
    @classmethod
    def _temperature_end(cls, v: float | None) -> float | None:
        return _check_temperature(v, "schedule.temperature_end")


class RelationOptions(_Strict):
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


class FeatureOptions(_Strict):
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


class CrossTokenizerOptions(_Strict):
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


class MultiTeacherOptions(_Strict):
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


# ------------------------------------------------------------------------------ train


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt (never the lm_head)."
    )


class TrainConfig(_Strict):
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


class RunConfig(_Strict):
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
        return _check_temperature(v, "temperature")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_RUN_NAMES:
            raise ValueError(
                f"run name '{v}' is a row of the report already ({' and '.join(RESERVED_RUN_NAMES)}); rename the run"
            )
        return v


def _default_runs() -> list[RunConfig]:
    return [
        RunConfig(name="sft", alpha=1.0),
        RunConfig(name="kd_forward_kl", alpha=0.0, divergence=ForwardKL()),
        RunConfig(name="kd_alpha_beta", alpha=0.0, divergence=AlphaBeta(alpha=0.9, beta=0.1)),
    ]


# ------------------------------------------------------------------------------ cache


class TopKCache(_Strict):
    kind: Literal["topk"] = "topk"
    k: int = Field(32, ge=1, description="Teacher log-probs kept per token (the k most likely), plus the tail mass.")
    tail: Literal["bucket", "renormalize"] = Field(
        "bucket", description="Tail handling: one extra outcome (bucket) or drop and renormalize (biased)."
    )


class SampledCache(_Strict):
    kind: Literal["sampled"] = "sampled"
    draws: int = Field(12, ge=1, le=255, description="Tokens drawn per position (Anshumann et al. 2025); unbiased.")
    proposal_temperature: float = Field(
        1.0, gt=0.0, description="Draw from the teacher at this extra temperature (importance-weighted when != 1)."
    )

    @field_validator("proposal_temperature")
    @classmethod
    def _proposal(cls, v: float) -> float:
        return _check_temperature(v, "cache.signal.proposal_temperature")


class DenseCache(_Strict):
    kind: Literal["dense"] = "dense"


CacheSignalConfig = Annotated[TopKCache | SampledCache | DenseCache, Field(discriminator="kind")]


class CacheConfig(_Strict):
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

    @field_validator("temperature")
    @classmethod
    def _cache_temperature(cls, v: float | None) -> float | None:
        return _check_temperature(v, "cache.temperature")


class VLLMOptions(_Strict):
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


class GenerationOptions(_Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who generates: hf (transformers' generate, any device, the default) or vllm (pip install "
        "'potstill[vllm]', CUDA): the teacher's answers for the demo data and on-policy sampling.",
    )
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="Options of the vllm backend.")


class EvalConfig(_Strict):
    max_new_tokens: int = Field(32, ge=1, description="Greedy generation length for ROUGE-L and tokens/s.")
    batch_size: int = Field(8, ge=1, le=2**16, description="Evaluation batch size.")
    include_untrained: bool = Field(True, description="Also evaluate the student before training.")


class PushToHub(_Strict):
    repo: str = Field(
        ...,
        min_length=3,
        description="Hub repository of each student, e.g. you/smol-student-{run} "
        "({run}: the run's name; needed with several runs).",
    )
    private: bool = Field(True, description="Create the repositories private.")


class Recipe(_Strict):
    output_dir: str = Field("runs/demo", description="Where the resolved recipe, students, metrics and report go.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher.")
    extra_teachers: list[TeacherConfig] = Field(
        default_factory=list, description="Further teachers for runs with multi_teacher (any tokenizer)."
    )
    student: StudentConfig = Field(default_factory=FromTeacherStudent, description="How the student is built.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out examples.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization, equal for every run.")
    runs: list[RunConfig] = Field(default_factory=_default_runs, description="Students to train and compare.")
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
        if self.teacher.model is None:
            self._check_black_box()
        if self.data.packing:
            self._check_packing()
        self._check_placement()
        if self.generation.backend == "vllm":
            self._check_vllm()
        if self.train.eval_steps is not None and self.teacher.model is None:
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
        return self

    def _check_placement(self) -> None:
        placed = [("teacher", self.teacher)] + [(f"extra_teachers[{i}]", t) for i, t in enumerate(self.extra_teachers)]
        placed = [who for who, t in placed if t.placed]
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
        on = [r for r in self.runs if r.on_policy is not None]
        mixed = [r.name for r in on if r.on_policy.minillm is not None]
        if mixed:
            raise ValueError(
                f"generation.backend vllm: run(s) {mixed} (MiniLLM) mix the teacher into the student's "
                "sampling, which only the hf backend does; set generation.backend hf"
            )
        if on and self.train.distributed == "zero3":
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
                    ("cross_tokenizer", r.cross_tokenizer is not None),
                    ("on_policy.contrastive (DistiLLM-2)", op is not None and op.contrastive is not None),
                    ("on_policy.minillm", op is not None and op.minillm is not None),
                    ("feature.relations", r.feature is not None and r.feature.relations is not None),
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
                f"run(s) {live} use on_policy, which needs the live teacher to score the student's "
                "samples; remove the cache section or on_policy"
            )
        live = [
            r.name
            for r in self.runs
            if r.feature is not None or r.multi_teacher is not None or r.cross_tokenizer is not None
        ]
        if live:
            raise ValueError(
                f"run(s) {live} use feature, multi_teacher or cross_tokenizer, which need live teachers "
                "(a cache holds one teacher's signal in its tokens); remove the cache section or them"
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


# --------------------------------------------------------------------------- loading


def _key_path(loc: tuple, data: Any, absent_last: bool = False) -> str:
    """The recipe key of an error location, without pydantic's class names and union tags.

    A union tag is a location part the recipe does not hold: ``cache.signal.sampled.draws`` ->
    ``cache.signal.draws`` (also when the tag was defaulted, so the recipe names no ``kind``). Only
    the last part may legitimately be absent (``absent_last``: an unknown or a missing key)."""
    parts, node = [], data
    for i, p in enumerate(loc):
        if isinstance(p, str) and p[:1].isupper():
            continue
        last = i == len(loc) - 1
        nxt = None if last else loc[i + 1]
        if (
            isinstance(node, dict)
            and isinstance(p, str)
            and (
                (p not in node and not (last and absent_last))
                # a tag that is also a field name (student kind `layers` with a `layers` list)
                or (isinstance(nxt, str) and nxt in node and not isinstance(node.get(p), dict))
            )
        ):
            continue  # the tag of a discriminated union
        parts.append(str(p))
        if isinstance(node, dict):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            node = None
    return ".".join(parts) or "<recipe>"


def format_validation_error(err: ValidationError, data: Any = None, verb: str = "distill") -> str:
    """One line naming the recipe key of the first problem and the fix, for every recipe kind
    (``verb``: the ``potstill`` command whose ``--help`` lists the options)."""
    e = err.errors()[0]
    loc = _key_path(e["loc"], data, absent_last=e["type"] in ("extra_forbidden", "missing"))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"recipe key '{loc}' is not a known option; remove it or fix its spelling (see `potstill {verb} --help`)"
    if e["type"] == "missing":
        return f"recipe key '{loc}' is required; add it to the recipe"
    if e["type"] == "union_tag_invalid":
        ctx = e.get("ctx") or {}
        key = str(ctx.get("discriminator", "")).strip("'")
        where = f"{loc}.{key}" if key.isidentifier() else loc  # a callable discriminator names no key
        return (
            f"recipe key '{where}' is '{ctx.get('tag')}'; use one of {ctx.get('expected_tags')}"
            if "expected_tags" in ctx
            else f"recipe key '{loc}': {msg}; use one of the listed values"
        )
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    if "; " in msg:  # the validator's message names its own fix: keep it last
        problem, fix = msg.split("; ", 1)
        return f"recipe key '{loc}': {problem}{more}; {fix}"
    return f"recipe key '{loc}': {msg}{more}; fix the value in the recipe"


DATA_VAR = "$POTSTILL_DATA"
"""A data path starting with this names a file in the shared data directory (``$POTSTILL_DATA``)."""


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise PotstillError(f"override '{item}' is not key=value; write e.g. train.max_steps=10")
    key, raw = item.split("=", 1)
    if not key:
        raise PotstillError(f"override '{item}' has an empty key; write e.g. train.max_steps=10")
    return key.split("."), _override_value(raw)


def _override_value(raw: str) -> Any:
    """An override's value read as YAML; what YAML cannot read (``[1``, a 5,000-digit number) stays a string,
    which the schema then refuses in one line naming the key."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        return raw


def _default_at(path: list[str]) -> Any:
    """The embedded default's value at ``path`` (so ``runs.1.alpha=...`` works on a recipe without runs)."""
    node: Any = Recipe().model_dump(mode="json")
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return {}
    return node if isinstance(node, (dict, list)) else {}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise PotstillError(f"override '{item}': '{part}' is not an index of {'.'.join(path[:i])}")
                node = node[int(part)]
            else:
                if part not in node or node[part] is None:
                    node[part] = _default_at(path[: i + 1])
                node = node[part]
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise PotstillError(f"override '{item}': '{last}' is not an index of {'.'.join(path[:-1])}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise PotstillError(
                f"override '{item}': '{'.'.join(path[:-1])}' is not a section; override "
                f"'{'.'.join(path[:-1])}' itself or a key of a section"
            )
    return data


def recipe_from_dict(data: dict, overrides: list[str] | None = None, base_dir: Path | None = None) -> Recipe:
    data = apply_overrides(dict(data or {}), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data)) from None
    src = recipe.data.source
    for obj, key in ((src, "path"), (src, "eval_path")):
        value = getattr(obj, key, None)
        if isinstance(value, str) and value.startswith(DATA_VAR):
            from .data.rationale import data_root

            setattr(obj, key, str(data_root() / value[len(DATA_VAR) :].lstrip("/")))
    if base_dir is not None:
        if isinstance(src, FileData) and not Path(src.path).is_absolute():
            src.path = str((base_dir / src.path).resolve())
    return recipe


def read_recipe_file(path: str | Path, sections: str = "teacher, student, data, ...") -> dict:
    """The mapping in a YAML recipe file (``yaml.safe_load``; empty file: ``{}``), or a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"recipe file '{p}' does not exist; pass the path of a YAML recipe (see recipes/)")
    data = parse_recipe_text(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PotstillError(f"recipe '{p}' must be a YAML mapping of sections ({sections})")
    return data


def parse_recipe_text(p: Path) -> Any:
    """``yaml.safe_load`` of a recipe file, with every way it can fail as one line naming the file and the fix."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PotstillError(
            f"recipe '{p}' is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise PotstillError(
            f"recipe '{p}' cannot be read ({err.strerror}); check the path and its permissions"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PotstillError(f"recipe '{p}' is not valid YAML{where}; fix its syntax") from None
    except RecursionError:
        raise PotstillError(
            f"recipe '{p}' is nested too deeply to read; a recipe is a few levels of sections, fix its structure"
        ) from None
    except ValueError as err:  # e.g. Python's limit on the digits of an integer
        raise PotstillError(
            f"recipe '{p}' holds a value YAML cannot read ({str(err).splitlines()[0]}); fix that value"
        ) from None


def apply_plain_overrides(data: dict, overrides: Sequence[str], example: str = "train.steps=10") -> dict:
    """``key.path=value`` overrides into nested dicts (sections are created as needed); the
    value is read as YAML. For recipes without list sections (the task verbs' recipes)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PotstillError(f"override '{item}' is not key=value; write e.g. {example}")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PotstillError(f"override '{item}': '{part}' is not a section")
        node[last] = _override_value(raw)
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``None``: the embedded default) and apply ``key=value`` overrides."""
    if path is None:
        return recipe_from_dict({}, overrides)
    return recipe_from_dict(read_recipe_file(path), overrides, base_dir=Path(path).parent)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
