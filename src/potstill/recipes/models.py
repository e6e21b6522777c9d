"""The distill recipe's teacher, student and data sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import Discriminator, Field, Tag, model_validator

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
    # exclude: the resolved recipe and the fingerprints of finished runs stay those of recipes before `kind`
    kind: Literal["model"] = Field(
        "model", exclude=True, description="model (the default): a teacher with weights of its own, or a black box."
    )
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

    @property
    def label(self) -> str:
        """The teacher in the report's notes."""
        return self.model or "black box (its responses in the data)"


EMA_DECAY = 0.999
"""The default ``decay`` of an EMA self teacher (Tarvainen & Valpola 2017 use 0.99 to 0.999)."""


class SelfTeacher(Strict):
    """The student's own earlier self as its teacher: no second set of weights is loaded.

    ``frozen``: a copy of the student taken when training starts (born-again networks, Furlanello et al. 2018);
    ``ema``: an exponential moving average of the student, ``theta_T <- decay * theta_T + (1 - decay) * theta_S``
    after every optimizer step (mean teacher, Tarvainen & Valpola 2017, eq. 1).
    """

    kind: Literal["self"] = "self"
    mode: Literal["frozen", "ema"] = Field(
        "ema",
        description="frozen: a copy of the student at the start of training (born-again networks); ema: an "
        "exponential moving average of the student, updated after every optimizer step (mean teacher).",
    )
    decay: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description=f"mode ema: theta_T <- decay * theta_T + (1 - decay) * theta_S, in [0, 1); default {EMA_DECAY}.",
    )

    @model_validator(mode="after")
    def _decay(self) -> SelfTeacher:
        if self.mode == "frozen" and self.decay is not None:
            raise ValueError("teacher.decay is the EMA's and mode frozen never updates; remove it or set mode ema")
        if self.mode == "ema" and self.decay is None:
            self.decay = EMA_DECAY
        return self

    @property
    def placed(self) -> bool:
        """Never on its own: the self teacher lives on the student's device."""
        return False

    @property
    def label(self) -> str:
        if self.mode == "frozen":
            return "self (a frozen copy of the initial student)"
        return f"self (an EMA of the student, decay {self.decay})"

    def check_recipe(self, recipe: Any) -> None:
        """What of a distill ``recipe`` a self teacher cannot serve, refused in one line (``ValueError``)."""
        r, kind = recipe, recipe.student.kind
        bad = [x.name for x in r.runs if x.multi_teacher is not None or x.cross_tokenizer is not None]
        # Teacher == student at step 0: a pure-KD run sees KL(p || p) = 0 and no gradient, forever (frozen or EMA).
        still = [
            x.name
            for x in r.runs
            if x.uses_teacher and x.alpha == 0.0 and (x.schedule is None or not x.schedule.alpha_end)
        ]
        problems = [
            (
                kind != "pretrained",
                f"teacher.kind self copies the student, but student.kind {kind} builds the student from a teacher "
                "model's weights; use student.kind pretrained (model: a directory or short name; layers: to cut it)",
            ),
            (
                bool(r.extra_teachers) or bool(bad),
                f"teacher.kind self has no model to join extra_teachers or to run on other tokens (runs {bad}); "
                "remove extra_teachers, multi_teacher and cross_tokenizer, or use a teacher model",
            ),
            (r.cache is not None, "teacher.kind self exists only while training; remove the cache section"),
            (
                r.data.source.kind == "demo",
                "the demo data is answered by a teacher model and teacher.kind self has none; use data.source "
                "kind file, hub, arithmetic or gsm8k",
            ),
            (
                r.train.eval_steps is not None,
                "train.eval_steps compares the student with a teacher model; remove it with teacher.kind self",
            ),
            (
                r.train.distributed in ("fsdp2", "zero3"),
                f"teacher.kind self under train.distributed {r.train.distributed}: the copy would be a whole "
                "unsharded model on every process and the EMA would read sharded weights; use ddp or none",
            ),
            (
                self.mode == "ema" and r.train.lora is not None,
                "teacher.mode ema averages the student's whole weights but train.lora trains adapters; use "
                "mode frozen or remove train.lora",
            ),
            (
                self.mode == "ema" and r.train.save_steps is not None,
                "teacher.mode ema: the average is not kept in checkpoints, so a resumed run would restart it; "
                "remove train.save_steps or use mode frozen",
            ),
            (
                bool(still),
                f"run(s) {still} have alpha 0, and a self teacher equals the student at step 0: KD to itself is "
                "0 with no gradient, so nothing trains; set alpha in (0, 1) to mix cross-entropy",
            ),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)


def teacher_kind(data: Any) -> str:
    """The tag of a distill recipe's teacher: its ``kind``, ``model`` when it names none (recipes before it)."""
    kind = data.get("kind", "model") if isinstance(data, dict) else getattr(data, "kind", "model")
    return kind if isinstance(kind, str) else "model"  # a non-string kind: the model teacher's error names it


DistillTeacher = Annotated[
    Union[Annotated[TeacherConfig, Tag("model")], Annotated[SelfTeacher, Tag("self")]],  # noqa: UP007
    Discriminator(teacher_kind),
]
"""A distill recipe's teacher: a model (:class:`TeacherConfig`, ``kind`` model or absent) or the student's own
earlier self (:class:`SelfTeacher`, ``kind: self``)."""


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


class PubmedqaData(Strict):
    kind: Literal["pubmedqa"] = "pubmedqa"
    path: str | None = Field(
        None, description="Folder with ori_pqal.json and test_ground_truth.json; default $POTSTILL_DATA/pubmedqa."
    )
    context_words: int | None = Field(
        250, ge=1, description="Cut each abstract to this many words (null: whole abstract)."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N training questions.")


DataSource = Annotated[
    DemoData | FileData | HubData | ArithmeticData | Gsm8kData | PubmedqaData, Field(discriminator="kind")
]


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
