"""Recipe -> models + data + teacher signal: what every distill run starts from (:class:`Prepared`).

Everything that can be checked is checked before the output directory is created, so a bad recipe or bad
input leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from potstill.errors import PotstillError, VocabMismatchError
from potstill.recipes.distill import Recipe
from potstill.recipes.models import (
    ArithmeticData,
    DemoData,
    FileData,
    FromTeacherStudent,
    Gsm8kData,
    HubData,
    PretrainedStudent,
    PubmedqaData,
    ScaledStudent,
)

log = logging.getLogger("potstill")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # One GPU per process under accelerate/torchrun (LOCAL_RANK), else the first.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PotstillError(f"device '{name}' is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PotstillError(f"device '{name}' asked for but CUDA is not available; set device: cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PotstillError(f"device '{name}' asked for but Apple's MPS is not available here; set device: cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PotstillError(
            f"device '{name}' cannot train a model (potstill runs on cpu, cuda and mps); set device: cpu or cuda"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PotstillError(
            f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s)); use cuda:0 .. cuda:N-1"
        )
    return dev


def load_pairs(recipe: Recipe, teacher, tokenizer, teacher_id: str) -> list[dict]:
    src = recipe.data.source
    if isinstance(src, DemoData):
        from potstill.data.demo import demo_prompts, teacher_responses

        return teacher_responses(
            teacher,
            tokenizer,
            teacher_id,
            demo_prompts(src.num_prompts),
            max_new_tokens=src.max_new_tokens,
            system_prompt=recipe.data.system_prompt,
            generation=recipe.generation,
        )
    from potstill.data import load_records, records_to_pairs

    if isinstance(src, FileData):
        rows = load_records(src.path)
        where = src.path
    else:
        assert isinstance(src, HubData)
        rows = load_records(hub_name=src.name, config_name=src.config_name, split=src.split)
        where = src.name
    return records_to_pairs(
        rows,
        prompt_field=src.prompt_field,
        response_field=src.response_field,
        messages_field=src.messages_field,
        system_prompt=recipe.data.system_prompt,
        where=where,
    )


def rationale_split(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """Train and held-out pairs of a rationale source, split by problem (never by pair).

    Training pairs follow the source's ``mode`` (multitask gives two per problem) on the
    first ``fraction`` of a seeded order of the training problems (nested subsets); held-out
    pairs are the inference prompt with the mode's gold target and the gold ``answer``.
    """
    from potstill.data import rationale as R

    src = recipe.data.source
    if isinstance(src, ArithmeticData):
        problems = R.arithmetic_problems(src.num_problems, seed=src.seed, level=src.level)
    else:
        assert isinstance(src, Gsm8kData)
        train = R.load_gsm8k(src.path or str(R.data_root() / "gsm8k" / "train.jsonl"), limit=src.limit)
        held = R.load_gsm8k(src.eval_path or str(R.data_root() / "gsm8k" / "test.jsonl"), limit=recipe.data.eval_size)
        problems = None
    if problems is not None:
        train, held = train_eval_split(problems, recipe)
    train = R.subset(train, src.fraction, seed=recipe.data.seed)
    train_pairs = R.rationale_pairs(train, src.mode)
    cot = src.mode == "cot"
    eval_pairs = [
        {
            "messages": [{"role": "user", "content": R.inference_prompt(p, src.mode)}],
            "response": f"{p.rationale} The answer is {p.answer}." if cot else p.answer,
            "answer": p.answer,
        }
        for p in held
    ]
    return train_pairs, eval_pairs


def pubmedqa_split(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """PubMedQA's 500 training questions and the first ``data.eval_size`` of its 500 test ids (the official split,
    not a seeded one), each held-out pair with its decision as ``answer`` and the three ``choices``."""
    from potstill.data.pubmedqa import load_pubmedqa
    from potstill.paths import data_root

    src = recipe.data.source
    assert isinstance(src, PubmedqaData)
    train, test = load_pubmedqa(src.path or data_root() / "pubmedqa", context_words=src.context_words)
    if src.limit is not None:
        train = train[: src.limit]
    return train, test[: recipe.data.eval_size]


def split_pairs(recipe: Recipe, teacher, tokenizer, teacher_id: str) -> tuple[list[dict], list[dict]]:
    """The recipe's training and held-out pairs (rationale sources split by problem)."""
    if isinstance(recipe.data.source, (ArithmeticData, Gsm8kData)):
        return rationale_split(recipe)
    if isinstance(recipe.data.source, PubmedqaData):
        return pubmedqa_split(recipe)
    return train_eval_split(load_pairs(recipe, teacher, tokenizer, teacher_id), recipe)


def encode_pairs(pairs: list[dict], tokenizer, max_length: int, kept: list[int] | None = None) -> list[dict]:
    """Encoded examples; ``example_id`` is the position in the list (a teacher-signal cache's key).

    Pairs whose prompt alone fills ``max_length`` leave no response token to learn from: they
    are dropped with a logged count (all of them dropped is an error). ``kept`` (if given) receives
    the position in ``pairs`` of every example returned.
    """
    from potstill.data import encode_example, encode_prompt

    out = []
    too_long = 0
    for j, p in enumerate(pairs):
        if len(encode_prompt(tokenizer, p["messages"])) >= max_length:
            too_long += 1
            continue
        if kept is not None:
            kept.append(j)
        i = len(out)
        ex = encode_example(tokenizer, p["messages"], p["response"], max_length)
        ex["reference"] = p["response"]
        ex["example_id"] = i
        for key in ("answer", "choices"):
            if key in p:
                ex[key] = p[key]
        out.append(ex)
    if too_long:
        if not out:
            raise PotstillError(
                f"every prompt ({too_long}) is at least data.max_length={max_length} tokens; raise data.max_length"
            )
        log.warning(
            "dropped %d of %d examples whose prompt alone fills data.max_length=%d (no response token "
            "left); raise max_length to keep them",
            too_long,
            len(pairs),
            max_length,
        )
    return out


def load_teacher(cfg, device: torch.device):
    """``(model, tokenizer)`` of a teacher entry (``teacher`` or one of ``extra_teachers``) on ``device``, with its
    loading options: dtype, attention kernel, quantization (checked first: CUDA and bitsandbytes)."""
    from potstill.models import check_quantization, load_model

    bits = cfg.quantization.bits if cfg.quantization is not None else None
    if cfg.device is not None:  # a device of its own
        device = resolve_device(cfg.device)
    check_quantization(bits, device)
    return load_model(
        cfg.model,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        device=device,
        attn_implementation=cfg.attn_implementation,
        quantization_bits=bits,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        offload_folder=cfg.offload_folder,
    )


def build_student(recipe: Recipe, teacher, teacher_tok):
    """``(student, aligned vocab or None, the student's own tokenizer or None)``; the tokenizer is
    returned only when it differs from the teacher's and every KD run chose a cross-tokenizer method."""
    from potstill.models import (
        align_vocab,
        load_model,
        output_head,
        set_attention,
        student_from_teacher,
        student_scaled,
    )

    cfg = recipe.student
    torch.manual_seed(recipe.train.seed)
    if isinstance(cfg, FromTeacherStudent):
        student = student_from_teacher(teacher, cfg.layers)
        set_attention(student, cfg.attn_implementation, "student")
        return student, None, None
    if isinstance(cfg, ScaledStudent):
        student = student_scaled(
            teacher,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            seed=recipe.train.seed,
        )
        set_attention(student, cfg.attn_implementation, "student")
        return student, None, None
    assert isinstance(cfg, PretrainedStudent)
    student, student_tok = load_model(
        cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation
    )
    if cfg.layers is not None:
        student = student_from_teacher(student, cfg.layers)
    try:
        vocab = align_vocab(
            teacher_tok, student_tok, output_head(teacher).weight.shape[0], output_head(student).weight.shape[0]
        )
    except VocabMismatchError as err:
        token_level = [r.name for r in recipe.runs if r.uses_teacher and r.cross_tokenizer is None]
        if token_level:
            raise VocabMismatchError(
                f"{err} (runs {token_level}: set the run's method, e.g. {{{{kind: cross_tokenizer, align: vocab_map}}}}, or alpha 1)"
            ) from None
        return student, None, student_tok
    return student, vocab, None


def check_precision(precision: str, device: torch.device, student=None) -> None:
    """Refuse, in one line, mixed precision ``train.precision`` that ``device`` cannot do or that has no float32
    master weights to keep (a fully trained ``student`` loaded in 16 bits; pass None under LoRA, whose adapters
    peft keeps in float32); ``fp32`` always passes.

    fp16 on cpu is refused because accelerate does not refuse it: it turns off autocast and the loss scaler
    there and silently trains in float32.
    """
    if precision == "fp32":
        return
    if precision == "fp16" and device.type == "cpu":
        raise PotstillError(
            "train.precision fp16 needs a GPU (on cpu the Trainer silently trains in float32 without "
            "its loss scaler); set train.precision bf16 or fp32 on cpu"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise PotstillError(
            f"train.precision bf16: {torch.cuda.get_device_name(device)} has no native bfloat16 "
            "(Ampere or newer has); set train.precision fp16 or fp32"
        )
    if student is not None:
        dtypes = {p.dtype for p in student.parameters() if p.requires_grad}
        if dtypes - {torch.float32}:
            low = sorted(str(d).removeprefix("torch.") for d in dtypes - {torch.float32})
            raise PotstillError(
                f"train.precision {precision} is autocast over float32 master weights, but the student "
                f"has {', '.join(low)} weights; set student.dtype float32 (or train.precision fp32)"
            )


@dataclass
class ExtraTeacher:
    """One of ``extra_teachers``: its model, and its tokenizer when that differs from the student's."""

    model: Any
    tokenizer: Any = None


class Prepared:
    """Teacher, tokenizer, initial student and encoded data of a recipe (all input checked)."""

    def __init__(self, recipe: Recipe):
        from potstill.models import output_head

        self.recipe = recipe
        self.device = resolve_device(recipe.device)
        check_precision(recipe.train.precision, self.device)
        if recipe.generation.backend == "vllm":  # before any model is loaded: vllm and CUDA are there
            from potstill.vllm_engine import require_vllm

            require_vllm(
                recipe.generation.vllm.mode, self.device, sync=any(r.on_policy is not None for r in recipe.runs)
            )
        if recipe.teacher.kind == "self":
            self._self_teacher(recipe)
            check_precision(recipe.train.precision, self.device, None if recipe.train.lora else self.student0)
            return
        if recipe.teacher.model is None:
            self._black_box(recipe)
            check_precision(recipe.train.precision, self.device, None if recipe.train.lora else self.student0)
            return
        try:
            self.teacher, self.tokenizer = load_teacher(recipe.teacher, self.device)
        except PotstillError as err:
            raise PotstillError(f"teacher: {err}") from None
        teacher_id = str(getattr(self.teacher, "name_or_path", recipe.teacher.model))
        self.student0, vocab_size, student_tok = build_student(recipe, self.teacher, self.tokenizer)
        self.student0.to(self.device)
        check_precision(recipe.train.precision, self.device, None if recipe.train.lora else self.student0)
        self.teacher_tokenizer = self.tokenizer
        self.cross = student_tok is not None
        if self.cross:
            if recipe.data.source.kind == "demo":
                raise PotstillError(
                    "the demo data is answered by the teacher in its own tokens; a cross-tokenizer "
                    "recipe needs data with responses (data.source kind file, hub, arithmetic, gsm8k)"
                )
            self.tokenizer = student_tok
        train_pairs, eval_pairs = split_pairs(recipe, self.teacher, self.tokenizer, teacher_id)
        self._train_pairs, self._train_kept = train_pairs, []
        self.train_examples = encode_pairs(train_pairs, self.tokenizer, recipe.data.max_length, self._train_kept)
        self.eval_examples = encode_pairs(eval_pairs, self.tokenizer, recipe.data.max_length)
        self._apply_selection()
        if vocab_size is None and not self.cross:
            vs, vt = output_head(self.student0).weight.shape[0], output_head(self.teacher).weight.shape[0]
            vocab_size = None if vs == vt else min(vs, vt)
        self.vocab_size = vocab_size
        probe = self.train_examples[0]
        if self.cross:  # the teacher reads its own tokens
            probe = {
                "input_ids": self.teacher_tokenizer(probe["reference"] or "Hello", add_special_tokens=True)[
                    "input_ids"
                ][:64]
            }
        check_teacher_finite(self.teacher, probe, self.device)

    def vocab_map(self):
        """The teacher-to-student vocabulary map of a cross-tokenizer recipe, built once."""
        if getattr(self, "_vmap", None) is None:
            from potstill.kd.cross_tokenizer import build_vocab_map
            from potstill.models import output_head

            self._vmap = build_vocab_map(
                self.teacher_tokenizer, self.tokenizer, student_vocab=output_head(self.student0).weight.shape[0]
            )
        return self._vmap

    def _black_box(self, recipe: Recipe) -> None:
        """Sequence-level KD from a teacher known only by its responses: no teacher weights at all."""
        self._student_only(recipe)

    def _self_teacher(self, recipe: Recipe) -> None:
        """The student's own earlier self as its teacher (``teacher.kind self``): only the pretrained student is
        loaded (cut to ``layers``); each run copies it into its frozen or EMA teacher
        (:func:`potstill.kd.self_distill.self_teacher`). ``teacher`` stays None: there is no model to compare
        the students with at evaluation."""
        cfg = recipe.student
        if not isinstance(cfg, PretrainedStudent):  # the recipe refuses it; a recipe built without validation too
            raise PotstillError(
                f"teacher.kind self needs student.kind pretrained (not {cfg.kind}); name the student's model"
            )
        if isinstance(recipe.data.source, DemoData):
            raise PotstillError(
                "the demo data is answered by a teacher model and teacher.kind self has none; use data.source "
                "kind file, hub, arithmetic or gsm8k"
            )
        self._student_only(recipe)

    def _student_only(self, recipe: Recipe) -> None:
        """No teacher model: the pretrained student (cut to ``student.layers``), its tokenizer and the data."""
        from potstill.models import load_model, student_from_teacher

        cfg = recipe.student
        self.teacher = None
        try:
            self.student0, self.tokenizer = load_model(
                cfg.model,
                dtype=cfg.dtype,
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
            )
        except PotstillError as err:
            raise PotstillError(f"student: {err}") from None
        if getattr(cfg, "layers", None) is not None:
            self.student0 = student_from_teacher(self.student0, cfg.layers)
        self.student0.to(self.device)
        train_pairs, eval_pairs = split_pairs(recipe, None, self.tokenizer, "")
        self.train_examples = encode_pairs(train_pairs, self.tokenizer, recipe.data.max_length)
        self.eval_examples = encode_pairs(eval_pairs, self.tokenizer, recipe.data.max_length)
        self._apply_selection()
        self.vocab_size = None

    def _apply_selection(self) -> None:
        """``pool_examples``: the whole train split (what a cache holds); ``train_examples``: the
        subset a ``data.selection`` file keeps (with their original ``example_id``), else the pool."""
        self.pool_examples = self.train_examples
        if self.recipe.data.selection is not None:
            from potstill.dd.selection_io import load_selection

            self.train_examples = load_selection(self.recipe.data.selection, self.pool_examples)

    def cross_context(self) -> dict:
        """What cross-tokenizer runs need (empty when the student shares the teacher's tokenizer); with a
        cache, also the training examples in the teacher's tokens and the student-to-teacher example ids."""
        if not getattr(self, "cross", False):
            return {}
        ctx: dict[str, Any] = {"teacher_tokenizer": self.teacher_tokenizer}
        if any(r.cross_tokenizer is not None and r.cross_tokenizer.align == "vocab_map" for r in self.recipe.runs):
            ctx["vocab_map"] = self.vocab_map()
        own = any(r.cross_tokenizer is not None and r.cross_tokenizer.teacher_view == "own" for r in self.recipe.runs)
        if self.recipe.cache is not None or own:
            ctx["teacher_examples"] = self.teacher_pool_examples()
            ctx["example_map"] = self.teacher_example_map()
        return ctx

    def teacher_pool_examples(self) -> list[dict]:
        """The training pairs encoded by the teacher's own tokenizer and chat template: what the cache of a
        cross-tokenizer recipe holds (the teacher's signal in its own tokens, for any student family).
        Equal to ``pool_examples`` when the student shares the teacher's tokenizer."""
        if not getattr(self, "cross", False):
            return self.pool_examples
        if getattr(self, "_teacher_pool", None) is None:
            self._teacher_kept: list[int] = []
            self._teacher_pool = encode_pairs(
                self._train_pairs, self.teacher_tokenizer, self.recipe.data.max_length, self._teacher_kept
            )
        return self._teacher_pool

    def teacher_example_map(self) -> dict[int, int]:
        """Student example id -> the same pair's example id among :meth:`teacher_pool_examples` (a pair whose
        prompt fits one tokenizer's ``max_length`` but not the other's is in one list only)."""
        self.teacher_pool_examples()
        teacher_id = {pair: i for i, pair in enumerate(self._teacher_kept)}
        return {i: teacher_id[pair] for i, pair in enumerate(self._train_kept) if pair in teacher_id}

    def extra_teachers(self) -> list[ExtraTeacher]:
        """The recipe's ``extra_teachers``, loaded once, when a run combines teachers. One with another
        tokenizer than the student's keeps its tokenizer (``ExtraTeacher.tokenizer``): it joins through
        the cross-tokenizer projection (:class:`potstill.signals.cross.CrossTokenizerTeacher`)."""
        if not any(r.multi_teacher is not None for r in self.recipe.runs):
            return []
        if getattr(self, "_extra", None) is None:
            from potstill.fingerprints import tokenizer_fingerprint

            self._extra = []
            want = tokenizer_fingerprint(self.tokenizer)
            for i, cfg in enumerate(self.recipe.extra_teachers):
                try:
                    model, tok = load_teacher(cfg, self.device)
                except PotstillError as err:
                    raise PotstillError(f"extra_teachers[{i}]: {err}") from None
                same = tokenizer_fingerprint(tok) == want
                if not same:
                    log.info(
                        "extra_teachers[%d] (%s) has another tokenizer than the student: it joins on aligned "
                        "rows through the vocabulary map",
                        i,
                        cfg.model,
                    )
                self._extra.append(ExtraTeacher(model, None if same else tok))
        return self._extra

    def cached_source(self):
        """The recipe's teacher-signal cache, checked against this tokenizer and teacher (None: no cache)."""
        if self.recipe.cache is None:
            return None
        from potstill.fingerprints import weights_fingerprint
        from potstill.signals.cache import CachedSignal

        spec = cache_spec(self.recipe)
        source = CachedSignal(
            self.recipe.cache_dir,
            tokenizer=self.teacher_tokenizer if getattr(self, "cross", False) else self.tokenizer,  # its own tokens
            tail=spec.tail,
            teacher_fingerprint=weights_fingerprint(self.teacher),
            verify=self.recipe.cache.verify,
            allow_mixed=self.recipe.cache.allow_mixed,
        )
        source.check_spec(spec)
        source.check_data(self.teacher_pool_examples())
        return source


def cache_spec(recipe: Recipe):
    from potstill.signals.cache import CacheSpec

    c = recipe.cache
    sig = c.signal
    return CacheSpec(
        kind=sig.kind,
        k=getattr(sig, "k", 32),
        draws=getattr(sig, "draws", 12),
        proposal_temperature=getattr(sig, "proposal_temperature", 1.0),
        tail=getattr(sig, "tail", "bucket"),
        dtype=c.dtype,
        temperature=c.temperature or 1.0,
        seed=c.seed,
        examples_per_shard=c.examples_per_shard,
        batch_size=c.batch_size,
        chunk_size=recipe.train.chunk_size,
    )


@torch.no_grad()
def check_teacher_finite(teacher, example: dict, device: torch.device) -> None:
    """Preflight: one teacher forward on a real example, so NaN weights fail before anything is written."""
    from potstill.models.placement import input_device

    ids = torch.tensor([example["input_ids"]], device=input_device(teacher))  # its own device, when placed
    logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if not torch.isfinite(logits).all():
        raise PotstillError(
            "teacher logits contain NaN/inf on the first training example; check the teacher weights or load it "
            "with teacher.dtype: float32"
        )


def train_eval_split(pairs: list[dict], recipe: Recipe) -> tuple[list[dict], list[dict]]:
    from potstill.data import train_eval_split as split

    return split(pairs, recipe.data.eval_size, recipe.data.seed)
