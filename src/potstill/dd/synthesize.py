"""Generative synthesis of compact instruction datasets by a teacher: Self-Instruct and Evol-Instruct.

Two methods, each a loop of *rounds* that ask the teacher for new instructions, ask it to
answer them, and keep or drop every candidate with a named reason:

* **Self-Instruct** (Wang et al. 2023, "Self-Instruct: Aligning Language Models with
  Self-Generated Instructions", ACL, arXiv:2212.10560, section 2.2): a prompt shows
  ``k_in_context`` task instructions sampled from the human seed tasks and from those
  already generated (``machine_examples`` of them, 2 of 8 in the paper), and the teacher
  continues the numbered list; new instructions are parsed from the list, filtered (ROUGE-L
  novelty against the whole pool, keyword and length heuristics), then answered with an
  optional input ("input-first" instance generation; the paper's output-first variant for
  classification tasks is not implemented).
* **Evol-Instruct** (Xu et al. 2024, "WizardLM: Empowering Large Pre-Trained Language
  Models to Follow Complex Instructions", ICLR, arXiv:2304.12244, section 3): a pool of
  seed instructions is rewritten round after round by *in-depth* evolving (add constraints,
  deepen, concretize, increase reasoning steps) or *in-breadth* evolving (a new, rarer
  task of the same domain), one operation drawn per instruction and round; failed
  evolutions are eliminated (section 3.3: no new information, copied prompt words, an empty
  or refusing answer) and the parent goes on to the next round in their place.

The prompts are written for this module from the papers' descriptions; they, their parsers,
the ROUGE-L novelty index and the keep/drop checks are pure text functions that live in
:mod:`potstill.dd.synth_text` and are re-exported here. This module holds the config, the
seed tasks, the teacher generator, the two methods and the round driver.

Every round's result (kept records, dropped candidates with their reasons, counts, the next
pool) is written atomically to ``<output_dir>/rounds/round-NNN.json`` with the run key and
the sha256 of the previous round file, so a rerun loads finished rounds instead of
generating them and only resumes the first missing one. Within a round the teacher
generates through :func:`potstill.generation_cache.generate_cached` (directory
``<output_dir>/generations/round-NNN-<stage>-<prompts hash>``), so a killed generation
resumes by chunk. ``generation.backend: vllm`` generates with a vLLM engine for the teacher
(colocated or a server, :mod:`potstill.vllm_engine`); the backend is part of the run key.
Rounds are deterministic given ``seed``: example sampling and evolution operations use a
per-round ``random.Random``, and each stage samples with its own derived generation seed.

Drop reasons (a candidate is dropped by the first check that fails, in this order):

* instructions: ``truncated`` (``max_new_tokens`` cut the completion inside this, its last
  item), ``empty_instruction``, ``evolution_copies_template``, ``evolution_unchanged``
  (Evol only), ``instruction_too_short``, ``instruction_too_long``,
  ``starts_with_punctuation``, ``non_ascii``, ``unsupported_modality`` (images, audio,
  files, the web: what a text model cannot do), ``repetitive`` (a looping generation),
  ``refusal`` (the "instruction" is the teacher declining), ``not_novel`` (Self-Instruct:
  ROUGE-L F >= ``novelty_threshold`` against the pool),
  ``duplicate_instruction`` (Evol);
* answers: ``truncated_answer``, ``unparsable_answer``, ``empty_answer`` (nothing but
  punctuation and stop words), ``answer_too_short``, ``repetitive``, ``refusal``,
  ``answer_copies_prompt`` (4+ words echoed verbatim from the prompt), ``duplicate_output``;
* ``over_budget``: Self-Instruct kept more than ``n_instructions``; the last ones are cut.

Output: ``synthetic.jsonl`` with ``{id, prompt, response, source, round, parent, ...}`` per
line (``data.source.kind: file`` reads ``prompt``/``response``) and
``synthesis_report.json`` with candidates, kept, dropped per reason and wall time;
``candidates == kept + sum(dropped)`` always holds.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ..config import GenerationOptions
from ..errors import PotstillError
from ..generation_cache import GenerationParams
from ..io import atomic_write_json, atomic_write_text
from .synth_text import (  # the pure text parts; the public ones are re-exported (see __all__)
    EVOL_OPERATIONS,
    TEMPLATE_MARKERS,
    UNSUPPORTED_KEYWORDS,
    Candidate,
    Check,
    NoveltyIndex,
    _answer_checks,
    _join,
    _list_items,
    _norm,
    _Novel,
    _quality,
    _Seen,
    _truncated,
    answer_prompt,
    check_answer,
    check_evolution,
    check_instruction,
    copies_prompt,
    evol_prompt,
    keep_or_drop,
    parse_answer,
    parse_evolution,
    parse_instructions,
    repetitive,
    rouge_l_f,
    sample_examples,
    self_instruct_prompt,
)

__all__ = [
    "EVOL_OPERATIONS",
    "TEMPLATE_MARKERS",
    "UNSUPPORTED_KEYWORDS",
    "Candidate",
    "Check",
    "Completion",
    "EvolInstructConfig",
    "FilterConfig",
    "NoveltyIndex",
    "SamplingConfig",
    "SeedTask",
    "SelfInstructConfig",
    "SynthesisConfig",
    "TeacherGenerator",
    "answer_prompt",
    "check_answer",
    "check_evolution",
    "check_instruction",
    "copies_prompt",
    "evol_prompt",
    "keep_or_drop",
    "load_seed_tasks",
    "load_synthesis_config",
    "parse_answer",
    "parse_evolution",
    "parse_instructions",
    "repetitive",
    "rouge_l_f",
    "run_synthesis",
    "sample_examples",
    "self_instruct_prompt",
    "synthesis_config_from_dict",
    "synthesize",
]

ROUND_FORMAT = "potstill-synthesis-round"
VERSION = 1  # part of the run key: bump it when prompts or keep/drop rules change, so old rounds are not reused
SEEDS_RELPATH = "self_instruct/seed_tasks.jsonl"

# ------------------------------------------------------------------------------ config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingConfig(_Strict):
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(
        0.7, gt=0.0, description="Generation (sampling) temperature of the teacher; not a distillation temperature."
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass (1.0: off).")
    max_new_tokens: int = Field(256, ge=1, description="Length cap of each teacher completion.")

    @field_validator("temperature")
    @classmethod
    def _finite(cls, v: float) -> float:
        from ..divergences import check_temperature

        check_temperature(v, "sampling.temperature")  # below 0.01, sampling is greedy decoding: do_sample false
        return v

    def params(self, seed: int) -> GenerationParams:
        return GenerationParams(self.max_new_tokens, self.do_sample, self.temperature, self.top_p, seed)


class SelfInstructConfig(_Strict):
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


class EvolInstructConfig(_Strict):
    kind: Literal["evol_instruct"] = "evol_instruct"
    pool_size: int = Field(32, ge=1, description="Seed instructions drawn (seeded) into the evolving pool.")
    rounds: int = Field(3, ge=1, description="Evolution rounds over the pool.")
    operations: list[EvolOperation] = Field(
        default_factory=lambda: ["constraints", "deepen", "concretize", "reasoning", "breadth"],
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


class FilterConfig(_Strict):
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


class SynthesisConfig(_Strict):
    """The `potstill synthesize` recipe."""

    output_dir: str = Field(
        "runs/synthesize", description="Where rounds, generations, synthetic.jsonl and the report go."
    )
    teacher: str = Field("smollm2-135m-instruct", description="Offline short name, local directory or hub id.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Teacher weights dtype.")
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")
    seeds_path: str | None = Field(
        None, description=f"Seed tasks JSONL (instruction, instances); default $POTSTILL_DATA/{SEEDS_RELPATH}."
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


def synthesis_config_from_dict(
    data: dict | None, overrides: list[str] | None = None, base_dir: Path | None = None
) -> SynthesisConfig:
    """Validate a synthesis recipe (``key=value`` overrides applied); one-line errors."""
    from ..config import DATA_VAR, apply_overrides, format_validation_error

    data = apply_overrides(dict(data or {}), overrides or [])
    if isinstance(data.get("method"), dict) and "kind" not in data["method"]:
        data["method"] = {"kind": "self_instruct", **data["method"]}  # so error paths name no union tag
    try:
        cfg = SynthesisConfig.model_validate(data)
    except ValidationError as err:
        msg = format_validation_error(err, data, "synthesize")
        raise PotstillError(msg.replace(" found using _method_tag()", "")) from None
    if cfg.seeds_path is not None:
        if cfg.seeds_path.startswith(DATA_VAR):
            from ..data.rationale import data_root

            cfg.seeds_path = str(data_root() / cfg.seeds_path[len(DATA_VAR) :].lstrip("/"))
        elif base_dir is not None and not Path(cfg.seeds_path).is_absolute():
            cfg.seeds_path = str((base_dir / cfg.seeds_path).resolve())
    return cfg


def load_synthesis_config(path: str | Path, overrides: list[str] | None = None) -> SynthesisConfig:
    """Read a YAML synthesis recipe and apply ``key=value`` overrides."""

    from ..config import read_recipe_file

    p = Path(path)
    data = read_recipe_file(p, "teacher, method, ...")
    return synthesis_config_from_dict(data, overrides, base_dir=p.parent)


# ------------------------------------------------------------------------------ seeds


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        return _join(self.instruction, self.input)


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Self-Instruct seed tasks: JSONL rows ``{instruction, instances: [{input, output}], id?}``."""
    if path is None:
        from ..data.rationale import data_root

        path = data_root() / SEEDS_RELPATH
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"seed tasks file '{p}' does not exist; set seeds_path or POTSTILL_DATA")
    tasks = []
    with open(p, "rb") as f:
        raw_lines = f.read().splitlines()
    for n, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise PotstillError(
                f"seed tasks file '{p}' is not UTF-8 (line {n}, byte 0x{raw[err.start]:02x}); save it as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            inst = row["instances"][0] if row.get("instances") else {}
            tasks.append(
                SeedTask(
                    str(row.get("id", f"seed_{n}")),
                    row["instruction"].strip(),
                    str(inst.get("input", "")).strip(),
                    str(inst.get("output", "")).strip(),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PotstillError(
                f"{p}: line {n} is not a seed task (JSON with 'instruction' and 'instances'); fix or remove it"
            ) from None
    if not tasks:
        raise PotstillError(f"seed tasks file '{p}' has no tasks; give at least one")
    return tasks


# ------------------------------------------------------------------------------ generators


@dataclass(frozen=True)
class Completion:
    """A teacher completion; ``truncated`` when ``max_new_tokens`` stopped it before EOS."""

    text: str
    truncated: bool = False


class TextGenerator(Protocol):
    """``generate(prompts, tag=..., params=...)``: one completion (``str`` or :class:`Completion`) per user prompt.

    ``tag`` names the round and stage (``round-002-answer``), unique within a run.
    """

    def __call__(self, prompts: list[str], *, tag: str, params: GenerationParams) -> list[Completion | str]: ...


class TeacherGenerator:
    """Chat-templated teacher generation through :func:`~potstill.generation_cache.generate_cached`.

    Each call generates into ``cache_dir/<tag>-<sha of its prompt ids, 12 hex>``: a rerun
    with the same prompts resumes there, while prompts that changed (an earlier round came
    out differently, e.g. after a change of the filters) get a fresh directory instead of
    a refusal from the cache of the old ones. ``engine``: a :class:`~potstill.vllm_engine.VLLMEngine`
    serving ``model`` (``None``: the hf backend).
    """

    def __init__(
        self,
        model,
        tokenizer,
        cache_dir: str | Path,
        *,
        model_id: str,
        system_prompt: str | None = None,
        batch_size: int = 8,
        chunk_size: int = 64,
        progress: bool = True,
        engine=None,
    ):
        self.model, self.tokenizer, self.cache_dir = model, tokenizer, Path(cache_dir)
        self.model_id, self.system_prompt = model_id, system_prompt
        self.batch_size, self.chunk_size, self.progress = batch_size, chunk_size, progress
        self.engine = engine

    @property
    def identity(self) -> str:
        """What the generations depend on besides the prompts and params: weights, tokenizer, template, backend."""
        from ..models import tokenizer_fingerprint
        from ..signals.cache import weights_fingerprint

        template = getattr(self.tokenizer, "chat_template", None) or ""
        return json.dumps(
            [
                weights_fingerprint(self.model),
                tokenizer_fingerprint(self.tokenizer),
                hashlib.sha256(template.encode()).hexdigest(),
                self.system_prompt,
                self.chunk_size,
            ]
            + ([] if self.engine is None else [self.engine.identity])
        )

    def __call__(self, prompts: list[str], *, tag: str, params: GenerationParams) -> list[Completion]:
        from ..data.chat import encode_prompt
        from ..generation_cache import generate_cached, prompts_sha

        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        ids = [encode_prompt(self.tokenizer, system + [{"role": "user", "content": p}]) for p in prompts]
        path = self.cache_dir / f"{tag}-{prompts_sha(ids)[:12]}"
        gen = generate_cached(
            self.model,
            self.tokenizer,
            ids,
            path,
            params,
            model_id=self.model_id,
            chunk_size=self.chunk_size,
            batch_size=self.batch_size,
            progress=self.progress,
            engine=self.engine,
        )
        return [
            Completion(self.tokenizer.decode(t, skip_special_tokens=True).strip(), len(t) >= params.max_new_tokens)
            for t in gen.token_ids
        ]


def _call(generate: TextGenerator, prompts: list[str], tag: str, params: GenerationParams) -> list[Completion]:
    if not prompts:
        return []
    out = generate(prompts, tag=tag, params=params)
    if len(out) != len(prompts):
        raise PotstillError(f"the generator returned {len(out)} completions for {len(prompts)} prompts ({tag}); fix it")
    return [c if isinstance(c, Completion) else Completion(str(c)) for c in out]


def _stage_seed(seed: int, rnd: int, stage: str) -> int:
    return int(hashlib.sha256(f"potstill.synthesize:{seed}:{rnd}:{stage}".encode()).hexdigest()[:7], 16)


# ------------------------------------------------------------------------------ methods


def _min_words(cfg: SynthesisConfig) -> int:
    if cfg.filters.min_response_words is not None:
        return cfg.filters.min_response_words
    return 1 if cfg.method.kind == "self_instruct" else 5


def _answer(
    cfg: SynthesisConfig, generate: TextGenerator, survivors: list[Candidate], rnd: int, with_input: bool
) -> None:
    params = cfg.answer_generation.params(_stage_seed(cfg.seed, rnd, "answer"))
    prompts = [answer_prompt(c.instruction, with_input=with_input) for c in survivors]
    for c, comp in zip(survivors, _call(generate, prompts, f"round-{rnd:03d}-answer", params)):
        parsed = parse_answer(comp.text, with_input=with_input)
        c.answer_truncated = comp.truncated
        c.answer_parsed = parsed is not None
        c.input, c.output = parsed if parsed is not None else ("", comp.text.strip())


class _SelfInstruct:
    source = "self_instruct"

    def __init__(self, cfg: SynthesisConfig, seeds: list[SeedTask]):
        self.cfg, self.m = cfg, cfg.method
        if self.m.k_in_context > len(seeds):
            raise PotstillError(
                f"k_in_context={self.m.k_in_context} exceeds the {len(seeds)} seed tasks; lower method.k_in_context"
            )
        self.seed_instructions = [s.instruction for s in seeds]
        self.generated: list[dict] = []
        self.index = NoveltyIndex(self.seed_instructions)
        self.outputs = {_norm(s.output) for s in seeds if s.output}

    def done(self) -> bool:
        return len(self.generated) >= self.m.n_instructions

    def run_round(self, rnd: int, generate: TextGenerator) -> tuple[list[Candidate], list[Candidate], dict]:
        m, cfg = self.m, self.cfg
        rng = random.Random(f"potstill.synthesize.self_instruct:{cfg.seed}:{rnd}")
        pool = [r["instruction"] for r in self.generated]
        prompts = [
            self_instruct_prompt(
                sample_examples(self.seed_instructions, pool, m.k_in_context, m.machine_examples, rng), m.new_per_prompt
            )
            for _ in range(m.prompts_per_round)
        ]
        params = cfg.instruction_generation.params(_stage_seed(cfg.seed, rnd, "propose"))
        candidates, empty = [], 0
        for comp in _call(generate, prompts, f"round-{rnd:03d}-propose", params):
            items, last_open = _list_items(comp.text)
            empty += not items
            for j, text in enumerate(items):  # a cut completion may have cut its last item, if still open
                cut = comp.truncated and last_open and j == len(items) - 1
                candidates.append(Candidate(text, rnd, truncated=cut))
        dropped: list[Candidate] = []
        checks = [_truncated(cfg.filters), _quality(cfg.filters), _Novel(self.index, m.novelty_threshold)]
        survivors = list(keep_or_drop(candidates, checks, dropped))
        _answer(cfg, generate, survivors, rnd, m.generate_inputs)
        kept = list(keep_or_drop(survivors, _answer_checks(cfg.filters, _min_words(cfg), self.outputs), dropped))
        return candidates, kept, {"proposals": len(prompts), "responses_without_tasks": empty}

    def apply(self, rec: dict) -> None:
        for r in rec["kept"]:
            self.generated.append(r)
            self.index.add(r["instruction"])
            self.outputs.add(_norm(r["response"]))

    def record(self, c: Candidate, rnd: int, i: int) -> dict:
        return {
            "id": f"si-r{rnd:03d}-{i:04d}",
            "prompt": c.prompt,
            "response": c.output,
            "source": self.source,
            "round": rnd,
            "parent": None,
            "instruction": c.instruction,
            "input": c.input,
        }

    def final(self) -> tuple[list[dict], int]:
        n = self.m.n_instructions
        return self.generated[:n], max(0, len(self.generated) - n)


class _EvolInstruct:
    source = "evol_instruct"

    def __init__(self, cfg: SynthesisConfig, seeds: list[SeedTask]):
        self.cfg, self.m = cfg, cfg.method
        if self.m.pool_size > len(seeds):
            raise PotstillError(
                f"pool_size={self.m.pool_size} exceeds the {len(seeds)} seed tasks; lower method.pool_size"
            )
        if len({t.id for t in seeds}) != len(seeds):
            raise PotstillError("seed task ids are not unique; give every seed task its own 'id'")
        rng = random.Random(f"potstill.synthesize.evol_instruct:{cfg.seed}:pool")
        self.pool = [{"id": s.id, "prompt": s.prompt} for s in rng.sample(seeds, self.m.pool_size)]
        self.kept: list[dict] = []
        self.instructions = {_norm(s.prompt) for s in seeds}
        self.outputs = {_norm(s.output) for s in seeds if s.output}

    def done(self) -> bool:
        return False

    def run_round(self, rnd: int, generate: TextGenerator) -> tuple[list[Candidate], list[Candidate], dict]:
        cfg = self.cfg
        rng = random.Random(f"potstill.synthesize.evol_instruct:{cfg.seed}:{rnd}")
        ops = [rng.choice(self.m.operations) for _ in self.pool]
        prompts = [evol_prompt(p["prompt"], op) for p, op in zip(self.pool, ops)]
        params = cfg.instruction_generation.params(_stage_seed(cfg.seed, rnd, "evolve"))
        comps = _call(generate, prompts, f"round-{rnd:03d}-evolve", params)
        candidates = [
            Candidate(parse_evolution(c.text), rnd, parent=p["id"], operation=op, truncated=c.truncated)
            for p, op, c in zip(self.pool, ops, comps)
        ]
        parents = {p["id"]: p["prompt"] for p in self.pool}
        checks = [
            _truncated(cfg.filters),
            lambda c: check_evolution(parents[c.parent], c.instruction),
            _quality(cfg.filters),
            _Seen(self.instructions, "instruction", "duplicate_instruction"),
        ]
        dropped: list[Candidate] = []
        survivors = list(keep_or_drop(candidates, checks, dropped))
        _answer(cfg, generate, survivors, rnd, with_input=False)
        kept = list(keep_or_drop(survivors, _answer_checks(cfg.filters, _min_words(cfg), self.outputs), dropped))
        return candidates, kept, {"proposals": len(prompts)}

    def apply(self, rec: dict) -> None:
        child = {r["parent"]: r for r in rec["kept"]}
        # A failed evolution leaves its parent in the pool for the next round (WizardLM sec. 3.3).
        self.pool = [
            {"id": child[p["id"]]["id"], "prompt": child[p["id"]]["prompt"]} if p["id"] in child else p
            for p in self.pool
        ]
        for r in rec["kept"]:
            self.kept.append(r)
            self.instructions.add(_norm(r["prompt"]))
            self.outputs.add(_norm(r["response"]))

    def record(self, c: Candidate, rnd: int, i: int) -> dict:
        return {
            "id": f"ev-r{rnd:03d}-{i:04d}",
            "prompt": c.instruction,
            "response": c.output,
            "source": self.source,
            "round": rnd,
            "parent": c.parent,
            "operation": c.operation,
        }

    def final(self) -> tuple[list[dict], int]:
        return list(self.kept), 0


# ------------------------------------------------------------------------------ driver


def _as_config(cfg: SynthesisConfig | dict) -> SynthesisConfig:
    if isinstance(cfg, SynthesisConfig):
        return cfg
    if isinstance(cfg, dict):
        return synthesis_config_from_dict(cfg)
    raise PotstillError(f"the synthesis config must be a SynthesisConfig or a dict, not {type(cfg).__name__}")


def _run_key(cfg: SynthesisConfig, seeds: list[SeedTask], generator_id: str) -> str:
    # Budgets (n_instructions, rounds) are left out: raising one continues a finished run.
    method = cfg.method.model_dump(mode="json", exclude={"n_instructions", "rounds"})
    ident = {
        "format": ROUND_FORMAT,
        "version": VERSION,
        "method": method,
        "seed": cfg.seed,
        "filters": cfg.filters.model_dump(mode="json"),
        "generator": generator_id,
        "instruction_generation": cfg.instruction_generation.model_dump(mode="json"),
        "answer_generation": cfg.answer_generation.model_dump(mode="json"),
        "seeds": [[s.id, s.instruction, s.input, s.output] for s in seeds],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _content_sha(rec: dict) -> str:
    """sha256 of a round record without its timing: what the next round's ``prev`` names."""
    body = {k: v for k, v in rec.items() if k != "seconds"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _read_round(path: Path, key: str, rnd: int, prev: str | None) -> dict | None:
    """A finished round's record if it is whole, of this run, and follows the round ``prev`` names."""
    try:
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(rec, dict)
        or (rec.get("format"), rec.get("key"), rec.get("round"), rec.get("prev")) != (ROUND_FORMAT, key, rnd, prev)
        or not isinstance(rec.get("kept"), list)
    ):
        return None
    return rec


def synthesize(
    cfg: SynthesisConfig | dict,
    generate: TextGenerator,
    output_dir: str | Path,
    *,
    generator_id: str,
    seeds: list[SeedTask] | None = None,
    teacher: str | None = None,
) -> dict:
    """Run the configured method with ``generate`` as the teacher; returns the report (also written).

    ``generator_id`` identifies the teacher (weights, tokenizer, template): round files of
    another teacher or configuration are refused, not reused.
    """
    t0 = time.perf_counter()
    cfg = _as_config(cfg)
    seeds = load_seed_tasks(cfg.seeds_path) if seeds is None else seeds
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PotstillError(f"output_dir '{out}' is a file; give a directory path")
    key = _run_key(cfg, seeds, generator_id)
    method = _SelfInstruct(cfg, seeds) if cfg.method.kind == "self_instruct" else _EvolInstruct(cfg, seeds)
    meta_path = out / "synthesis_key.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != key:
            raise PotstillError(
                f"'{out}' holds a synthesis with another teacher, seed tasks or settings; "
                "use another output_dir or delete it"
            )
    else:
        atomic_write_json(meta_path, {"key": key, "method": cfg.method.kind})
    prev, per_round = None, []
    for rnd in range(1, cfg.method.rounds + 1):
        if method.done():
            break
        path = out / "rounds" / f"round-{rnd:03d}.json"
        rec = _read_round(path, key, rnd, prev)
        resumed = rec is not None
        if rec is None:
            r0 = time.perf_counter()
            candidates, kept, extra = method.run_round(rnd, generate)
            dropped = [c for c in candidates if c.reason]
            rec = {
                "format": ROUND_FORMAT,
                "version": VERSION,
                "key": key,
                "round": rnd,
                "prev": prev,
                "candidates": len(candidates),
                "kept_count": len(kept),
                "dropped_counts": dict(sorted(Counter(c.reason for c in dropped).items())),
                **extra,
                "seconds": round(time.perf_counter() - r0, 3),
                "kept": [method.record(c, rnd, i) for i, c in enumerate(kept)],
                "dropped": [
                    {
                        "reason": c.reason,
                        "detail": c.detail,
                        "instruction": c.instruction,
                        "parent": c.parent,
                        "output": c.output,
                    }
                    for c in dropped
                ],
            }
            assert rec["candidates"] == rec["kept_count"] + len(dropped), "a candidate was neither kept nor dropped"
            atomic_write_json(path, rec, indent=1)
        prev = _content_sha(rec)
        method.apply(rec)
        per_round.append(
            {
                "round": rnd,
                "resumed": resumed,
                "candidates": rec["candidates"],
                "kept": rec["kept_count"],
                "dropped": rec["dropped_counts"],
                "seconds": rec["seconds"],
            }
        )

    records, over = method.final()
    dropped_total: Counter = Counter()
    for r in per_round:
        dropped_total.update(r["dropped"])
    if over:
        dropped_total["over_budget"] = over
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out / "synthetic.jsonl", lines)
    candidates = sum(r["candidates"] for r in per_round)
    report = {
        "method": cfg.method.kind,
        "teacher": teacher,
        "output": str(out / "synthetic.jsonl"),
        "candidates": candidates,
        "kept": len(records),
        "dropped": dict(sorted(dropped_total.items())),
        "rounds": len(per_round),
        "rounds_resumed": sum(r["resumed"] for r in per_round),
        "per_round": per_round,
        "round_seconds": round(sum(r["seconds"] for r in per_round), 3),
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    if candidates != len(records) + sum(dropped_total.values()):
        raise AssertionError("synthesis counts do not add up")  # an internal bug, never a user error
    atomic_write_json(out / "synthesis_report.json", report)
    return report


def run_synthesis(
    cfg: SynthesisConfig | dict,
    output_dir: str | Path | None = None,
    *,
    model=None,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """Load the teacher (unless given), synthesize into ``output_dir`` (default ``cfg.output_dir``), report.

    Writes ``synthesis.resolved.yaml``, ``rounds/``, ``generations/``, ``synthetic.jsonl`` and
    ``synthesis_report.json``; rerunning resumes a killed run.
    """
    import yaml

    cfg = _as_config(cfg)
    out = Path(output_dir if output_dir is not None else cfg.output_dir)
    seeds = load_seed_tasks(cfg.seeds_path)
    if (model is None) != (tokenizer is None):
        raise PotstillError("pass both model and tokenizer, or neither (the teacher is then loaded from cfg.teacher)")
    vllm = cfg.generation.backend == "vllm"
    if vllm:
        from ..vllm_engine import VLLMEngine, require_vllm

        require_vllm(cfg.generation.vllm.mode, cfg.device or "cuda")  # before loading the teacher
    if model is None:
        import torch

        from ..models import load_model

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # With vllm the HF copy only fingerprints the weights (and is saved for the engine): kept off the GPU.
        model, tokenizer = load_model(cfg.teacher, dtype=cfg.dtype, device="cpu" if vllm else device)
    engine = (
        VLLMEngine.from_options(
            model, tokenizer, cfg.generation.vllm, device=cfg.device or "cuda", seed=cfg.seed, workdir=out
        )
        if vllm
        else None
    )
    gen = TeacherGenerator(
        model,
        tokenizer,
        out / "generations",
        model_id=cfg.teacher,
        system_prompt=cfg.system_prompt,
        batch_size=cfg.batch_size,
        chunk_size=cfg.chunk_size,
        progress=progress,
        engine=engine,
    )
    atomic_write_text(out / "synthesis.resolved.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    try:
        return synthesize(cfg, gen, out, generator_id=gen.identity, seeds=seeds, teacher=cfg.teacher)
    finally:
        if engine is not None:
            engine.close()
