"""The distill recipe's teacher, student and data sections."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import Field, model_validator

from potstill.recipes.base import Seed, Strict

Temperature = TypeVar("Temperature", bound=float | None)


def check_temperature(value: Temperature, what: str) -> Temperature:
    if value is None:
        return value
    from potstill.divergences.params import check_temperature

    check_temperature(value, what)
    return value


Dtype = Literal["float32", "bfloat16", "float16", "auto"]


AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


_ATTN = (
    "Attention kernel (transformers' attn_implementation): eager, sdpa, flash_attention_2/3 (CUDA and the "
    "flash-attn package), flex_attention; default: transformers' choice (sdpa where it can)."
)


class Quantization(Strict):
    bits: Literal[4, 8] = Field(
        ...,
        description="Load the teacher's linear layers in 4-bit (NF4) or 8-bit through "
        "bitsandbytes (pip install 'potstill[quantization]'; CUDA only).",
    )


class TeacherConfig(Strict):
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


class FromTeacherStudent(Strict):
    kind: Literal["from_teacher"] = "from_teacher"
    layers: int | list[int] = Field(
        6, description="Number of teacher layers to keep (evenly spaced) or their explicit indices."
    )
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)


class ScaledStudent(Strict):
    kind: Literal["scaled"] = "scaled"
    num_layers: int = Field(..., ge=1, description="Decoder layers of the random-init student.")
    hidden_size: int | None = Field(None, ge=8, description="Width; default: the teacher's.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; default: scaled with hidden_size.")
    num_attention_heads: int | None = Field(None, ge=1, description="Attention heads; default: the teacher's.")
    num_key_value_heads: int | None = Field(None, ge=1, description="KV heads; default: the teacher's.")
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)


class PretrainedStudent(Strict):
    kind: Literal["pretrained"] = "pretrained"
    model: str = Field(..., description="Short name, local directory or hub id of the student.")
    layers: int | list[int] | None = Field(
        None, description="Keep only these of the student's own layers (a count, evenly spaced, or indices)."
    )
    dtype: Dtype = Field("float32", description="Weights dtype of the student.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub.")
    attn_implementation: AttnImplementation | None = Field(None, description=_ATTN)


StudentConfig = Annotated[FromTeacherStudent | ScaledStudent | PretrainedStudent, Field(discriminator="kind")]


class DemoData(Strict):
    kind: Literal["demo"] = "demo"
    num_prompts: int = Field(200, ge=2, description="How many of the embedded prompts to use.")
    max_new_tokens: int = Field(32, ge=1, description="Length cap of the teacher's cached responses.")


class FileData(Strict):
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


class HubData(Strict):
    kind: Literal["hub"] = "hub"
    name: str = Field(..., description="Dataset name on the Hugging Face hub (or a local dataset script/dir).")
    config_name: str | None = Field(None, description="Dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    response_field: str = Field("response", description="Column holding the target response text.")
    messages_field: str | None = Field(None, description="Column holding a chat; last assistant turn is the target.")


RationaleMode = Literal["answer_only", "multitask", "cot"]


class ArithmeticData(Strict):
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


class Gsm8kData(Strict):
    kind: Literal["gsm8k"] = "gsm8k"
    path: str | None = Field(None, description="Training JSONL; default $POTSTILL_DATA/gsm8k/train.jsonl.")
    eval_path: str | None = Field(
        None, description="Held-out JSONL (its first data.eval_size problems); default $POTSTILL_DATA/gsm8k/test.jsonl."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N training problems.")
    mode: RationaleMode = Field("multitask", description="answer_only, multitask or cot (see arithmetic).")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="Share of the training problems used (nested subsets).")


DataSource = Annotated[DemoData | FileData | HubData | ArithmeticData | Gsm8kData, Field(discriminator="kind")]


class DataConfig(Strict):
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
