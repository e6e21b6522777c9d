"""Recipe -> models + data -> teacher signal -> trainer -> students -> evaluation -> report.

Everything that can be checked is checked before the output directory is created, so a
bad recipe or bad input leaves nothing behind. Each trained student is written
atomically; rerunning the same recipe skips the runs that finished (resume).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import MarkCheckpoints, checkpoint_dir, restore_state, resume_point
from .config import (
    ArithmeticData,
    DemoData,
    FileData,
    FromTeacherStudent,
    Gsm8kData,
    HubData,
    PretrainedStudent,
    Recipe,
    RunConfig,
    ScaledStudent,
    divergence_params,
    dump_recipe,
)
from .distributed import (
    FSDPOnCPU,
    barrier,
    end_distributed,
    fsdp2_trainer_args,
    is_main_process,
    is_sharded,
    layer_classes,
    process_rank,
    require_deepspeed,
    shard_frozen,
    shard_frozen_zero3,
    world_size,
    zero3_config,
    zero3_full_state,
)
from .errors import PotstillError, VocabMismatchError
from .finished import (
    DONE,
    check_output_dir,
    load_finished,
    owned_output_dir,
    remove_scratch,
    run_fingerprint,
    save_student,
    trainer_scratch,
    verify_finished,
)
from .hub import check_push, push_students
from .io import atomic_write_text, remove_stale_temporaries

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


# ------------------------------------------------------------------------------ data


def load_pairs(recipe: Recipe, teacher, tokenizer, teacher_id: str) -> list[dict]:
    src = recipe.data.source
    if isinstance(src, DemoData):
        from .data.demo import demo_prompts, teacher_responses

        return teacher_responses(
            teacher,
            tokenizer,
            teacher_id,
            demo_prompts(src.num_prompts),
            max_new_tokens=src.max_new_tokens,
            system_prompt=recipe.data.system_prompt,
            generation=recipe.generation,
        )
    from .data import load_records, records_to_pairs

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
    from .data import rationale as R

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


def split_pairs(recipe: Recipe, teacher, tokenizer, teacher_id: str) -> tuple[list[dict], list[dict]]:
    """The recipe's training and held-out pairs (rationale sources split by problem)."""
    if isinstance(recipe.data.source, (ArithmeticData, Gsm8kData)):
        return rationale_split(recipe)
    return train_eval_split(load_pairs(recipe, teacher, tokenizer, teacher_id), recipe)


def encode_pairs(pairs: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Encoded examples; ``example_id`` is the position in the list (a teacher-signal cache's key).

    Pairs whose prompt alone fills ``max_length`` leave no response token to learn from: they
    are dropped with a logged count (all of them dropped is an error).
    """
    from .data import encode_example, encode_prompt

    out = []
    too_long = 0
    for p in pairs:
        if len(encode_prompt(tokenizer, p["messages"])) >= max_length:
            too_long += 1
            continue
        i = len(out)
        ex = encode_example(tokenizer, p["messages"], p["response"], max_length)
        ex["reference"] = p["response"]
        ex["example_id"] = i
        if "answer" in p:
            ex["answer"] = p["answer"]
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


# ---------------------------------------------------------------------------- models


def load_teacher(cfg, device: torch.device):
    """``(model, tokenizer)`` of a teacher entry (``teacher`` or one of ``extra_teachers``) on ``device``, with its
    loading options: dtype, attention kernel, quantization (checked first: CUDA and bitsandbytes)."""
    from .models import check_quantization, load_model

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
    from .models import (
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
                f"{err} (runs {token_level}: set runs[].cross_tokenizer, e.g. {{{{method: vocab_map}}}}, or alpha 1)"
            ) from None
        return student, None, student_tok
    return student, vocab, None


# ----------------------------------------------------------------------------- train


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


def _checkpointing_args(on: bool) -> dict[str, Any]:
    """TrainingArguments for non-reentrant activation checkpointing (``activation_checkpointing`` from
    transformers 5, before it ``gradient_checkpointing``). Non-reentrant: gradients also flow from tensors taken
    inside a checkpointed layer (feature KD's attention-projection hooks), which the reentrant variant drops."""
    if not on:
        return {}
    from dataclasses import fields

    from transformers import TrainingArguments

    name = "activation_checkpointing"
    if name not in {f.name for f in fields(TrainingArguments)}:
        name = "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def kd_config(recipe: Recipe, run: RunConfig, output_dir: str, device: torch.device, student=None):
    from .kd import KDConfig, OnPolicyConfig
    from .kd.feature import FeatureKDConfig

    t = recipe.train
    check_precision(t.precision, device)
    extra_args = dict(
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", **_checkpointing_args(t.gradient_checkpointing)
    )
    if t.distributed != "none" and device.type == "cpu":
        extra_args["ddp_backend"] = "gloo"
    if t.distributed == "fsdp2":
        extra_args.update(fsdp2_trainer_args(student))
    if t.distributed == "zero3":  # the Trainer hands it to accelerate's DeepSpeed plugin
        extra_args["deepspeed"] = zero3_config(t.deepspeed_config)
    op = run.on_policy
    extra: dict[str, Any] = (
        {}
        if op is None
        else dict(
            lmbda=op.lmbda,
            gen_temperature=op.temperature,
            gen_top_p=op.top_p,
            gen_max_new_tokens=op.max_new_tokens,
            replay_size=op.replay_size,
            replay_reuse=op.replay_reuse,
            adaptive=op.adaptive,
            adaptive_step=op.adaptive_step,
            adaptive_max=op.adaptive_max,
            adaptive_every=op.adaptive_every,
        )
    )
    if run.feature is not None:
        f = run.feature
        extra.update(
            feature_layers=None if f.layers is None else [list(p) for p in f.layers],
            feature_loss=f.loss,
            feature_weight=f.weight,
        )
        if f.relations is not None:
            extra.update(
                relation_layers=[list(p) for p in f.relations.layers],
                relation_kinds=list(f.relations.kinds),
                relation_heads=f.relations.heads,
                relation_weight=f.relations.weight,
            )
    if run.schedule is not None:
        extra.update(
            alpha_end=run.schedule.alpha_end, temperature_end=run.schedule.temperature_end, schedule=run.schedule.kind
        )
    cls = OnPolicyConfig if op is not None else FeatureKDConfig if run.feature is not None else KDConfig
    if op is not None and op.contrastive is not None:
        from .kd.contrastive import ContrastiveConfig

        c = op.contrastive
        extra.update(
            student_divergence=c.student_divergence.name,
            student_divergence_kwargs=divergence_params(c.student_divergence),
            beta=c.beta,
            beta_end=c.beta_end,
            adaptive_skew=c.adaptive_skew,
        )
        cls = ContrastiveConfig
    if op is not None and op.minillm is not None:
        from .kd.minillm import MiniLLMConfig

        extra.update(mix=op.minillm.mix, length_norm=op.minillm.length_norm, long_term=op.minillm.long_term)
        cls = MiniLLMConfig
    return cls(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=t.logging_steps,
        **(
            {"save_strategy": "steps", "save_steps": t.save_steps, "save_total_limit": t.save_total_limit}
            if t.save_steps
            else {"save_strategy": "no"}
        ),
        report_to=list(t.report_to) or "none",
        run_name=run.name,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=device.type == "cpu",
        disable_tqdm=False,
        alpha=run.alpha,
        divergence=run.divergence.name,
        divergence_kwargs=divergence_params(run.divergence),
        temperature=run.temperature,
        scale_t2=run.scale_t2,
        chunk_size=t.chunk_size,
        token_weighting=run.token_weighting,
        token_weighting_ratio=run.token_weighting_ratio,
        curriculum=run.curriculum,
        loss_backend=t.loss_backend,
        **extra_args,
        **extra,
    )


def train_run(
    recipe: Recipe,
    run: RunConfig,
    student,
    teacher,
    tokenizer,
    train_examples: list[dict],
    out_dir: Path,
    device: torch.device,
    vocab_size: int | None,
    memo=None,
    source=None,
    extra_teachers: list | None = None,
    cross: dict | None = None,
    eval_examples: list | None = None,
) -> tuple[Any, list[tuple[int, float]]]:
    """Train one student; write it atomically to ``out_dir`` and return it with its loss curve.

    ``source`` (a teacher-signal cache) replaces the live ``teacher`` during training;
    ``extra_teachers`` join the teacher in runs with ``multi_teacher``; ``cross``
    (``teacher_tokenizer``, ``vocab_map``) serves runs with ``cross_tokenizer``.
    """
    from datasets import Dataset

    from .kd import KDTrainer, OnPolicyKDTrainer
    from .kd.feature import FeatureKDTrainer
    from .signals import OnlineTeacher

    peft_config = None
    if recipe.train.lora is not None:
        from peft import LoraConfig as PeftLora

        lc = recipe.train.lora
        peft_config = PeftLora(
            r=lc.r,
            lora_alpha=lc.lora_alpha,
            lora_dropout=lc.dropout,
            target_modules=lc.target_modules,
            task_type="CAUSAL_LM",
        )
    cols = ("input_ids", "attention_mask", "labels", "example_id")
    ds = Dataset.from_list([{k: ex[k] for k in cols if k in ex} for ex in train_examples])
    kd = run.uses_teacher
    if run.cross_tokenizer is not None:
        return _train_cross(recipe, run, student, teacher, tokenizer, ds, out_dir, device, cross or {})
    if kd and source is None:
        if recipe.teacher.placed:  # on a device of its own or spread by a device map: it stays where it is
            source = OnlineTeacher(teacher, memo=memo, out_device=device)
        else:
            source = OnlineTeacher(teacher if is_sharded(teacher) else teacher.to(device), memo=memo)
    if run.multi_teacher is not None:
        source = _multi_source(recipe, run, source, extra_teachers or [], tokenizer, student, device, vocab_size)
    extra: dict[str, Any] = {}
    if run.on_policy is not None:
        import random

        val = run.on_policy.validation_size
        pick = random.Random(recipe.train.seed).sample(range(len(train_examples)), min(val, len(train_examples)))
        extra["validation_dataset"] = [{k: train_examples[i][k] for k in cols[:3]} for i in pick]
        if recipe.generation.backend == "vllm":  # the student's samples from a vLLM engine
            extra["vllm_options"] = recipe.generation.vllm
    sharded = recipe.train.distributed in ("fsdp2", "zero3")
    blank = (type(student), student.config)  # the consolidated student's class, when it was sharded
    saving = recipe.train.save_steps is not None
    fingerprint = run_fingerprint(recipe, run)
    # With checkpoints the Trainer's directory must outlive a killed process: <output_dir>/checkpoints/<run>.
    scratch = checkpoint_dir(out_dir.parent.parent, run.name) if saving else trainer_scratch(out_dir)
    resume = resume_point(scratch, fingerprint) if saving else None
    try:
        tmp = str(scratch)
        cls = OnPolicyKDTrainer if run.on_policy is not None else FeatureKDTrainer if run.feature else KDTrainer
        if run.on_policy is not None and run.on_policy.contrastive is not None:
            from .kd.contrastive import ContrastiveKDTrainer

            cls = ContrastiveKDTrainer
        if run.on_policy is not None and run.on_policy.minillm is not None:
            from .kd.minillm import MiniLLMKDTrainer

            cls = MiniLLMKDTrainer
        if sharded:  # accelerate's FSDP2 plugin on CPU processes too (a no-op where accelerate enables it)
            cls = type(cls.__name__, (FSDPOnCPU, cls), {})
        if recipe.data.packing:  # the batch's examples end to end in rows of max_length
            from .data import PackCollator
            from .generate import pad_id

            extra["data_collator"] = PackCollator(pad_id(tokenizer), recipe.data.max_length)
        trainer = cls(
            model=student,
            teacher_model=None,
            signal_source=source if kd else None,
            args=kd_config(recipe, run, tmp, device, student),
            train_dataset=ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            vocab_size=vocab_size,
            **extra,
        )
        watch = _watch(recipe, run, trainer, teacher, tokenizer, out_dir, eval_examples, vocab_size)
        if saving:
            trainer.add_callback(MarkCheckpoints(fingerprint, trainer))
            if resume is not None:
                log.info("run %s resumes from %s", run.name, resume)
                restore_state(trainer, resume)
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - t0
        student_sharded = is_sharded(trainer.model)
        if sharded:  # every process takes part in gathering the full weights; the first one keeps them
            if recipe.train.distributed == "zero3":  # the float32 master weights, also under bf16
                state = zero3_full_state(trainer.model_wrapped)
            else:
                state = trainer.accelerator.get_state_dict(trainer.model)
            model = _consolidated(*blank, peft_config, state, device) if is_main_process() else None
        else:
            # without accelerate's autocast wrapper: a fresh bf16 student is evaluated in fp32, like a reloaded one
            model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    finally:
        if not saving:  # checkpoints stay until the student is written (below)
            remove_scratch(scratch)
    curve = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    if not is_main_process():  # the first process writes the student
        return None, curve
    if peft_config is not None:
        model = model.merge_and_unload()
    info = {"loss_curve": curve, "train_seconds": seconds, "run": run.model_dump(mode="json")}
    if hasattr(trainer, "loss_tokens"):  # the first process's tokens that carried loss, and their rate
        info["loss_tokens"] = trainer.loss_tokens
        info["loss_tokens_per_s"] = round(trainer.loss_tokens / seconds, 1) if seconds > 0 else None
        info["padding_share"] = trainer.padding_share
    if watch is not None:  # [step, forward KL, top-1 agreement] on the held-out examples during training
        info["eval_history"] = watch.history
    if world_size() > 1:  # how the processes shared the work: what a reader of the result needs to know
        info["distributed"] = {
            "engine": recipe.train.distributed,
            "processes": world_size(),
            "student_sharded": student_sharded,
            "teacher_sharded": teacher is not None and is_sharded(teacher),
        }
        if run.multi_teacher is not None:
            info["distributed"]["extra_teachers_sharded"] = [
                is_sharded(t.model if isinstance(t, ExtraTeacher) else t) for t in extra_teachers or []
            ]
    if run.multi_teacher is not None:
        if run.multi_teacher.mode == "select":
            info["teacher_selected_examples"] = source.selected_counts
        cov = {i: s.coverage() for i, s in enumerate(source.sources) if hasattr(s, "coverage")}
        if cov:  # teachers with another tokenizer: the share of rows they informed and the mass mapped
            info["cross_tokenizer_coverage"] = cov
    if run.on_policy is not None:
        rs = trainer.rollout_stats
        info["on_policy"] = {
            "gen_tokens": rs["gen_tokens"],
            "gen_seconds": rs["gen_seconds"],
            "modes": rs["modes"],
            "lmbda_history": trainer.lmbda_history,
        }
        if run.on_policy.contrastive is not None:
            info["on_policy"].update(skew_anchors=trainer.anchors, skew_history=trainer.skew_history)
        if run.on_policy.minillm is not None:
            info["on_policy"]["minillm_stats"] = trainer.minillm_stats
    if resume is not None:
        info["resumed_from"] = Path(resume).name
    save_student(model, tokenizer, out_dir, info, fingerprint)
    if saving:  # the student is on disk: its checkpoints have served
        remove_scratch(scratch)
        with contextlib.suppress(OSError):  # checkpoints/ itself once no run keeps any
            scratch.parent.rmdir()
    return model, curve


def _consolidated(cls, config, peft_config, state: dict, device: torch.device):
    """A plain (unsharded) student of class ``cls`` holding the gathered full ``state``: what FSDP2 trained,
    ready for ``save_pretrained`` and evaluation in one process. Built without random initialization."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls(config)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    model.load_state_dict(state)
    return model.to(device)


@dataclass
class ExtraTeacher:
    """One of ``extra_teachers``: its model, and its tokenizer when that differs from the student's."""

    model: Any
    tokenizer: Any = None


def _multi_source(recipe: Recipe, run: RunConfig, source, extra: list, tokenizer, student, device, vocab_size):
    """The teacher's source and the extra teachers behind one MultiTeacher (see ``train_run``)."""
    from .models import output_head
    from .signals import MultiTeacher, OnlineTeacher
    from .signals.cross import CrossTokenizerTeacher

    mt = run.multi_teacher
    sources = [source]
    for i, t in enumerate(extra):
        model, tok = (t.model, t.tokenizer) if isinstance(t, ExtraTeacher) else (t, None)
        placed = i < len(recipe.extra_teachers) and recipe.extra_teachers[i].placed
        if tok is None and placed:
            sources.append(OnlineTeacher(model, out_device=device))
        elif tok is None:
            sources.append(OnlineTeacher(model if is_sharded(model) else model.to(device)))
        elif placed:
            raise PotstillError(
                f"extra_teachers[{i}] has another tokenizer, whose projection runs on the student's "
                "device; remove its device / device_map"
            )
        else:
            v_s = vocab_size or output_head(student).weight.shape[0]
            sources.append(
                CrossTokenizerTeacher(
                    model.to(device),
                    tok,
                    tokenizer,
                    student_vocab=v_s,
                    kinds=mt.cross_kinds,
                    temperature=run.temperature,
                    chunk_size=recipe.train.chunk_size,
                )
            )
    return MultiTeacher(
        sources,
        mode=mt.mode,
        confidence=mt.confidence,
        weights=mt.weights,
        temperature=run.temperature,
        vocab_size=vocab_size,
        chunk_size=recipe.train.chunk_size,
    )


def _watch(recipe: Recipe, run: RunConfig, trainer, teacher, tokenizer, out_dir: Path, eval_examples, vocab_size):
    """Trackers write under ``<output_dir>/logs/<run>``; with ``train.eval_steps`` the held-out figures are measured
    during training (:class:`potstill.tracking.HeldOutEval`, returned; None without)."""
    from .tracking import HeldOutEval, place_tracker_logs

    place_tracker_logs(trainer, out_dir.parent.parent / "logs" / run.name)
    every = recipe.train.eval_steps
    if every is None or teacher is None or not eval_examples:
        return None
    watch = HeldOutEval(
        trainer,
        teacher,
        tokenizer,
        eval_examples,
        every=every,
        vocab_size=vocab_size,
        batch_size=recipe.eval.batch_size,
    )
    trainer.add_callback(watch)
    return watch


def _train_cross(
    recipe: Recipe, run: RunConfig, student, teacher, tokenizer, ds, out_dir: Path, device: torch.device, cross: dict
):
    """One cross-tokenizer run (:class:`potstill.kd.cross_tokenizer.CrossTokenizerKDTrainer`)."""
    from .kd.cross_tokenizer import CrossTokenizerKDTrainer

    if "teacher_tokenizer" not in cross:
        raise PotstillError(
            f"run {run.name} uses cross_tokenizer but the student shares the teacher's tokenizer; "
            "remove cross_tokenizer or use a student with its own tokenizer"
        )
    ct = run.cross_tokenizer
    saving = recipe.train.save_steps is not None
    fingerprint = run_fingerprint(recipe, run)
    scratch = checkpoint_dir(out_dir.parent.parent, run.name) if saving else trainer_scratch(out_dir)
    resume = resume_point(scratch, fingerprint) if saving else None
    try:
        tmp = str(scratch)
        trainer = CrossTokenizerKDTrainer(
            student,
            teacher_model=teacher.to(device),
            args=kd_config(recipe, run, tmp, device),
            teacher_tokenizer=cross["teacher_tokenizer"],
            method=ct.method,
            vocab_map=cross.get("vocab_map"),
            kinds=tuple(ct.kinds),
            max_teacher_length=ct.max_teacher_length,
            processing_class=tokenizer,
            train_dataset=ds,
        )
        _watch(recipe, run, trainer, None, tokenizer, out_dir, None, None)
        if saving:
            trainer.add_callback(MarkCheckpoints(fingerprint, trainer))
            if resume is not None:
                log.info("run %s resumes from %s", run.name, resume)
                restore_state(trainer, resume)
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - t0
        # without accelerate's autocast wrapper: a fresh bf16 student is evaluated in fp32, like a reloaded one
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    finally:
        if not saving:
            remove_scratch(scratch)
    curve = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    info = {
        "loss_curve": curve,
        "train_seconds": seconds,
        "run": run.model_dump(mode="json"),
        "cross_tokenizer": trainer.coverage_stats(),
    }
    if resume is not None:
        info["resumed_from"] = Path(resume).name
    save_student(model, tokenizer, out_dir, info, fingerprint)
    if saving:  # the student is on disk: its checkpoints have served
        remove_scratch(scratch)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()
    return model, curve


# ----------------------------------------------------------------------------- main


class Prepared:
    """Teacher, tokenizer, initial student and encoded data of a recipe (all input checked)."""

    def __init__(self, recipe: Recipe):
        from .models import output_head

        self.recipe = recipe
        self.device = resolve_device(recipe.device)
        check_precision(recipe.train.precision, self.device)
        if recipe.generation.backend == "vllm":  # before any model is loaded: vllm and CUDA are there
            from .vllm_engine import require_vllm

            require_vllm(
                recipe.generation.vllm.mode, self.device, sync=any(r.on_policy is not None for r in recipe.runs)
            )
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
        self.train_examples = encode_pairs(train_pairs, self.tokenizer, recipe.data.max_length)
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
            from .kd.cross_tokenizer import build_vocab_map
            from .models import output_head

            self._vmap = build_vocab_map(
                self.teacher_tokenizer, self.tokenizer, student_vocab=output_head(self.student0).weight.shape[0]
            )
        return self._vmap

    def _black_box(self, recipe: Recipe) -> None:
        """Sequence-level KD from a teacher known only by its responses: no teacher weights at all."""
        from .models import load_model

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
            from .dd.pipeline import load_selection

            self.train_examples = load_selection(self.recipe.data.selection, self.pool_examples)

    def cross_context(self) -> dict:
        """What cross-tokenizer runs need (empty when the student shares the teacher's tokenizer)."""
        if not getattr(self, "cross", False):
            return {}
        ctx = {"teacher_tokenizer": self.teacher_tokenizer}
        if any(r.cross_tokenizer is not None and r.cross_tokenizer.method == "vocab_map" for r in self.recipe.runs):
            ctx["vocab_map"] = self.vocab_map()
        return ctx

    def extra_teachers(self) -> list[ExtraTeacher]:
        """The recipe's ``extra_teachers``, loaded once, when a run combines teachers. One with another
        tokenizer than the student's keeps its tokenizer (``ExtraTeacher.tokenizer``): it joins through
        the cross-tokenizer projection (:class:`potstill.signals.cross.CrossTokenizerTeacher`)."""
        if not any(r.multi_teacher is not None for r in self.recipe.runs):
            return []
        if getattr(self, "_extra", None) is None:
            from .models import tokenizer_fingerprint

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
        from .signals.cache import CachedSignal, weights_fingerprint

        spec = cache_spec(self.recipe)
        source = CachedSignal(
            self.recipe.cache_dir,
            tokenizer=self.tokenizer,
            tail=spec.tail,
            teacher_fingerprint=weights_fingerprint(self.teacher),
            verify=self.recipe.cache.verify,
        )
        source.check_spec(spec)
        source.check_data(self.pool_examples)
        return source


def cache_spec(recipe: Recipe):
    from .signals.cache import CacheSpec

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


def cache(recipe: Recipe, *, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict | None:
    """``potstill cache``: run the teacher over the recipe's training examples and store its signal.

    Returns the manifest when the cache is complete, ``None`` while other ranks still work.
    """
    from .signals.cache import write_cache

    if recipe.cache is None:
        raise PotstillError("the recipe has no `cache` section; add e.g. `cache: {signal: {kind: topk, k: 32}}`")
    check_output_dir(recipe.cache_dir, key="cache.dir")
    prep = Prepared(recipe)
    spec = cache_spec(recipe)
    return write_cache(
        prep.teacher,
        prep.tokenizer,
        prep.pool_examples,
        recipe.cache_dir,
        spec,
        teacher_name=recipe.teacher.model,
        rank=rank,
        world_size=world_size,
        progress=progress,
    )


@torch.no_grad()
def check_teacher_finite(teacher, example: dict, device: torch.device) -> None:
    """Preflight: one teacher forward on a real example, so NaN weights fail before anything is written."""
    from .models.placement import input_device

    ids = torch.tensor([example["input_ids"]], device=input_device(teacher))  # its own device, when placed
    logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if not torch.isfinite(logits).all():
        raise PotstillError(
            "teacher logits contain NaN/inf on the first training example; check the teacher weights or load it "
            "with teacher.dtype: float32"
        )


def evaluate_and_report(
    prep: Prepared,
    students: dict[str, Any],
    curves: dict[str, list],
    out: Path,
    notes: list[str],
    progress: bool = True,
) -> dict[str, dict]:
    from .eval import collect_samples, evaluate_runs, metrics_only, write_report

    r = prep.recipe
    teacher = None if getattr(prep, "cross", False) else prep.teacher  # other tokens: no token-level comparison
    results = evaluate_runs(
        students,
        teacher,
        prep.tokenizer,
        prep.eval_examples,
        vocab_size=prep.vocab_size,
        batch_size=r.eval.batch_size,
        max_new_tokens=r.eval.max_new_tokens,
        progress=progress,
    )
    answers = [ex.get("answer") for ex in prep.eval_examples]
    if all(a is not None for a in answers):
        from .data.rationale import exact_match

        for run in results.values():
            run["exact_match"] = exact_match(run["generations"], answers)
    metrics = metrics_only(results)
    samples = collect_samples(results, prep.eval_examples, k=4, tokenizer=prep.tokenizer)
    write_report(out, metrics, loss_curves=curves, title="potstill distillation report", notes=notes, samples=samples)
    return metrics


def preflight(prep: Prepared) -> None:
    """Checks that need the loaded models, run before anything is written: every run's layer indices and LoRA
    targets exist, and every finished student on disk verifies (or there is none)."""
    from .models.head import text_config

    r = prep.recipe
    if r.train.eval_steps is not None and getattr(prep, "cross", False):
        raise PotstillError(
            "train.eval_steps compares the student with the teacher token by token, but the student "
            "has another tokenizer; remove train.eval_steps (the report measures it at the end)"
        )
    n_s = int(text_config(prep.student0).num_hidden_layers)
    n_t = None if r.teacher.model is None else int(text_config(prep.teacher).num_hidden_layers)
    for run in r.runs:
        pairs = [] if run.feature is None else [("feature.layers", p) for p in run.feature.layers or []]
        if run.feature is not None and run.feature.relations is not None:
            pairs += [("feature.relations.layers", p) for p in run.feature.relations.layers]
        for key, (i_s, i_t) in pairs:
            for who, i, n in (("student", i_s, n_s), ("teacher", i_t, n_t)):
                if n is not None and not -(n + 1) <= i <= n:
                    raise PotstillError(
                        f"run {run.name}: {key} names {who} layer {i}, but the {who} has {n} layers; "
                        f"use 0..{n} (0 the embeddings) or -1 for the last"
                    )
    if r.data.packing:
        check_packing_models(prep)
    lora = r.train.lora
    if lora is not None and lora.target_modules != "all-linear":
        names = [n for n, _ in prep.student0.named_modules()]
        missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in prep.student0.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
                }
            )
            raise PotstillError(
                f"train.lora.target_modules {missing} are not modules of the student; use some of "
                f"{linear} or all-linear"
            )
    if r.train.distributed == "fsdp2":
        for who, model in (("student", prep.student0), ("teacher", getattr(prep, "teacher", None))):
            if model is not None and not layer_classes(model):
                raise PotstillError(
                    f"train.distributed fsdp2: the {who} ({type(model).__name__}) declares no "
                    "decoder-layer classes (_no_split_modules) to shard one by one; set "
                    "train.distributed ddp"
                )
    out = Path(r.output_dir)
    for run in r.runs:
        verify_finished(out / "runs" / run.name, run_fingerprint(r, run))
        if r.train.save_steps is not None and not (out / "runs" / run.name / DONE).is_file():
            resume_point(checkpoint_dir(out, run.name), run_fingerprint(r, run))  # another recipe's: refused now


def check_packing_models(prep: Prepared) -> None:
    """``data.packing``: every model that reads the packed rows keeps each example's attention to itself."""
    from .data.packing import check_packing

    r = prep.recipe
    models = [("student", prep.student0)]
    if any(run.uses_teacher for run in r.runs) and r.cache is None:
        models.append(("teacher", prep.teacher))
    for i, t in enumerate(prep.extra_teachers()):
        if t.tokenizer is not None:
            raise PotstillError(
                f"data.packing: extra_teachers[{i}] has another tokenizer and reads each row of a "
                "batch as one example; set data.packing false or give it the student's tokenizer"
            )
        models.append((f"extra_teachers[{i}]", t.model))
    for who, model in models:
        check_packing(model, who)


def check_distributed(recipe: Recipe, device: torch.device) -> None:
    """Refuse, in one line, a ``train.distributed`` that does not match how the processes were started."""
    kind, world = recipe.train.distributed, world_size()
    if world > 1 and kind == "none":
        raise PotstillError(
            f"this is process {process_rank()} of {world} (accelerate launch / torchrun), but "
            "train.distributed is none, so every process would train its own copy; set "
            "train.distributed ddp or fsdp2, or start one process"
        )
    if world == 1 and kind != "none":
        raise PotstillError(
            f"train.distributed {kind} splits the work over the processes of `accelerate launch "
            f"--num_processes N`, but this is one process with nothing to share with; start it "
            "that way, or set train.distributed none"
        )
    if kind != "none" and device.type not in ("cpu", "cuda"):
        raise PotstillError(
            f"train.distributed {kind} runs on cuda or cpu processes, not {device.type}; set device cuda or cpu"
        )
    if recipe.train.loss_backend == "liger":
        from .divergences.liger import require_liger

        try:
            require_liger(device)
        except RuntimeError as err:
            raise PotstillError(str(err)) from None
    if recipe.train.deepspeed_config is not None:
        _check_deepspeed_config(kind, recipe.train.deepspeed_config)
    if kind == "zero3":
        require_deepspeed()
    if kind in ("fsdp2", "zero3"):
        for run in recipe.runs:
            minillm = run.on_policy is not None and run.on_policy.minillm is not None and kind == "zero3"
            if minillm or run.cross_tokenizer is not None:
                what = "on_policy.minillm" if minillm else "cross_tokenizer"
                why = {
                    "on_policy.minillm": "its teacher-mixed sampling runs the partitioned teacher once per new "
                    "token, and a process whose samples ended stops calling it while the others still gather "
                    "its weights; fsdp2 gathers the teacher once for the whole generation",
                    "cross_tokenizer": "the cross-tokenizer trainer has not been run with sharded models",
                }[what]
                alt = "fsdp2 or ddp" if minillm else "ddp"
                raise PotstillError(
                    f"run {run.name}: {what} is not supported under train.distributed {kind} yet "
                    f"({why}); set train.distributed {alt}"
                )


# The module each tracker of ``train.report_to`` needs (tensorboard: torch's SummaryWriter writes with it).
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def check_watch(recipe: Recipe) -> None:
    """Refuse, in one line, trackers that are not installed and ``eval_steps`` where models are sharded."""
    import importlib.util

    for name in recipe.train.report_to:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise PotstillError(
                f"train.report_to {name} needs the {TRACKER_MODULES[name]} package; pip install "
                f"'potstill[tracking]' (tensorboard) or {TRACKER_MODULES[name]}, or remove it"
            )
    if recipe.train.eval_steps is not None and recipe.train.distributed in ("fsdp2", "zero3"):
        raise PotstillError(
            f"train.eval_steps measures with whole models in the first process, but under "
            f"train.distributed {recipe.train.distributed} they are sharded; remove train.eval_steps "
            "(the held-out figures are measured at the end) or use ddp"
        )


def _check_deepspeed_config(kind: str, path: str) -> None:
    import json

    if kind != "zero3":
        raise PotstillError(
            f"train.deepspeed_config is for train.distributed zero3, not {kind}; remove it or set "
            "train.distributed zero3"
        )
    try:
        stage = json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError) as err:
        raise PotstillError(
            f"train.deepspeed_config {path}: cannot read it as a DeepSpeed JSON config "
            f"({type(err).__name__}); fix the path or the file"
        ) from None
    if stage != 3:
        raise PotstillError(
            f"train.deepspeed_config {path}: zero_optimization.stage is {stage}, but train.distributed "
            "zero3 needs stage 3; set it to 3 (or use train.distributed ddp)"
        )


def _start_processes(device: torch.device) -> None:
    """The process group of a multi-process run, made before the models are sharded (the Trainer reuses it)."""
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def distill(recipe: Recipe, *, progress: bool = True) -> dict[str, dict]:
    """Run a recipe end to end; returns the metrics of every run (``{}`` on every process but the first)."""
    t_start = time.perf_counter()
    out = Path(recipe.output_dir)
    check_distributed(recipe, resolve_device(recipe.device))
    check_watch(recipe)
    check_output_dir(out)
    if is_main_process():  # a push that cannot happen is refused before anything is trained
        check_push(recipe.push_to_hub, [r.name for r in recipe.runs])
    _start_processes(resolve_device(recipe.device))
    prep = Prepared(recipe)
    source = prep.cached_source() if any(r.uses_teacher for r in recipe.runs) else None
    prep.extra_teachers()  # load and check them before anything is written
    preflight(prep)
    shard = {"fsdp2": shard_frozen, "zero3": shard_frozen_zero3}.get(recipe.train.distributed)
    if shard is not None:  # the live teachers: the main one, and extra ones that share the student's tokenizer
        frozen = [prep.teacher] if prep.teacher is not None and source is None else []
        frozen += [t.model for t in prep.extra_teachers() if t.tokenizer is None]
        for model in frozen:
            shard(model)
    barrier()  # every process checked the input before the first one writes
    if not is_main_process():  # the first process owns the output directory
        return _distill_runs(prep, source, out, t_start, progress)
    # Input is valid: from here on we write (and a failure before the first student finishes removes it all).
    with owned_output_dir(out):
        metrics = _distill_runs(prep, source, out, t_start, progress)
    if recipe.push_to_hub is not None:
        for name, url in push_students(recipe.push_to_hub, out / "runs", [r.name for r in recipe.runs]).items():
            log.info("run %s pushed to %s", name, url)
    return metrics


def _distill_runs(prep: Prepared, source, out: Path, t_start: float, progress: bool) -> dict[str, dict]:
    recipe = prep.recipe
    main = is_main_process()
    if main:
        for d in (out, out / "runs"):  # what a killed earlier run left half-written
            remove_stale_temporaries(d)
        atomic_write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
    students: dict[str, Any] = {}
    curves: dict[str, list] = {}
    # Every run sees the same batches in the same order: the teacher's forward is paid once.
    from .signals import TeacherMemo

    memo = TeacherMemo()
    for run in recipe.runs:
        run_dir = out / "runs" / run.name
        if main:
            done = load_finished(run_dir, prep.device, verified=True)  # preflight verified every finished student
        else:
            done = (run_dir / DONE).is_file() or None
        if done is not None:
            log.info("run %s already finished; reusing %s", run.name, run_dir)
            if main:
                students[run.name], curves[run.name] = done
            continue
        student = copy.deepcopy(prep.student0)
        student.train()
        model, curve = train_run(
            recipe,
            run,
            student,
            prep.teacher,
            prep.tokenizer,
            prep.train_examples,
            run_dir,
            prep.device,
            prep.vocab_size,
            memo=memo,
            source=source,
            extra_teachers=prep.extra_teachers(),
            cross=prep.cross_context(),
            eval_examples=prep.eval_examples,
        )
        students[run.name], curves[run.name] = model, curve
        barrier()  # the student is on disk before any process goes on
    if world_size() > 1:
        end_distributed()  # evaluation is the first process's alone, with whole (unsharded) models
        if recipe.train.distributed == "zero3":  # else from_pretrained would load into ZeRO-3 partitions
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        if not main:
            return {}
        if prep.teacher is not None and is_sharded(prep.teacher):
            prep.teacher = load_teacher(recipe.teacher, prep.device)[0]
    if recipe.eval.include_untrained:
        students = {"student_init": prep.student0, **students}
    notes = [
        f"teacher: {recipe.teacher.model or 'black box (its responses in the data)'}; student: {recipe.student.kind}; {len(prep.train_examples)} train / "
        f"{len(prep.eval_examples)} held-out examples; {recipe.train.max_steps} optimizer steps per run, batch "
        f"{recipe.train.batch_size} x {recipe.train.gradient_accumulation_steps}",
        f"wall time before evaluation {time.perf_counter() - t_start:.0f} s on {prep.device}",
    ]
    if source is not None:
        m = source.manifest
        notes.append(
            f"teacher signal from the cache at {recipe.cache_dir}: {source.kind} "
            f"({m['spec']['dtype']}), {m['bytes_per_token']:.1f} bytes/token"
        )
    return evaluate_and_report(prep, students, curves, out, notes, progress)


def evaluate_only(recipe: Recipe, extra: list[str] | None = None, *, progress: bool = True) -> dict[str, dict]:
    """``potstill eval``: evaluate the finished runs of a recipe (and extra student dirs) on its held-out set."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    out = Path(recipe.output_dir)
    if world_size() > 1:
        raise PotstillError(
            f"potstill eval runs in one process, but this is process {process_rank()} of "
            f"{world_size()} (accelerate launch / torchrun); run it without the launcher"
        )
    check_output_dir(out)
    taken = {"teacher", "student_init", *(r.name for r in recipe.runs)}
    for d in extra or []:
        p = Path(d)
        if not (p / "config.json").is_file():
            raise PotstillError(f"student directory '{p}' has no config.json; pass a save_pretrained directory")
        if p.name in taken:
            raise PotstillError(
                f"--student '{p}' would be reported as '{p.name}', which is already a row of this "
                "recipe's report; copy or rename the directory to a name of its own"
            )
        taken.add(p.name)
    prep = Prepared(recipe)
    students: dict[str, Any] = {}
    curves: dict[str, list] = {}
    if recipe.eval.include_untrained:
        students["student_init"] = prep.student0
    for run in recipe.runs:
        done = load_finished(out / "runs" / run.name, prep.device, run_fingerprint(recipe, run))
        if done is not None:
            students[run.name], curves[run.name] = done
    for d in extra or []:
        p = Path(d)
        try:
            students[p.name] = AutoModelForCausalLM.from_pretrained(p).to(prep.device)
        except (OSError, ValueError, SafetensorError) as err:
            raise PotstillError(
                f"student directory '{p}' does not load ({str(err).splitlines()[0][:200]}); pass a "
                "complete save_pretrained directory"
            ) from None
    if not set(students) - {"student_init"}:
        raise PotstillError(f"no finished runs in '{out}/runs' and no --student given; run `potstill distill` first")
    with owned_output_dir(out):
        return evaluate_and_report(prep, students, curves, out, [f"evaluation only of {sorted(students)}"], progress)


def train_eval_split(pairs: list[dict], recipe: Recipe) -> tuple[list[dict], list[dict]]:
    from .data import train_eval_split as split

    return split(pairs, recipe.data.eval_size, recipe.data.seed)
