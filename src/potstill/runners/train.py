"""One run of a distill recipe: its trainer config, the trainer chosen by the run's method, checkpoints and
resume, and the finished student written atomically.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from potstill.checkpoints import MarkCheckpoints, checkpoint_dir, restore_state, resume_point
from potstill.distributed import (
    FSDPOnCPU,
    fsdp2_trainer_args,
    is_main_process,
    is_sharded,
    world_size,
    zero3_config,
    zero3_full_state,
)
from potstill.errors import PotstillError
from potstill.finished import (
    remove_scratch,
    run_fingerprint,
    save_student,
    trainer_scratch,
)
from potstill.recipes.distill import Recipe
from potstill.recipes.divergences import divergence_params
from potstill.recipes.methods import RunConfig
from potstill.runners.prepare import ExtraTeacher, check_precision

log = logging.getLogger("potstill")


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


# method kind -> (module, its trainer config class, its trainer class). Cross-tokenizer runs build their trainer
# in _train_cross (it takes the teacher's tokenizer and the vocabulary map).
METHODS: dict[str, tuple[str, str, str]] = {
    "kd": ("potstill.kd", "KDConfig", "KDTrainer"),
    "on_policy": ("potstill.kd", "OnPolicyConfig", "OnPolicyKDTrainer"),
    "distillm2": ("potstill.kd.contrastive", "ContrastiveConfig", "ContrastiveKDTrainer"),
    "minillm": ("potstill.kd.minillm", "MiniLLMConfig", "MiniLLMKDTrainer"),
    "feature": ("potstill.kd.feature", "FeatureKDConfig", "FeatureKDTrainer"),
    "cross_tokenizer": ("potstill.kd", "KDConfig", "CrossTokenizerKDTrainer"),
}


def method_classes(run: RunConfig) -> tuple[type, type]:
    """The trainer config class and the trainer class of ``run``'s method."""
    module, config, trainer = METHODS[run.method.kind]
    mod = importlib.import_module(module)
    return getattr(mod, config), getattr(mod, trainer)


def _method_args(run: RunConfig) -> dict[str, Any]:
    """The trainer config's arguments that ``run``'s method adds (on-policy sampling, feature pairs, DistiLLM-2's
    second divergence, MiniLLM's mixture)."""
    op, extra = run.on_policy, {}
    if op is not None:
        extra.update(
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
        if op.contrastive is not None:
            c = op.contrastive
            extra.update(
                student_divergence=c.student_divergence.name,
                student_divergence_kwargs=divergence_params(c.student_divergence),
                beta=c.beta,
                beta_end=c.beta_end,
                adaptive_skew=c.adaptive_skew,
            )
        if op.minillm is not None:
            extra.update(mix=op.minillm.mix, length_norm=op.minillm.length_norm, long_term=op.minillm.long_term)
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
    from potstill.runners.keypoint import keypoint_trainer_args

    extra.update(keypoint_trainer_args(run))
    if run.schedule is not None:
        extra.update(
            alpha_end=run.schedule.alpha_end, temperature_end=run.schedule.temperature_end, schedule=run.schedule.kind
        )
    return extra


def kd_config(recipe: Recipe, run: RunConfig, output_dir: str, device: torch.device, student=None):
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
    cls, _ = method_classes(run)
    extra = _method_args(run)
    return cls(
        output_dir=output_dir,
        max_steps=run.max_steps or t.max_steps,
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


def lora_peft_config(recipe: Recipe):
    """The peft LoraConfig of `train.lora` (None without one)."""
    if recipe.train.lora is None:
        return None
    from peft import LoraConfig as PeftLora

    lc = recipe.train.lora
    return PeftLora(
        r=lc.r,
        lora_alpha=lc.lora_alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        task_type="CAUSAL_LM",
    )


TRAIN_COLUMNS = (
    "input_ids",
    "attention_mask",
    "labels",
    "example_id",
    "kd_token_weights",
    "kd_step_rank",
    "kd_num_steps",
)


def _trainer_extras(recipe: Recipe, run: RunConfig, tokenizer, train_examples: list[dict]) -> dict[str, Any]:
    """Trainer arguments beyond the common ones: an on-policy run's validation rows and vLLM engine, the packing
    collator."""
    extra: dict[str, Any] = {}
    if run.on_policy is not None:
        import random

        val = run.on_policy.validation_size
        pick = random.Random(recipe.train.seed).sample(range(len(train_examples)), min(val, len(train_examples)))
        extra["validation_dataset"] = [{k: train_examples[i][k] for k in TRAIN_COLUMNS[:3]} for i in pick]
        if recipe.generation.backend == "vllm":  # the student's samples from a vLLM engine
            extra["vllm_options"] = recipe.generation.vllm
    if recipe.data.packing:  # the batch's examples end to end in rows of max_length
        from potstill.data import PackCollator
        from potstill.generate import pad_id

        extra["data_collator"] = PackCollator(pad_id(tokenizer), recipe.data.max_length)
    return extra


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

    ``source`` (a teacher-signal cache) replaces the live ``teacher``; ``extra_teachers`` join the teacher in
    runs with ``multi_teacher``; ``cross`` (``teacher_tokenizer``, ``vocab_map``) serves ``cross_tokenizer`` runs.
    """
    from datasets import Dataset

    from potstill.runners.keypoint import with_keypoint_columns

    train_examples = with_keypoint_columns(
        run, teacher, tokenizer, train_examples, Path(recipe.output_dir) / "keypoint"
    )
    ds = Dataset.from_list([{k: ex[k] for k in TRAIN_COLUMNS if k in ex} for ex in train_examples])
    kd = run.uses_teacher
    if run.cross_tokenizer is not None:
        return _train_cross(recipe, run, student, teacher, tokenizer, ds, out_dir, device, cross or {}, source)
    moves = None  # the EMA self teacher's callback
    if kd and recipe.teacher.kind == "self":  # copied from this run's student before any adapter wraps it
        from potstill.kd.self_distill import self_teacher

        source, moves = self_teacher(student, recipe.teacher.mode, recipe.teacher.decay, memo)
    elif kd and source is None:
        source = _live_teacher(recipe, teacher, memo, device)
    if run.multi_teacher is not None:
        source = _multi_source(recipe, run, source, extra_teachers or [], tokenizer, student, device, vocab_size)
    peft_config, sharded = lora_peft_config(recipe), recipe.train.distributed in ("fsdp2", "zero3")
    blank = (type(student), student.config)  # the consolidated student's class, when it was sharded
    sc = _Scratch.of(recipe, run, out_dir)
    try:
        _, cls = method_classes(run)
        if sharded:  # accelerate's FSDP2 plugin on CPU processes too (a no-op where accelerate enables it)
            cls = type(cls.__name__, (FSDPOnCPU, cls), {})
        trainer = cls(
            model=student,
            teacher_model=None,
            signal_source=source if kd else None,
            args=kd_config(recipe, run, str(sc.dir), device, student),
            train_dataset=ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            vocab_size=vocab_size,
            **_trainer_extras(recipe, run, tokenizer, train_examples),
        )
        if moves is not None:
            trainer.add_callback(moves)
        watch = _watch(recipe, run, trainer, teacher, tokenizer, out_dir, eval_examples, vocab_size)
        read0 = _tokens_read(trainer)  # a source may be shared by runs: count this run's part
        seconds = sc.fit(trainer, run.name)
        read = _tokens_read(trainer) - read0
        student_sharded = is_sharded(trainer.model)
        model = _trained_student(recipe, trainer, blank, peft_config, device) if sharded or is_main_process() else None
    finally:
        sc.drop_unless_saving()
    curve = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    if not is_main_process():  # the first process writes the student
        return None, curve
    info = {"loss_curve": curve, "train_seconds": seconds, "run": run.model_dump(mode="json")}
    info.update(_run_info(recipe, run, trainer, teacher, source, extra_teachers, student_sharded, seconds))
    info["teacher_tokens"] = read  # this process's tokens read by live teachers (0 from a cache)
    if kd and recipe.teacher.kind == "self":
        info["self_teacher"] = {"mode": recipe.teacher.mode, "decay": recipe.teacher.decay}
        if moves is not None:
            info["self_teacher"]["ema_updates"] = moves.updates
    if watch is not None:  # [step, forward KL, top-1 agreement] on the held-out examples during training
        info["eval_history"] = watch.history
    model = model.merge_and_unload() if peft_config is not None else model
    sc.save(model, tokenizer, out_dir, info)
    return model, curve


def _tokens_read(trainer) -> int:
    """Tokens the live teachers of ``trainer`` have read so far (data batches and, on-policy, the student's samples)."""
    from potstill.signals import teacher_tokens

    return sum(teacher_tokens(s) for s in getattr(trainer, "teacher_sources", list)())


@dataclass
class _Scratch:
    """Where a run's Trainer writes, and whether it resumes. With checkpoints the directory must outlive a killed
    process (``<output_dir>/checkpoints/<run>``) and is removed once the student is written; without, it is a
    scratch directory removed when training ends."""

    dir: Path
    fingerprint: dict
    saving: bool
    resume: str | None

    @classmethod
    def of(cls, recipe: Recipe, run: RunConfig, out_dir: Path) -> _Scratch:
        saving, fingerprint = recipe.train.save_steps is not None, run_fingerprint(recipe, run)
        where = checkpoint_dir(out_dir.parent.parent, run.name) if saving else trainer_scratch(out_dir)
        return cls(where, fingerprint, saving, resume_point(where, fingerprint) if saving else None)

    def fit(self, trainer, name: str) -> float:
        """Train (from the newest good checkpoint when resuming); the seconds it took."""
        if self.saving:
            trainer.add_callback(MarkCheckpoints(self.fingerprint, trainer))
            if self.resume is not None:
                log.info("run %s resumes from %s", name, self.resume)
                restore_state(trainer, self.resume)
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=self.resume)
        return time.perf_counter() - t0

    def drop_unless_saving(self) -> None:
        if not self.saving:  # checkpoints stay until the student is written
            remove_scratch(self.dir)

    def save(self, model, tokenizer, out_dir: Path, info: dict) -> None:
        """Write the student atomically; then its checkpoints have served."""
        if self.resume is not None:
            info["resumed_from"] = Path(self.resume).name
        save_student(model, tokenizer, out_dir, info, self.fingerprint)
        if self.saving:
            remove_scratch(self.dir)
            with contextlib.suppress(OSError):  # checkpoints/ itself once no run keeps any
                self.dir.parent.rmdir()


def _live_teacher(recipe: Recipe, teacher, memo, device: torch.device):
    from potstill.signals import OnlineTeacher

    if recipe.teacher.placed:  # on a device of its own or spread by a device map: it stays where it is
        return OnlineTeacher(teacher, memo=memo, out_device=device)
    return OnlineTeacher(teacher if is_sharded(teacher) else teacher.to(device), memo=memo)


def _trained_student(recipe: Recipe, trainer, blank: tuple, peft_config, device: torch.device):
    """The trained student as one plain model. Sharded, every process takes part in gathering the full weights
    and the first one keeps them (``None`` elsewhere)."""
    if recipe.train.distributed == "zero3":  # the float32 master weights, also under bf16
        state = zero3_full_state(trainer.model_wrapped)
    elif recipe.train.distributed == "fsdp2":
        state = trainer.accelerator.get_state_dict(trainer.model)
    else:
        # without accelerate's autocast wrapper: a fresh bf16 student is evaluated in fp32, like a reloaded one
        return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return _consolidated(*blank, peft_config, state, device) if is_main_process() else None


def _run_info(recipe, run, trainer, teacher, source, extra_teachers, student_sharded: bool, seconds: float) -> dict:
    """What ``train_info.json`` says of a run beyond its loss curve: tokens, processes, teachers, on-policy."""
    info: dict[str, Any] = {}
    if hasattr(trainer, "loss_tokens"):  # the first process's tokens that carried loss, and their rate
        info["loss_tokens"] = trainer.loss_tokens
        info["loss_tokens_per_s"] = round(trainer.loss_tokens / seconds, 1) if seconds > 0 else None
        info["padding_share"] = trainer.padding_share
        info["student_tokens"] = trainer.student_tokens
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
        if run.multi_teacher.mode == "student_aware":  # how the student split its attention between teachers
            info["teacher_mean_weights"] = source.mean_weights
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
    return info


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


def _multi_source(recipe: Recipe, run: RunConfig, source, extra: list, tokenizer, student, device, vocab_size):
    """The teacher's source and the extra teachers behind one MultiTeacher (see ``train_run``)."""
    from potstill.models import output_head
    from potstill.signals import MultiTeacher, OnlineTeacher
    from potstill.signals.cross import CrossTokenizerTeacher

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
        tau=mt.tau,
        favor=mt.favor,
        ema=mt.ema,
        temperature=run.temperature,
        vocab_size=vocab_size,
        chunk_size=recipe.train.chunk_size,
    )


def _watch(recipe: Recipe, run: RunConfig, trainer, teacher, tokenizer, out_dir: Path, eval_examples, vocab_size):
    """Trackers write under ``<output_dir>/logs/<run>``; with ``train.eval_steps`` the held-out figures are measured
    during training (:class:`potstill.tracking.HeldOutEval`, returned; None without)."""
    from potstill.tracking import HeldOutEval, place_tracker_logs

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
    recipe: Recipe,
    run: RunConfig,
    student,
    teacher,
    tokenizer,
    ds,
    out_dir: Path,
    device: torch.device,
    cross: dict,
    source=None,
):
    """One cross-tokenizer run: a live teacher (:class:`potstill.kd.cross_tokenizer.CrossTokenizerKDTrainer`)
    or, with ``source`` (a cache in the teacher's tokens), :class:`~potstill.kd.KDTrainer` on the cache seen
    through the vocabulary map (:class:`potstill.signals.cache.cross.CrossTokenizerCache`): the same loss."""
    _, trainer_class = method_classes(run)
    if "teacher_tokenizer" not in cross:
        raise PotstillError(
            f"run {run.name} uses method cross_tokenizer but the student shares the teacher's tokenizer; "
            "use another method or a student with its own tokenizer"
        )
    ct, sc = run.cross_tokenizer, _Scratch.of(recipe, run, out_dir)
    from_cache = source is not None
    own = run.uses_teacher and (from_cache or ct.teacher_view == "own")
    try:
        if own:  # the teacher's own encoding of each pair, from the cache or live; rows aligned on the response
            from potstill.kd import KDTrainer
            from potstill.models import output_head
            from potstill.signals.cache.cross import CrossTokenizerCache, OwnViewTeacher

            v_s = output_head(student).weight.shape[0]
            source = (CrossTokenizerCache if source is not None else OwnViewTeacher)(
                source if source is not None else teacher.to(device),
                student_tokenizer=tokenizer,
                teacher_tokenizer=cross["teacher_tokenizer"],
                teacher_examples=cross["teacher_examples"],
                example_map=cross["example_map"],
                vocab_map=cross["vocab_map"],
                student_vocab=v_s,
                kinds=tuple(ct.kinds),
                temperature=run.temperature,
            )
            trainer = KDTrainer(
                model=student,
                signal_source=source,
                args=kd_config(recipe, run, str(sc.dir), device),
                train_dataset=ds,
                processing_class=tokenizer,
                vocab_size=v_s,
            )
        else:
            trainer = trainer_class(
                student,
                teacher_model=teacher.to(device),
                args=kd_config(recipe, run, str(sc.dir), device),
                teacher_tokenizer=cross["teacher_tokenizer"],
                method=ct.align,
                vocab_map=cross.get("vocab_map"),
                kinds=tuple(ct.kinds),
                max_teacher_length=ct.max_teacher_length,
                processing_class=tokenizer,
                train_dataset=ds,
            )
        _watch(recipe, run, trainer, None, tokenizer, out_dir, None, None)
        seconds = sc.fit(trainer, run.name)
        # without accelerate's autocast wrapper: a fresh bf16 student is evaluated in fp32, like a reloaded one
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    finally:
        sc.drop_unless_saving()
    curve = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    info = {
        "loss_curve": curve,
        "train_seconds": seconds,
        "run": run.model_dump(mode="json"),
        "cross_tokenizer": source.coverage() if own else trainer.coverage_stats(),
    }
    if own:
        info.update(teacher_view="own", teacher_tokens=source.forward_tokens)
        if from_cache:
            info["teacher_signal"] = "cache"
    sc.save(model, tokenizer, out_dir, info)
    return model, curve
