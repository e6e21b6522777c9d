"""Cross-tokenizer distillation: teacher and student read the same text through different tokenizers.

Three pieces, then a trainer:

1. **Alignment by character offsets** (:mod:`potstill.data.cross_tokenizer`): the teacher reads
   the text the student's ids decode to; student and teacher positions that have read the same
   text and predict the text that follows are paired. All other student rows are *unaligned* and
   get cross-entropy only.
2. **Vocabulary map** (:mod:`potstill.models.vocab_map`; the projection of GOLD / NeMo-RL's
   cross-tokenizer KD, with a MinED-style fallback after FuseLLM, Wan et al. 2024): every teacher
   token gets a student token and a match kind; :func:`project_teacher` sums the teacher's
   probabilities onto student ids.
3. **ULD** (:mod:`potstill.divergences.uld`; Boizard et al. 2024): a Wasserstein-1 closed form on
   sorted probabilities that needs no vocabulary map at all.

:class:`CrossTokenizerKDTrainer` puts them together: CE on every target row, and on aligned rows a
library divergence to the projected teacher (``method="vocab_map"``) or the ULD loss. The public
names of the three pieces are re-exported here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.cross_tokenizer import (
    CrossTokenizerAligner,
    CrossTokenizerCollator,
    align_positions,
    target_alignment,
    teacher_view,
    token_starts,
)
from ..divergences import DIVERGENCES
from ..divergences.uld import uld_from_target, uld_loss, uld_teacher_target
from ..errors import PotstillError
from ..models.vocab_map import (
    DEFAULT_KINDS,
    KINDS,
    LOG_FLOOR,
    MatchKind,
    VocabMap,
    build_vocab_map,
    mass_by_kind,
    project_teacher,
    special_ids,
    token_bytes,
)
from ..signals import target_index, target_rows
from .logit import KDConfig, KDTrainer

Method = Literal["uld", "vocab_map"]


# --------------------------------------------------------------------------- trainer


class CrossTokenizerKDTrainer(KDTrainer):
    """KD between a teacher and a student with different tokenizers.

    Per optimizer step, with ``N`` the global number of target tokens (``num_items_in_batch``)::

        L = [ alpha * sum_{target rows} CE + (1 - alpha) * s * sum_{aligned rows} D ] / N

    ``D`` is ``args.divergence`` between the student and the projected teacher
    (``method="vocab_map"``; rows whose mapped teacher mass is 0 are skipped) or :func:`uld_loss`
    (``method="uld"``); ``s = T^2`` when ``args.scale_t2``. Unaligned rows add CE only, so keep
    ``alpha > 0`` to train them (the end-of-turn token is always unaligned). Temperature and alpha
    follow KDConfig's schedules; the teacher projection is taken at the distillation temperature.

    The teacher runs once per batch without grad on ``teacher_input_ids`` (built by the default
    :class:`CrossTokenizerCollator`); its hidden states of aligned rows go through its head in
    chunks of ``args.chunk_size`` rows: ``[chunk, V_t]`` teacher logits exist for one chunk at a
    time and are reduced at once to a ``[chunk, V_s]`` target (projected log-probs, or ULD's sorted
    top ``min(V_s, V_t)``), which is what stays alive until backward. Each chunk's student head +
    loss runs under activation checkpointing (recomputed in backward), so the student's
    ``[chunk, V_s]`` intermediates are not kept either.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        teacher_model: torch.nn.Module | None = None,
        args: KDConfig | None = None,
        *,
        teacher_tokenizer=None,
        method: Method = "vocab_map",
        vocab_map: VocabMap | None = None,
        kinds: Sequence[MatchKind] = DEFAULT_KINDS,
        max_teacher_length: int | None = None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        if method not in ("uld", "vocab_map"):
            raise PotstillError(f"unknown cross-tokenizer method '{method}'; use 'uld' or 'vocab_map'")
        bad = [k for k in kinds if k not in DEFAULT_KINDS]
        if bad or not kinds:
            raise PotstillError(f"kinds={list(kinds)} must be a non-empty subset of {list(DEFAULT_KINDS)}")
        if kwargs.get("signal_source") is not None:
            raise PotstillError(
                "cross-tokenizer KD runs a live teacher on its own tokens; pass teacher_model=..., "
                "not a signal_source (caches are keyed by student tokens)"
            )
        # Both rank or weight rows with a same-vocabulary teacher signal, which does not exist here.
        for option in ("token_weighting", "curriculum"):
            if args is not None and getattr(args, option, "none") != "none":
                raise PotstillError(f"{option} is not supported with cross-tokenizer KD; set {option}=none")
        alpha_end = getattr(args, "alpha_end", None) if args is not None else None
        needs = args is None or args.alpha < 1.0 or (alpha_end is not None and alpha_end < 1.0)
        if needs and teacher_tokenizer is None:
            raise PotstillError("cross-tokenizer KD needs teacher_tokenizer=... (the teacher's own tokenizer)")
        if processing_class is None and data_collator is None:
            raise PotstillError("CrossTokenizerKDTrainer needs processing_class=student_tokenizer to pad batches")
        if data_collator is None and teacher_tokenizer is not None:
            data_collator = CrossTokenizerCollator(
                processing_class, teacher_tokenizer, max_teacher_length=max_teacher_length
            )
        from ..models import output_head

        v_s = output_head(model).weight.shape[0]
        # vocab_size is given, so KDTrainer skips its same-vocabulary check (which would refuse).
        super().__init__(
            model,
            teacher_model,
            args,
            data_collator=data_collator,
            processing_class=processing_class,
            vocab_size=v_s,
            **kwargs,
        )
        self.method = method
        self.kinds = tuple(kinds)
        if self.needs_teacher and method == "vocab_map" and vocab_map is None:
            vocab_map = build_vocab_map(teacher_tokenizer, processing_class, student_vocab=v_s)
        self.vocab_map = vocab_map
        if self.needs_teacher and vocab_map is not None:
            v_t = output_head(teacher_model).weight.shape[0]
            if vocab_map.teacher_vocab > v_t:
                raise PotstillError(
                    f"the vocab map covers {vocab_map.teacher_vocab} teacher ids but the teacher head "
                    f"has {v_t} rows; build the map from the teacher's own tokenizer"
                )
            if int(vocab_map.student_ids.max()) >= v_s:
                raise PotstillError(
                    f"the vocab map points past the student head ({v_s} rows); build it from the "
                    "student's own tokenizer"
                )
        self._coverage: dict[str, float] = {
            "rows": 0.0,
            "aligned": 0.0,
            "kd_rows": 0.0,
            **{f"mass_{k}": 0.0 for k in KINDS},
            "mass_used": 0.0,
        }

    # ----------------------------------------------------------------------- teacher side
    @torch.no_grad()
    def _teacher_rows(self, inputs: dict, row_map: Tensor, aligned: Tensor) -> Tensor:
        from ..models import final_hidden

        for key in ("teacher_input_ids", "teacher_attention_mask"):
            if key not in inputs:
                raise PotstillError(f"the batch has no {key}; use CrossTokenizerCollator (the trainer's default)")
        if self.teacher_model.training:
            self.teacher_model.eval()
        hidden = final_hidden(self.teacher_model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"])
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, row_map.index_select(0, aligned))

    @torch.no_grad()
    def _teacher_target(self, teacher_hidden: Tensor, head, temperature: float, v_s: int):
        """``[m, H_t]`` -> ``(target tensors, keep [m], coverage sums [len(KINDS) + 1])``.

        The ``[m, V_t]`` logits die here. Coverage sums: the teacher mass per kind and the mass used,
        summed over the ``m`` rows (zeros where there is no vocab map)."""
        logits = head(teacher_hidden).float()
        lp = torch.log_softmax(logits / temperature, dim=-1)
        sums = torch.zeros(len(KINDS) + 1, dtype=torch.float32, device=lp.device)
        if self.vocab_map is not None:
            sums[: len(KINDS)] = mass_by_kind(lp, self.vocab_map).sum(0)
        if self.method == "uld":
            top, tail = uld_teacher_target(logits, v_s, temperature)
            return (top, tail), torch.ones(lp.shape[0], dtype=torch.bool, device=lp.device), sums
        projected, mass = project_teacher(lp, self.vocab_map, v_s, self.kinds)
        sums[-1] = mass.sum()
        # Divergences apply log_softmax(x / T): T * log p_S gives back exactly p_S.
        return (projected * temperature,), mass > 0, sums

    # --------------------------------------------------------------------------- loss
    def _chunk_loss(self, head, y: Tensor, local: Tensor | None, keep: Tensor | None, temperature: float):
        args: KDConfig = self.args

        def run(h: Tensor, *target: Tensor) -> tuple[Tensor, Tensor]:
            logits = head(h).float()
            ce = F.cross_entropy(logits, y, reduction="sum")
            if local is None:
                return ce, torch.zeros((), dtype=ce.dtype, device=ce.device)
            student = logits.index_select(0, local)
            if self.method == "uld":
                kd = uld_from_target(student, target[0], target[1], temperature)
            else:
                kd = DIVERGENCES[args.divergence](
                    student, target[0], temperature=temperature, **(args.divergence_kwargs or {})
                )
            return ce, torch.where(keep, kd, torch.zeros((), dtype=kd.dtype, device=kd.device)).sum()

        return run

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from torch.utils.checkpoint import checkpoint

        from ..models import output_head

        labels = inputs["labels"]
        index = target_index(labels)
        rows = target_rows(self._student_hidden(model, inputs), index)
        targets = labels[:, 1:].reshape(-1).index_select(0, index)
        n = rows.shape[0]
        alpha = self._batch_alpha(inputs)
        temperature = self._temperature()
        args: KDConfig = self.args
        head = output_head(model)
        v_s = head.vocab
        use_teacher = self.needs_teacher and alpha < 1.0
        aligned = torch.zeros(0, dtype=torch.long, device=rows.device)
        if use_teacher:
            if "teacher_positions" not in inputs:
                raise PotstillError("the batch has no teacher_positions; use CrossTokenizerCollator (the default)")
            row_map = target_alignment(labels, inputs["teacher_positions"], inputs["teacher_input_ids"].shape[1])
            aligned = (row_map >= 0).nonzero().squeeze(1)
            t_rows = self._teacher_rows(inputs, row_map, aligned) if aligned.numel() else None
            t_head = output_head(self.teacher_model)
        ce_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        kd_rows = torch.zeros((), dtype=torch.long, device=rows.device)
        coverage = torch.zeros(len(KINDS) + 1, dtype=torch.float32, device=rows.device)
        bounds = aligned.tolist()
        for start in range(0, n, args.chunk_size):
            end = min(start + args.chunk_size, n)
            lo, hi = bisect_left(bounds, start), bisect_left(bounds, end)
            local, keep, target = None, None, ()
            if use_teacher and hi > lo:
                target, keep, sums = self._teacher_target(t_rows[lo:hi], t_head, temperature, v_s)
                local = aligned[lo:hi] - start
                kd_rows = kd_rows + keep.sum()
                coverage = coverage + sums
            run = self._chunk_loss(head, targets[start:end], local, keep, temperature)
            h = rows[start:end]
            if torch.is_grad_enabled() and h.requires_grad:
                ce, kd = checkpoint(run, h, *target, use_reentrant=False)
            else:
                ce, kd = run(h, *target)
            ce_sum = ce_sum + ce
            kd_sum = kd_sum + kd
        kd_scale = temperature**2 if args.scale_t2 else 1.0
        total = alpha * ce_sum + (1.0 - alpha) * kd_scale * kd_sum
        if n == 0:
            total = total + rows.sum() * 0.0  # keep the graph: Trainer calls backward on it
        norm = torch.as_tensor(
            num_items_in_batch if num_items_in_batch is not None else max(n, 1), dtype=torch.float32, device=rows.device
        )
        loss = total / torch.where(norm == 0, torch.ones_like(norm), norm)
        if num_items_in_batch is not None and args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # DDP averages gradients over processes; the loss is already divided by the global count.
            loss = loss * self.accelerator.num_processes
        self._stats["ce_sum"] += float(ce_sum.detach())
        self._stats["kd_sum"] += float(kd_sum.detach())
        self._stats["n_tokens"] += float(n)
        self._coverage["rows"] += float(n)
        self._coverage["aligned"] += float(aligned.numel())
        self._coverage["kd_rows"] += float(kd_rows)
        for k, value in zip([f"mass_{k}" for k in KINDS] + ["mass_used"], coverage.tolist(), strict=True):
            self._coverage[k] += value
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    # -------------------------------------------------------------------------- stats
    def coverage_stats(self) -> dict[str, float]:
        """Accumulated over training: the target rows seen (``rows``), the share of them aligned (``aligned_row_share``) and given a
        KD term (``kd_row_share``); the teacher's mean probability mass per aligned row on tokens of
        each kind (``teacher_mass_<kind>``, at the distillation temperature, when a vocab map is
        set) and on the kinds used (``teacher_mass_used``, method ``vocab_map``)."""
        c = self._coverage
        rows, aligned = max(c["rows"], 1.0), max(c["aligned"], 1.0)
        out = {"rows": int(c["rows"]), "aligned_row_share": c["aligned"] / rows, "kd_row_share": c["kd_rows"] / rows}
        if self.vocab_map is not None:
            out.update({f"teacher_mass_{k}": c[f"mass_{k}"] / aligned for k in KINDS})
        if self.method == "vocab_map":
            out["teacher_mass_used"] = c["mass_used"] / aligned
        return out

    def potstill_state(self) -> dict:
        """What a resumed run needs beyond the Trainer's checkpoint: the coverage sums so far."""
        return {"coverage": self._coverage}

    def load_potstill_state(self, state: dict) -> None:
        self._coverage = dict(state["coverage"])

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._coverage["rows"] > 0:
            stats = self.coverage_stats()
            logs["aligned_row_share"] = round(stats["aligned_row_share"], 4)
            if "teacher_mass_used" in stats:
                logs["teacher_mass_used"] = round(stats["teacher_mass_used"], 4)
        super().log(logs, *args, **kwargs)


__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "LOG_FLOOR",
    "CrossTokenizerAligner",
    "CrossTokenizerCollator",
    "CrossTokenizerKDTrainer",
    "MatchKind",
    "VocabMap",
    "align_positions",
    "build_vocab_map",
    "mass_by_kind",
    "project_teacher",
    "special_ids",
    "target_alignment",
    "teacher_view",
    "token_bytes",
    "token_starts",
    "uld_loss",
    "uld_teacher_target",
]
