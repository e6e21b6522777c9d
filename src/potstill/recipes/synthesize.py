"""The ``potstill synthesize`` recipe: the pydantic schema of teacher synthesis (Self-Instruct, Evol-Instruct).

Importable without torch. The algorithm that reads these settings is
:func:`potstill.dd.synthesize.synthesize`; :mod:`potstill.runners.synthesize` validates
recipes (:func:`~potstill.runners.synthesize.synthesis_config_from_dict`) and runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from potstill.paths import resolve_data_path
from potstill.recipes.base import RecipeFile, Strict
from potstill.recipes.distill import GenerationOptions

__all__ = [
    "UNSUPPORTED_KEYWORDS",
    "EvolInstructConfig",
    "EvolOperation",
    "FilterConfig",
    "MethodConfig",
    "SamplingConfig",
    "SelfInstructConfig",
    "SynthesisConfig",
]


UNSUPPORTED_KEYWORDS = (  # the default of filters.unsupported_keywords
    "image",
    "photo",
    "photograph",
    "picture",
    "screenshot",
    "diagram",
    "flowchart",
    "chart",
    "graph",
    "plot",
    "sketch",
    "draw",
    "drawing",
    "painting",
    "video",
    "audio",
    "recording",
    "podcast",
    "listen",
    "file",
    "attachment",
    "attached",
    "pdf",
    "spreadsheet",
    "upload",
    "download",
    "url",
    "hyperlink",
    "webpage",
    "website",
    "browse",
    "click",
    "go to",
    "camera",
)


class SamplingConfig(Strict):
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(
        0.7, gt=0.0, description="Generation (sampling) temperature of the teacher; not a distillation temperature."
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass (1.0: off).")
    max_new_tokens: int = Field(256, ge=1, description="Length cap of each teacher completion.")

    @field_validator("temperature")
    @classmethod
    def _finite(cls, v: float) -> float:
        from potstill.divergences.params import check_temperature

        check_temperature(v, "sampling.temperature")  # below 0.01, sampling is greedy decoding: do_sample false
        return v


class SelfInstructConfig(Strict):
    kind: Literal["self_instruct"] = "self_instruct"
    n_instructions: int = Field(
        100, ge=1, description="Stop once this many new instructions are kept (extra: over_budget)."
    )
    rounds: int = Field(10, ge=1, description="At most this many rounds.")
    prompts_per_round: int = Field(8, ge=1, description="Teacher prompts (lists to continue) per round.")
    k_in_context: int = Field(8, ge=1, description="Example instructions shown in each prompt.")
    machine_examples: int = Field(
        2, ge=0, description="Of those, how many come from the generated pool once it has them (the rest: seeds)."
    )
    new_per_prompt: int = Field(8, ge=1, description="New instructions each prompt asks for.")
    novelty_threshold: float = Field(
        0.7, gt=0.0, le=1.0, description="Drop a new instruction whose ROUGE-L F vs any pool instruction is >= this."
    )
    generate_inputs: bool = Field(
        True, description="Ask the teacher for an input and an output per instruction (false: just answer it)."
    )

    @model_validator(mode="after")
    def _examples(self) -> SelfInstructConfig:
        if self.machine_examples > self.k_in_context:
            raise ValueError(f"machine_examples={self.machine_examples} exceeds k_in_context={self.k_in_context}")
        return self


EvolOperation = Literal["constraints", "deepen", "concretize", "reasoning", "breadth"]


class EvolInstructConfig(Strict):
    kind: Literal["evol_instruct"] = "evol_instruct"
    pool_size: int = Field(32, ge=1, description="Seed instructions drawn (seeded) into the evolving pool.")
    rounds: int = Field(3, ge=1, description="Evolution rounds over the pool.")
    operations: list[EvolOperation] = Field(
        default_factory=lambda: list(get_args(EvolOperation)),
        min_length=1,
        description="Operations drawn uniformly per instruction and round (in-depth ones and breadth).",
    )

    @field_validator("operations")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("operations are repeated; list each once")
        return v


def _method_tag(v: Any) -> str:
    # A method section without `kind` is Self-Instruct (so key=value overrides can create it).
    return v.get("kind", "self_instruct") if isinstance(v, dict) else getattr(v, "kind", "self_instruct")


MethodConfig = Annotated[
    Annotated[SelfInstructConfig, Tag("self_instruct")] | Annotated[EvolInstructConfig, Tag("evol_instruct")],
    Discriminator(_method_tag),
]


class FilterConfig(Strict):
    min_instruction_words: int = Field(3, ge=1, description="Drop instructions with fewer words (too short).")
    max_instruction_words: int = Field(150, ge=1, description="Drop instructions with more words (too long).")
    max_non_ascii: float = Field(
        0.1, ge=0.0, le=1.0, description="Drop instructions whose share of non-ASCII or control characters is higher."
    )
    min_response_words: int | None = Field(
        None, ge=1, description="Drop answers with fewer words; default 1 for self_instruct, 5 for evol_instruct."
    )
    max_repetition: float = Field(
        0.3, ge=0.0, le=1.0, description="Drop text whose share of repeated word 4-grams is higher (repetitive)."
    )
    drop_truncated: bool = Field(True, description="Drop items a completion's max_new_tokens cut off.")
    unsupported_keywords: list[str] = Field(
        default_factory=lambda: list(UNSUPPORTED_KEYWORDS),
        description="Words (whole, case-insensitive, plural s allowed) naming what a text model cannot do.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_instruction_words > self.max_instruction_words:
            raise ValueError("min_instruction_words exceeds max_instruction_words")
        return self


class SynthesisConfig(RecipeFile):
    """The `potstill synthesize` recipe."""

    verb: Literal["synthesize"] = Field("synthesize", description="The command this recipe is for.")

    output_dir: str = Field(
        "runs/synthesize", description="Where rounds, generations, synthetic.jsonl and the report go."
    )
    teacher: str = Field("smollm2-135m-instruct", description="Offline short name, local directory or hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Teacher weights dtype.")
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")
    seeds_path: str | None = Field(
        None,
        description="Seed tasks JSONL (instruction, instances); default $POTSTILL_DATA/self_instruct/seed_tasks.jsonl.",
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of example sampling, evolution operations and generation."
    )
    method: MethodConfig = Field(default_factory=SelfInstructConfig, description="self_instruct or evol_instruct.")
    instruction_generation: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Sampling of new or evolved instructions."
    )
    answer_generation: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(do_sample=False), description="Sampling of the answers (greedy default)."
    )
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Quality filter bounds.")
    system_prompt: str | None = Field(None, description="Optional system message before every teacher prompt.")
    batch_size: int = Field(8, ge=1, description="Teacher generation batch size.")
    chunk_size: int = Field(64, ge=1, description="Prompts per resumable generation chunk.")
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions,
        description="The teacher's generation engine: hf (default, any device) "
        "or vllm (pip install 'potstill[vllm]', CUDA; colocate or server).",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_kind(cls, data: Any) -> Any:
        """A method section without ``kind`` is Self-Instruct, stated, so error paths name no union tag."""
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "kind" not in data["method"]:
            data = {**data, "method": {"kind": "self_instruct", **data["method"]}}
        return data

    def resolve_paths(self, base_dir: Path | None) -> None:
        if self.seeds_path is not None:
            self.seeds_path = resolve_data_path(self.seeds_path, base_dir)


RECIPE = SynthesisConfig
