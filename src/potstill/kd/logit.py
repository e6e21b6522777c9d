"""White-box logit distillation: ``KDConfig`` + ``KDTrainer``.

Loss per optimizer step (Hinton et al. 2015; the divergence family of GKD / DistiLLM / ABKD):

    L = [ alpha * sum_t CE(y_t, q_t) + (1 - alpha) * s * sum_t D(p_t, q_t) ] / N_global

with ``p = softmax(teacher / T)``, ``q = softmax(student / T)``, ``s = T^2`` when
``scale_t2`` else 1, the sums over response tokens of the micro-batch, and ``N_global``
the number of response tokens across all micro-batches of the step and all processes
(Trainer's ``num_items_in_batch``), so gradient accumulation and data parallelism give
the gradients of one big batch (TRL #4719). ``alpha = 1`` is the SFT baseline: no
teacher forward at all.

The maths lives in :mod:`potstill.divergences`; this file only wires the student's final
hidden states, the teacher's signal and the chunked reducer into ``transformers.Trainer``.
``loss_backend="liger"`` computes the same loss through Liger-Kernel's fused linear JSD instead
(:mod:`potstill.divergences.liger`; CUDA, a live teacher, forward/reverse KL or JSD).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import Trainer, TrainingArguments

from ..data.packing import forward_kwargs
from ..distributed import global_rows
from ..divergences import DIVERGENCES, check_divergence_params, check_temperature, chunked_kd_loss
from ..divergences.chunked import full_head
from ..divergences.liger import LIGER_DIVERGENCES, check_liger_inputs, liger_kd_loss, require_liger
from ..errors import PotstillError, VocabMismatchError
from ..signals import OnlineTeacher, SignalSource, target_index, target_rows
from .adaptive import (
    CURRICULA,
    ORDER_CURRICULA,
    TOKEN_WEIGHTINGS,
    curriculum_order,
    example_divergences,
    scheduled,
    token_weights,
)
from .guards import NonFiniteGuard
from .keypoint import progressive_fraction, rationale_row_weights


@dataclass
class KDConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation loss (TRL-style: one config per trainer)."""

    alpha: float = field(
        default=0.0, metadata={"help": "Weight of cross-entropy on labels; 1 - alpha weights the divergence."}
    )
    divergence: str = field(default="forward_kl", metadata={"help": f"One of {sorted(DIVERGENCES)}."})
    divergence_kwargs: dict | None = field(
        default=None, metadata={"help": "Parameters of the divergence (beta, alpha, mu...)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Distillation temperature (not the generation temperature)."}
    )
    scale_t2: bool = field(default=False, metadata={"help": "Multiply the divergence term by T^2."})
    chunk_size: int = field(default=256, metadata={"help": "Token rows per chunk of the fused lm_head + loss."})
    token_weighting: str = field(default="none", metadata={"help": f"Per-token KD weights: one of {TOKEN_WEIGHTINGS}."})
    token_weighting_ratio: float = field(default=0.5, metadata={"help": "student_entropy: share of positions kept."})
    alpha_end: float | None = field(
        default=None, metadata={"help": "Scheduled CE weight at the last step (None: fixed)."}
    )
    temperature_end: float | None = field(default=None, metadata={"help": "Scheduled temperature at the last step."})
    schedule: str = field(
        default="linear", metadata={"help": "Shape of the alpha/temperature schedules: linear, cosine."}
    )
    curriculum: str = field(
        default="none",
        metadata={"help": f"Example order by initial divergence, or in-rationale progressive (KPOD): {CURRICULA}."},
    )
    progressive_start: float = field(
        default=0.25, metadata={"help": "progressive_rationale: share of each rationale's last steps at the start."}
    )
    progressive_ramp: float = field(
        default=0.5, metadata={"help": "progressive_rationale: share of training over which all steps join."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep dataset columns (the collator picks)."})
    loss_backend: Literal["potstill", "liger"] = field(
        default="potstill",
        metadata={
            "help": (
                "Who computes the loss: 'potstill' (the chunked reducer, every divergence and signal) or 'liger' (Liger-Kernel's "
                "fused linear JSD, the same loss: CUDA, pip install 'potstill[liger]', a live teacher, "
                f"{', '.join(LIGER_DIVERGENCES)}, no token weighting; batches with alpha = 1 are plain CE by the reducer)."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise PotstillError(f"alpha={self.alpha} is outside [0, 1]; alpha weights CE and 1 - alpha the divergence")
        if self.divergence not in DIVERGENCES:
            raise PotstillError(f"unknown divergence '{self.divergence}'; use one of {sorted(DIVERGENCES)}")
        checked_params(self.divergence, self.divergence_kwargs)
        for name in ("temperature", "temperature_end"):
            if getattr(self, name) is not None:
                try:
                    check_temperature(getattr(self, name), name)
                except ValueError as err:
                    raise PotstillError(str(err)) from None
        if self.chunk_size < 1:
            raise PotstillError(f"chunk_size={self.chunk_size} must be >= 1")
        if self.token_weighting not in TOKEN_WEIGHTINGS:
            raise PotstillError(f"unknown token_weighting '{self.token_weighting}'; use one of {TOKEN_WEIGHTINGS}")
        if not 0.0 < self.token_weighting_ratio <= 1.0:
            raise PotstillError(f"token_weighting_ratio={self.token_weighting_ratio} must be in (0, 1]")
        if self.alpha_end is not None and not 0.0 <= self.alpha_end <= 1.0:
            raise PotstillError(f"alpha_end={self.alpha_end} is outside [0, 1]")
        if self.curriculum not in CURRICULA:
            raise PotstillError(f"unknown curriculum '{self.curriculum}'; use one of {CURRICULA}")
        progressive_fraction(0.0, self.progressive_start, self.progressive_ramp)  # one-line error when out of range
        if self.schedule not in ("linear", "cosine"):
            raise PotstillError(f"unknown schedule '{self.schedule}'; use linear or cosine")
        if self.loss_backend not in ("potstill", "liger"):
            raise PotstillError(f"unknown loss_backend '{self.loss_backend}'; use potstill or liger")
        if self.loss_backend == "liger":
            if self.divergence not in LIGER_DIVERGENCES:
                raise PotstillError(
                    f"loss_backend 'liger' computes {', '.join(LIGER_DIVERGENCES)} only (Liger's fused JSD), not "
                    f"{self.divergence}; use loss_backend 'potstill' (the default)"
                )
            if self.token_weighting != "none" or self.curriculum == "progressive_rationale":
                raise PotstillError(
                    f"loss_backend 'liger' has no per-token KD weights (token_weighting '{self.token_weighting}'); "
                    "use loss_backend 'potstill' or token_weighting none"
                )


def checked_params(divergence: str, params: dict | None) -> None:
    """Degenerate or undefined divergence parameters (GKD's JSD at beta 0 is identically 0, ...) as a one-line
    ``PotstillError``, so the Python API refuses what a recipe refuses."""
    try:
        check_divergence_params(divergence, dict(params or {}))
    except ValueError as err:
        raise PotstillError(str(err)) from None


def _vocab_rows(model: torch.nn.Module) -> int:
    from ..models import output_head

    return global_rows(output_head(model).weight)


class KDTrainer(NonFiniteGuard, Trainer):
    """``transformers.Trainer`` whose loss is CE + a divergence to a teacher.

    ``KDTrainer(model=student, teacher_model=teacher, args=KDConfig(...), train_dataset=...,
    processing_class=tokenizer)``. Instead of ``teacher_model`` a ``signal_source`` (e.g. a
    cache) may be given; trainers never branch on which one it is. ``peft_config`` wraps
    the student with a LoRA adapter (through ``peft``). A NaN or inf loss or gradient norm stops
    the run before that optimizer step (:mod:`potstill.kd.guards`), in every subclass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        teacher_model: torch.nn.Module | None = None,
        args: KDConfig | None = None,
        *,
        signal_source: SignalSource | None = None,
        peft_config: Any | None = None,
        data_collator=None,
        processing_class=None,
        vocab_size: int | None = None,
        **kwargs,
    ):
        if args is None:
            args = KDConfig(output_dir="kd_output")
        if not isinstance(args, KDConfig):
            raise PotstillError("KDTrainer needs args=KDConfig(...); TrainingArguments has no distillation fields")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if data_collator is None:
            if processing_class is None:
                raise PotstillError("KDTrainer needs processing_class=tokenizer (or a data_collator) to pad batches")
            from ..data import PadCollator

            pad = processing_class.pad_token_id
            if pad is None:
                pad = processing_class.eos_token_id
            data_collator = PadCollator(pad)
        self.needs_teacher = args.alpha < 1.0 or (args.alpha_end is not None and args.alpha_end < 1.0)
        if self.needs_teacher and teacher_model is None and signal_source is None:
            raise PotstillError(
                f"alpha={args.alpha} < 1 needs a teacher; pass teacher_model=... or signal_source=..., or set alpha=1 (SFT)"
            )
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        # Our loss is normalized by the global token count: let Trainer count it and not rescale.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

        self.teacher_model = teacher_model
        self.signal_source: SignalSource | None = None
        if self.needs_teacher:
            if signal_source is None:
                teacher_model.to(self.args.device)
                signal_source = OnlineTeacher(teacher_model)
            self.signal_source = signal_source
        source_t = getattr(self.signal_source, "temperature", None)
        if self.needs_teacher and source_t is not None and args.temperature_end is not None:
            raise PotstillError(
                f"the teacher signal holds one temperature ({source_t}); a temperature schedule needs a live "
                "teacher or a dense cache: remove temperature_end or the cache"
            )
        if self.needs_teacher and source_t is not None and float(source_t) != float(args.temperature):
            raise PotstillError(
                f"the teacher signal holds temperature {source_t} but temperature={args.temperature}; "
                "distill at the signal's temperature or rebuild the cache at this one"
            )
        if vocab_size is None:
            vocab_size = self._aligned_vocab(
                model, teacher_model, processing_class, getattr(self.signal_source, "vocab_size", None)
            )
        self.vocab_size = vocab_size
        self._stats: dict[str, float] = {"ce_sum": 0.0, "kd_sum": 0.0, "n_tokens": 0.0}
        self._logged_tokens = 0.0  # loss tokens of the intervals already logged
        self._slots = [0, 0]  # [token slots of the training batches, real tokens among them]
        self._interval_t0: float | None = None  # when the current logging interval's first step began
        if args.loss_backend == "liger":
            self._check_liger_backend(model)

    def _check_liger_backend(self, model) -> None:
        """What ``loss_backend='liger'`` cannot run on, refused before training in one line."""
        from ..models import output_head

        name = type(self).__name__
        if type(self).compute_loss is not KDTrainer.compute_loss:
            raise PotstillError(
                f"loss_backend 'liger' is wired into KDTrainer's loss only and {name} computes its own; "
                "use loss_backend 'potstill'"
            )
        if self.needs_teacher and not isinstance(self.signal_source, OnlineTeacher):
            raise PotstillError(
                f"loss_backend 'liger' fuses the teacher's lm_head, so it needs a live teacher (teacher_model=...), "
                f"not a cached or top-k signal ({type(self.signal_source).__name__}); use loss_backend 'potstill'"
            )
        heads = [("student", output_head(model))]
        if self.needs_teacher:
            heads.append(("teacher", self.signal_source.head))
        for who, head in heads:
            if head.softcap is not None:
                raise PotstillError(
                    f"the {who}'s head softcaps its logits ({head.softcap}), which Liger's fused JSD cannot apply; "
                    "use loss_backend 'potstill'"
                )
        try:
            require_liger(self.args.device)
        except RuntimeError as err:
            raise PotstillError(str(err)) from None

    # ------------------------------------------------------------------ vocab alignment
    def _aligned_vocab(self, student, teacher, tokenizer, source_vocab: int | None = None) -> int | None:
        if not self.needs_teacher or (teacher is None and source_vocab is None):
            return None
        vs = _vocab_rows(student)
        vt = _vocab_rows(teacher) if teacher is not None else int(source_vocab)
        if vs == vt:
            return None
        v = min(vs, vt)
        n_tok = len(tokenizer) if tokenizer is not None else None
        if n_tok is None or n_tok > v:
            raise VocabMismatchError(
                f"teacher has {vt} vocab rows and student {vs}, and the tokenizer ({n_tok} tokens) does not fit in "
                f"the smaller; use the teacher's tokenizer for the student or a cross-tokenizer method"
            )
        warnings.warn(
            f"teacher ({vt}) and student ({vs}) vocab rows differ only by padding; comparing the first {v}",
            stacklevel=2,
        )
        return v

    # --------------------------------------------------------------------------- loss
    def teacher_sources(self) -> list:
        """Every signal source this trainer asks (for the teacher tokens a run read; subclasses add their own)."""
        return [self.signal_source]

    def _batch_signal(self, inputs: dict, student=None):
        """The teacher's signal for a batch (subclasses route generated batches elsewhere). ``student``
        (``(rows [n, H] detached, head)``) reaches a source that weighs its teachers by the student's current
        distributions (``wants_student``, e.g. multi-teacher mode ``student_aware``)."""
        if student is not None and getattr(self.signal_source, "wants_student", False):
            return self.signal_source.signal(inputs, student=student)
        return self.signal_source.signal(inputs)

    # ------------------------------------------------------------------ curriculum
    def get_train_dataloader(self):
        if self.args.curriculum in ORDER_CURRICULA and getattr(self, "curriculum_scores", None) is None:
            if self.signal_source is None:
                raise PotstillError("a curriculum ranks examples by the teacher-student divergence; set alpha < 1")
            collator = getattr(self.data_collator, "unpacked", self.data_collator)  # scores per example
            scores = example_divergences(
                self.model,
                self.signal_source,
                self.train_dataset,
                collator,
                vocab=self.vocab_size,
                temperature=self.args.temperature,
                batch_size=self.args.per_device_train_batch_size,
                chunk_size=self.args.chunk_size,
            )
            self.curriculum_scores = scores
            self.curriculum_order = curriculum_order(scores, self.args.curriculum)
            self.train_dataset = self.train_dataset.select(self.curriculum_order)
        return super().get_train_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        if self.args.curriculum in ORDER_CURRICULA:
            from torch.utils.data import SequentialSampler

            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _student_hidden(self, model, inputs: dict):
        """The student's final hidden states ``[B, T, H]`` (subclasses keep other layers too)."""
        from ..models import final_hidden

        return final_hidden(model, inputs["input_ids"], inputs["attention_mask"], **forward_kwargs(inputs))

    def _progress(self) -> float:
        """Share of training done, in [0, 1] (optimizer steps / max steps)."""
        total = max(int(getattr(self.state, "max_steps", 0) or 0), 1)
        return min(self.state.global_step / total, 1.0)

    def _batch_alpha(self, inputs: dict) -> float:
        """The CE weight for a batch (scheduled; subclasses drop CE on the student's own samples)."""
        return scheduled(self.args.alpha, self.args.alpha_end, self._progress(), self.args.schedule)

    def _temperature(self) -> float:
        return scheduled(self.args.temperature, self.args.temperature_end, self._progress(), self.args.schedule)

    def _kd_weights(self, signal, rows, head, targets, temperature: float, inputs: dict | None = None):
        """Per-row divergence weights (:mod:`potstill.kd.adaptive`), times the batch's rationale-KD factors
        (:mod:`potstill.kd.keypoint`: keypoint weights, progressive step mask), times 0 on rows the signal
        marks as not ``valid`` (a teacher seen through another tokenizer), or None."""
        if signal is None:
            return None
        w = self._method_weights(signal, rows, head, targets, temperature, inputs)
        valid = getattr(signal, "valid", None)
        if valid is None:
            return w
        mask = valid.to(device=rows.device, dtype=torch.float32)
        return mask if w is None else w * mask

    def _method_weights(self, signal, rows, head, targets, temperature: float, inputs: dict | None):
        args = self.args
        progressive = args.curriculum == "progressive_rationale"
        rationale = rationale_row_weights(
            inputs,
            keypoint=args.token_weighting == "keypoint",
            fraction=progressive_fraction(self._progress(), args.progressive_start, args.progressive_ramp)
            if progressive
            else None,
        )
        if args.token_weighting in ("none", "keypoint"):
            return rationale
        vocab = self.vocab_size if self.vocab_size is not None else head.vocab
        w = token_weights(
            self.args.token_weighting,
            signal=signal,
            rows=rows,
            head=head,
            labels=targets,
            vocab=vocab,
            temperature=temperature,
            ratio=self.args.token_weighting_ratio,
            chunk_size=self.args.chunk_size,
        )
        return w if rationale is None else w * rationale

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from ..models import output_head

        labels = inputs["labels"]
        index = target_index(labels)
        hidden = self._student_hidden(model, inputs)
        rows = target_rows(hidden, index)
        targets = labels[:, 1:].reshape(-1).index_select(0, index)
        alpha = self._batch_alpha(inputs)
        head = full_head(output_head(model))  # FSDP2: gathered once here, for the reducer and the token weights
        wanted = self.needs_teacher and alpha < 1.0
        signal = self._batch_signal(inputs, student=(rows.detach(), head)) if wanted else None
        if signal is not None and signal.num_rows != rows.shape[0]:
            raise PotstillError(
                f"teacher signal has {signal.num_rows} rows for {rows.shape[0]} target tokens; the signal does not "
                "match this batch (rebuild the cache for this data)"
            )
        normalizer = num_items_in_batch if num_items_in_batch is not None else max(int(index.numel()), 1)
        args: KDConfig = self.args
        temperature = self._temperature()
        common = dict(
            divergence=args.divergence,
            divergence_kwargs=args.divergence_kwargs or {},
            alpha=alpha,
            temperature=temperature,
            scale_t2=args.scale_t2,
            normalizer=normalizer,
            chunk_size=args.chunk_size,
            vocab_size=self.vocab_size,
        )
        if args.loss_backend == "liger" and signal is not None:
            if getattr(signal, "valid", None) is not None:
                raise PotstillError(
                    f"loss_backend 'liger' has no per-row weights for the rows {type(self.signal_source).__name__} "
                    "could not align; use loss_backend 'potstill'"
                )
            try:
                check_liger_inputs(head, signal, args.divergence, args.divergence_kwargs)
            except ValueError as err:
                raise PotstillError(str(err)) from None
            loss, stats = liger_kd_loss(rows, head, targets, signal, **common)
        else:  # also alpha = 1 under 'liger': plain CE, no teacher to fuse
            loss, stats = chunked_kd_loss(
                rows,
                head,
                targets,
                signal,
                **common,
                kd_weights=self._kd_weights(signal, rows, head, targets, temperature, inputs),
            )
        if num_items_in_batch is not None and args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # DDP averages gradients over processes; the loss is already divided by the global count.
            loss = loss * self.accelerator.num_processes
        for k in ("ce_sum", "kd_sum", "n_tokens"):
            self._stats[k] += float(stats[k])
        self._count_slots(model, inputs)
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    @property
    def loss_tokens(self) -> int:
        """Tokens that carried loss on this process so far (training steps)."""
        return int(self._logged_tokens + self._stats["n_tokens"])

    def _count_slots(self, model, *batches: dict) -> None:
        """In training: the token slots the student computed, and how many of them held a token."""
        if model.training:
            for b in batches:
                self._slots[0] += int(b["input_ids"].numel())
                self._slots[1] += int(b["attention_mask"].sum())

    @property
    def student_tokens(self) -> int:
        """Tokens (padding excluded) the student read in training steps on this process so far."""
        return int(self._slots[1])

    @property
    def padding_share(self) -> float | None:
        """Share of the training batches' token slots that held padding (data.packing lowers it)."""
        slots, real = self._slots
        return round(1.0 - real / slots, 4) if slots else None

    def training_step(self, *args, **kwargs):
        if self._interval_t0 is None:
            self._interval_t0 = time.perf_counter()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        n = self._stats["n_tokens"]
        if "loss" in logs and n > 0:
            logs["ce_per_token"] = round(self._stats["ce_sum"] / n, 6)
            if self.needs_teacher:
                logs["kd_per_token"] = round(self._stats["kd_sum"] / n, 6)
            if self._interval_t0 is not None:  # this process's loss tokens per second since the last log
                now = time.perf_counter()
                logs["loss_tokens_per_s"] = round(n / max(now - self._interval_t0, 1e-9), 1)
                self._interval_t0 = now
            self._logged_tokens += n
            self._stats = {k: 0.0 for k in self._stats}
        super().log(logs, *args, **kwargs)
