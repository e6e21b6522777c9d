"""Vision-language KD: a VLM teacher distilled into a VLM student on the text tokens of image-text examples.

Loss per optimizer step -- :mod:`potstill.kd.logit`'s (Hinton et al. 2015, eq. 1 with the GKD / DistiLLM
divergence family), restricted to text tokens::

    L = [ alpha * sum_j CE(y_j, q_j) + (1 - alpha) * s * sum_j D(p_j, q_j) ] / N_global

``j`` runs over the loss-carrying text tokens (answer, or all text with ``loss_on="text"``) of the micro-batch;
``p_j = softmax(teacher(row predicting text token j) / T)`` is read at the teacher's own position of token ``j``
and ``q_j`` at the student's. Each model sees the image through its own processor, so the two sequences have
different lengths (different image-token expansions): :class:`potstill.data.vlm.VLMPairCollator` aligns text
token ``j`` of the teacher with text token ``j`` of the student (one tokenizer, checked) and gives every image
token the label ``-100``. Rows predicting an image token therefore carry no loss on either side; the row that
predicts the first text token after an image (the image span's last position) does.

Shapes: student ``input_ids [B, Ts]`` -> hidden ``[B, Ts, Hs]`` -> rows ``[n, Hs]``; teacher ``teacher_input_ids
[B, Tt]`` -> hidden ``[B, Tt, Ht]`` -> rows ``[n, Ht]`` (a :class:`DenseSignal` with the teacher's head); both
``n`` = loss-carrying text tokens, in the same (example, token ``j``) order. The rows go through the one chunked
reducer (:func:`potstill.divergences.chunked_kd_loss`), so ``[n, V]`` logits never exist whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.vlm import LOSS_ON, side_inputs
from ..divergences import chunked_kd_loss
from ..divergences.chunked import full_head
from ..errors import PotstillError, VocabMismatchError
from ..signals import target_index, target_rows
from ..signals.types import DenseSignal
from .logit import KDConfig, KDTrainer

__all__ = ["VLMKDConfig", "VLMKDTrainer", "VLMTeacher", "aligned_vlm_vocab", "vlm_forward_kl"]


@dataclass
class VLMKDConfig(KDConfig):
    """:class:`KDConfig` for image-text examples (``loss_on`` is the collator's, recorded here for the run)."""

    loss_on: str = field(
        default="answer", metadata={"help": f"Which text tokens carry loss: one of {LOSS_ON}; image tokens never."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_on not in LOSS_ON:
            raise PotstillError(f"unknown loss_on '{self.loss_on}'; use one of {LOSS_ON}")
        if self.curriculum != "none":
            raise PotstillError(
                f"curriculum '{self.curriculum}' ranks examples with the text collator; set curriculum none for VLM KD"
            )
        if self.loss_backend != "potstill":
            raise PotstillError("vision-language KD runs on loss_backend 'potstill' only; remove loss_backend")


class VLMTeacher:
    """A live VLM teacher behind ``source.signal(batch)``: runs on the batch's ``teacher_*`` encoding (its own
    processor's image tokens) and returns the final hidden rows ``[n, Ht]`` of the loss-carrying text tokens,
    with its output head, as a :class:`DenseSignal`."""

    def __init__(self, model: torch.nn.Module):
        from ..models import output_head

        self.model = model.eval()
        self.model.requires_grad_(False)
        self.head = output_head(self.model)

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    def to(self, device) -> VLMTeacher:
        from ..models import output_head

        self.model.to(device)
        self.head = output_head(self.model)
        return self

    @torch.no_grad()
    def signal(self, batch: dict) -> DenseSignal:
        from ..models import final_hidden

        if self.model.training:
            self.model.eval()
        ids, mask, labels, extras = side_inputs(batch, "teacher")
        hidden = final_hidden(self.model, ids, mask, **extras)
        return DenseSignal(hidden=target_rows(hidden, target_index(labels)), head=self.head)


def aligned_vlm_vocab(student: torch.nn.Module, teacher: torch.nn.Module, n_tokens: int) -> int | None:
    """The vocabulary both heads are compared on: ``None`` when their rows agree, else the smaller row count
    if the tokenizer's ``n_tokens`` fit in it (padding rows only), else ``VocabMismatchError``."""
    from ..models import output_head

    vs, vt = output_head(student).weight.shape[0], output_head(teacher).weight.shape[0]
    if vs == vt:
        return None
    if n_tokens > min(vs, vt):
        raise VocabMismatchError(
            f"teacher has {vt} vocab rows and student {vs}, and the tokenizer ({n_tokens} tokens) does not fit in "
            "the smaller; use a student of the teacher's tokenizer family"
        )
    return min(vs, vt)


class VLMKDTrainer(KDTrainer):
    """:class:`KDTrainer` on :class:`potstill.data.vlm.VLMPairCollator` batches: the student runs on the
    student's encoding (``pixel_values`` etc.), the teacher on ``teacher_*``; the loss path is KDTrainer's.

    ``VLMKDTrainer(model=student, teacher_model=teacher, args=VLMKDConfig(...), data_collator=VLMPairCollator(
    teacher_processor, student_processor), train_dataset=[{"image", "prompt", "answer"}, ...])``.
    """

    def __init__(self, model, teacher_model=None, args: VLMKDConfig | None = None, *, data_collator=None, **kwargs):
        if args is None:
            args = VLMKDConfig(output_dir="vlm_kd_output")
        if not isinstance(args, VLMKDConfig):
            raise PotstillError("VLMKDTrainer needs args=VLMKDConfig(...)")
        if data_collator is None or not hasattr(data_collator, "teacher_processor"):
            raise PotstillError(
                "VLMKDTrainer needs data_collator=VLMPairCollator(teacher_processor, student_processor)"
            )
        if data_collator.loss_on != args.loss_on:
            raise PotstillError(
                f"the collator puts loss on '{data_collator.loss_on}' tokens but args.loss_on is '{args.loss_on}'; "
                "make them agree"
            )
        if kwargs.get("signal_source") is not None:
            raise PotstillError("VLMKDTrainer runs a live VLM teacher; pass teacher_model=..., not signal_source")
        vocab = kwargs.pop("vocab_size", None)
        needs_teacher = args.alpha < 1.0 or (args.alpha_end is not None and args.alpha_end < 1.0)
        source = None
        if needs_teacher and teacher_model is not None:
            if vocab is None:
                vocab = aligned_vlm_vocab(model, teacher_model, len(data_collator.tokenizer))
            source = VLMTeacher(teacher_model)
        super().__init__(
            model, None, args, signal_source=source, data_collator=data_collator, vocab_size=vocab, **kwargs
        )
        self.teacher_model = teacher_model
        if source is not None:
            source.to(self.args.device)

    def _student_hidden(self, model, inputs: dict):
        """The student's final hidden states ``[B, Ts, Hs]`` on its own encoding (image inputs included)."""
        from ..models import final_hidden

        ids, mask, _, extras = side_inputs(inputs, "student")
        return final_hidden(model, ids, mask, **extras)


@torch.no_grad()
def vlm_forward_kl(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    examples: Sequence[dict],
    collator,
    *,
    batch_size: int = 8,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> float:
    """Mean forward KL ``KL(p_teacher || q_student)`` per loss-carrying text token over ``examples``
    (the held-out metric: sum over aligned rows / their number; image tokens excluded by the collator)."""
    from ..models import final_hidden, output_head

    if not examples:
        raise PotstillError("no held-out examples to evaluate the forward KL on; add evaluation data")
    was = student.training
    student.eval()
    source = VLMTeacher(teacher)
    device = next(student.parameters()).device
    vocab = aligned_vlm_vocab(student, teacher, len(collator.tokenizer))
    kd, n = 0.0, 0.0
    try:
        for i in range(0, len(examples), batch_size):
            batch = collator(list(examples[i : i + batch_size]))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            ids, mask, labels, extras = side_inputs(batch, "student")
            index = target_index(labels)
            rows = target_rows(final_hidden(student, ids, mask, **extras), index)
            targets = labels[:, 1:].reshape(-1).index_select(0, index)
            _, stats = chunked_kd_loss(
                rows,
                full_head(output_head(student)),
                targets,
                source.signal(batch),
                divergence="forward_kl",
                alpha=0.0,
                temperature=temperature,
                normalizer=1.0,
                chunk_size=chunk_size,
                vocab_size=vocab,
            )
            kd += float(stats["kd_sum"])
            n += float(stats["n_tokens"])
    finally:
        student.train(was)
    return kd / max(n, 1.0)
