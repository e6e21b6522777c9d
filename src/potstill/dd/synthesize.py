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
:mod:`potstill.dd.synth_text` and are re-exported here. The seed tasks
(:mod:`potstill.dd.synth_seeds`) and the teacher generator (:mod:`potstill.dd.synth_teacher`)
are re-exported too. This module holds the two methods and the round driver; the recipe
schema (:class:`~potstill.recipes.synthesize.SynthesisConfig`) lives in
:mod:`potstill.recipes.synthesize` and the runner that loads the teacher
(:func:`~potstill.runners.synthesize.run_synthesis`) in :mod:`potstill.runners.synthesize`.

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
from pathlib import Path

from ..errors import PotstillError
from ..io import atomic_write_json, atomic_write_text
from .synth_seeds import SeedTask, load_seed_tasks
from .synth_teacher import (
    Completion,
    TeacherGenerator,
    TextGenerator,
    call_generator,
    generation_params,
    stage_seed,
)
from .synth_text import (  # the pure text parts; the public ones are re-exported (see __all__)
    EVOL_OPERATIONS,
    TEMPLATE_MARKERS,
    Candidate,
    Check,
    Novel,
    NoveltyIndex,
    Seen,
    answer_checks,
    answer_prompt,
    check_answer,
    check_evolution,
    check_instruction,
    copies_prompt,
    evol_prompt,
    keep_or_drop,
    list_items,
    norm,
    parse_answer,
    parse_evolution,
    parse_instructions,
    quality,
    repetitive,
    rouge_l_f,
    sample_examples,
    self_instruct_prompt,
    truncated,
)

__all__ = [
    "EVOL_OPERATIONS",
    "TEMPLATE_MARKERS",
    "Candidate",
    "Check",
    "Completion",
    "NoveltyIndex",
    "SeedTask",
    "TeacherGenerator",
    "TextGenerator",
    "answer_prompt",
    "check_answer",
    "check_evolution",
    "check_instruction",
    "copies_prompt",
    "evol_prompt",
    "keep_or_drop",
    "load_seed_tasks",
    "parse_answer",
    "parse_evolution",
    "parse_instructions",
    "repetitive",
    "rouge_l_f",
    "sample_examples",
    "self_instruct_prompt",
    "synthesize",
]

ROUND_FORMAT = "potstill-synthesis-round"
VERSION = 1  # part of the run key: bump it when prompts or keep/drop rules change, so old rounds are not reused


# ------------------------------------------------------------------------------ methods


def _min_words(cfg) -> int:
    if cfg.filters.min_response_words is not None:
        return cfg.filters.min_response_words
    return 1 if cfg.method.kind == "self_instruct" else 5


def _answer(cfg, generate: TextGenerator, survivors: list[Candidate], rnd: int, with_input: bool) -> None:
    params = generation_params(cfg.answer_generation, stage_seed(cfg.seed, rnd, "answer"))
    prompts = [answer_prompt(c.instruction, with_input=with_input) for c in survivors]
    for c, comp in zip(survivors, call_generator(generate, prompts, f"round-{rnd:03d}-answer", params)):
        parsed = parse_answer(comp.text, with_input=with_input)
        c.answer_truncated = comp.truncated
        c.answer_parsed = parsed is not None
        c.input, c.output = parsed if parsed is not None else ("", comp.text.strip())


class _SelfInstruct:
    source = "self_instruct"

    def __init__(self, cfg, seeds: list[SeedTask]):
        self.cfg, self.m = cfg, cfg.method
        if self.m.k_in_context > len(seeds):
            raise PotstillError(
                f"k_in_context={self.m.k_in_context} exceeds the {len(seeds)} seed tasks; lower method.k_in_context"
            )
        self.seed_instructions = [s.instruction for s in seeds]
        self.generated: list[dict] = []
        self.index = NoveltyIndex(self.seed_instructions)
        self.outputs = {norm(s.output) for s in seeds if s.output}

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
        params = generation_params(cfg.instruction_generation, stage_seed(cfg.seed, rnd, "propose"))
        candidates, empty = [], 0
        for comp in call_generator(generate, prompts, f"round-{rnd:03d}-propose", params):
            items, last_open = list_items(comp.text)
            empty += not items
            for j, text in enumerate(items):  # a cut completion may have cut its last item, if still open
                cut = comp.truncated and last_open and j == len(items) - 1
                candidates.append(Candidate(text, rnd, truncated=cut))
        dropped: list[Candidate] = []
        checks = [truncated(cfg.filters), quality(cfg.filters), Novel(self.index, m.novelty_threshold)]
        survivors = list(keep_or_drop(candidates, checks, dropped))
        _answer(cfg, generate, survivors, rnd, m.generate_inputs)
        kept = list(keep_or_drop(survivors, answer_checks(cfg.filters, _min_words(cfg), self.outputs), dropped))
        return candidates, kept, {"proposals": len(prompts), "responses_without_tasks": empty}

    def apply(self, rec: dict) -> None:
        for r in rec["kept"]:
            self.generated.append(r)
            self.index.add(r["instruction"])
            self.outputs.add(norm(r["response"]))

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

    def __init__(self, cfg, seeds: list[SeedTask]):
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
        self.instructions = {norm(s.prompt) for s in seeds}
        self.outputs = {norm(s.output) for s in seeds if s.output}

    def done(self) -> bool:
        return False

    def run_round(self, rnd: int, generate: TextGenerator) -> tuple[list[Candidate], list[Candidate], dict]:
        cfg = self.cfg
        rng = random.Random(f"potstill.synthesize.evol_instruct:{cfg.seed}:{rnd}")
        ops = [rng.choice(self.m.operations) for _ in self.pool]
        prompts = [evol_prompt(p["prompt"], op) for p, op in zip(self.pool, ops)]
        params = generation_params(cfg.instruction_generation, stage_seed(cfg.seed, rnd, "evolve"))
        comps = call_generator(generate, prompts, f"round-{rnd:03d}-evolve", params)
        candidates = [
            Candidate(parse_evolution(c.text), rnd, parent=p["id"], operation=op, truncated=c.truncated)
            for p, op, c in zip(self.pool, ops, comps)
        ]
        parents = {p["id"]: p["prompt"] for p in self.pool}
        checks = [
            truncated(cfg.filters),
            lambda c: check_evolution(parents[c.parent], c.instruction),
            quality(cfg.filters),
            Seen(self.instructions, "instruction", "duplicate_instruction"),
        ]
        dropped: list[Candidate] = []
        survivors = list(keep_or_drop(candidates, checks, dropped))
        _answer(cfg, generate, survivors, rnd, with_input=False)
        kept = list(keep_or_drop(survivors, answer_checks(cfg.filters, _min_words(cfg), self.outputs), dropped))
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
            self.instructions.add(norm(r["prompt"]))
            self.outputs.add(norm(r["response"]))

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


def _check_config(cfg) -> None:
    if isinstance(cfg, dict):
        raise PotstillError(
            "synthesize takes a validated SynthesisConfig, not a dict; build one with "
            "potstill.runners.synthesize.synthesis_config_from_dict"
        )
    if not all(hasattr(cfg, k) for k in ("method", "filters", "seed", "instruction_generation", "answer_generation")):
        raise PotstillError(f"the synthesis config must be a SynthesisConfig, not {type(cfg).__name__}")


def _run_key(cfg, seeds: list[SeedTask], generator_id: str) -> str:
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


def _claim_output_dir(out: Path, key: str, method_kind: str) -> None:
    """Record the run key in ``out/synthesis_key.json``, or refuse a directory that holds another run."""
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
        atomic_write_json(meta_path, {"key": key, "method": method_kind})


def _new_round(method, rnd: int, generate: TextGenerator, key: str, prev: str | None) -> dict:
    """Generate round ``rnd`` and return its record (kept records, dropped candidates with reasons, counts)."""
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
    return rec


def _run_rounds(method, rounds: int, generate: TextGenerator, out: Path, key: str) -> list[dict]:
    """Load finished rounds, generate the missing ones (each written atomically); per-round summaries."""
    prev, per_round = None, []
    for rnd in range(1, rounds + 1):
        if method.done():
            break
        path = out / "rounds" / f"round-{rnd:03d}.json"
        rec = _read_round(path, key, rnd, prev)
        resumed = rec is not None
        if rec is None:
            rec = _new_round(method, rnd, generate, key, prev)
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
    return per_round


def synthesize(
    cfg,
    generate: TextGenerator,
    output_dir: str | Path,
    *,
    generator_id: str,
    seeds: list[SeedTask] | None = None,
    teacher: str | None = None,
) -> dict:
    """Run the configured method with ``generate`` as the teacher; returns the report (also written).

    ``cfg`` is a validated :class:`potstill.recipes.synthesize.SynthesisConfig` (a dict is
    validated by :func:`potstill.runners.synthesize.synthesis_config_from_dict` first).
    ``generator_id`` identifies the teacher (weights, tokenizer, template): round files of
    another teacher or configuration are refused, not reused.
    """
    t0 = time.perf_counter()
    _check_config(cfg)
    seeds = load_seed_tasks(cfg.seeds_path) if seeds is None else seeds
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PotstillError(f"output_dir '{out}' is a file; give a directory path")
    key = _run_key(cfg, seeds, generator_id)
    method = _SelfInstruct(cfg, seeds) if cfg.method.kind == "self_instruct" else _EvolInstruct(cfg, seeds)
    _claim_output_dir(out, key, cfg.method.kind)
    per_round = _run_rounds(method, cfg.method.rounds, generate, out, key)

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
