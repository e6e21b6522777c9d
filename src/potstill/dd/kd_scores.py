"""Teacher-student data scores: :func:`kd_stats` and the two scores read from it, one forward pass per model per batch.

The teacher is a live model *or* any :class:`~potstill.signals.SignalSource` (an
``OnlineTeacher``, a ``CachedSignal``), so the cache written for KD also scores the data: one
teacher pass feeds both soft targets and data scores. Scores are ``Tensor [N]`` (float64) in
the order of ``examples`` (encoded as for :mod:`potstill.dd.select`), which re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import PotstillError
from .forward_pass import batches, check_examples, device_of, entropy, eval_mode, model_signal, pad_id, row_owner

__all__ = ["confident_teacher_unsure_student", "kd_divergence_score", "kd_stats"]


def _teacher_signal(teacher, batch: dict[str, Tensor]):
    if isinstance(teacher, torch.nn.Module):
        return model_signal(teacher, batch)
    return teacher.signal(batch)


@torch.no_grad()
def kd_stats(
    student: torch.nn.Module,
    teacher,
    examples: Sequence[dict],
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    batch_size: int = 8,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    divergence_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Teacher-student statistics per example, one forward pass per model per batch.

    ``teacher`` is a causal LM (run here, no gradients) or a
    :class:`~potstill.signals.SignalSource` whose ``signal(batch)`` gives a
    :class:`~potstill.signals.DenseSignal` or :class:`~potstill.signals.SparseSignal` for
    the batch's target rows (``OnlineTeacher``, ``CachedSignal``: the KD cache is read, the
    teacher is not run). Batches carry ``example_id`` when the examples do. With
    ``p = softmax(z_T / T)``, ``q = softmax(z_S / T)`` on the aligned vocabulary ``V``
    (``vocab_size``, default the student's), the per-token values averaged over each
    example's response tokens are, ``[N]`` float64 each:

    * ``divergence``: ``DIVERGENCES[divergence](z_S, z_T)`` per token. A top-k signal gives
      the divergence on the coarsened space of :func:`potstill.divergences.sparse.coarsen`
      (k ids + one tail bucket, or renormalized over the ids, as the signal's ``tail``
      says); a sampled signal gives the unbiased estimate of
      :func:`potstill.divergences.sparse_divergence`;
    * ``teacher_entropy`` ``H(p)``: exact for a dense signal; for top-k the entropy of the
      same coarsened distribution (a lower bound on ``H(p)`` with a bucket); for sampled
      the unbiased estimate ``sum_i w_i (-log p_i)``;
    * ``student_entropy`` ``H(q)`` (exact);
    * ``confident_teacher_unsure_student``: potstill's own score, per token
      ``clip(1 - H(p) / log V, 0, 1) * clip(H(q) / log V, 0, 1)`` in [0, 1]: high where the
      teacher is sure and the student is not (both entropies normalized by the uniform
      entropy ``log V``);
    * ``num_response_tokens`` (int64).

    A cached signal at temperature ``T_c`` must be scored at ``temperature = T_c``.
    """
    from ..data import PadCollator
    from ..divergences import DIVERGENCES
    from ..models import output_head

    is_model = _check_kd_args(teacher, examples, divergence, temperature, chunk_size)
    kw = dict(divergence_kwargs or {})
    vocab = vocab_size or output_head(student).vocab
    log_v = math.log(vocab)
    n = len(examples)
    collate = PadCollator(pad_id(student, pad_token_id))
    sums = torch.zeros(5, n, dtype=torch.float64)  # divergence, H_T, H_S, ctus, count
    with eval_mode(student, teacher if is_model else None):
        device = device_of(student)
        for members in batches(examples, batch_size):
            batch = collate([examples[i] for i in members])
            s_sig = model_signal(student, batch)
            t_sig = _teacher_signal(teacher, {k: v.to(device) for k, v in batch.items()})
            _check_batch_signal(t_sig, s_sig, vocab, vocab_size)
            owner = torch.tensor(members)[row_owner(batch["labels"])]
            for s in range(0, s_sig.num_rows, chunk_size):
                e = min(s + chunk_size, s_sig.num_rows)
                zs = s_sig.chunk_logits(s, e, vocab).float()
                div, h_t = _teacher_terms(zs, t_sig, s, e, vocab, divergence, DIVERGENCES[divergence], temperature, kw)
                h_s = entropy(torch.log_softmax(zs / temperature, -1))
                ctus = (1 - h_t / log_v).clamp(0, 1) * (h_s / log_v).clamp(0, 1)
                idx = owner[s:e]
                for j, v in enumerate((div, h_t, h_s, ctus)):
                    sums[j].index_add_(0, idx, v.double().cpu())
                sums[4].index_add_(0, idx, torch.ones(e - s, dtype=torch.float64))
    count = sums[4]
    return {
        "divergence": sums[0] / count,
        "teacher_entropy": sums[1] / count,
        "student_entropy": sums[2] / count,
        "confident_teacher_unsure_student": sums[3] / count,
        "num_response_tokens": count.long(),
    }


def _check_kd_args(teacher, examples: Sequence[dict], divergence: str, temperature: float, chunk_size: int) -> bool:
    """Check :func:`kd_stats`' arguments; whether ``teacher`` is a model (else a signal source)."""
    from ..divergences import DIVERGENCES

    check_examples(examples)
    if divergence not in DIVERGENCES:
        raise PotstillError(f"unknown divergence '{divergence}'; choose one of {sorted(DIVERGENCES)}")
    if not temperature > 0:
        raise PotstillError(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        raise PotstillError(f"chunk_size={chunk_size} must be >= 1")
    is_model = isinstance(teacher, torch.nn.Module)
    if not is_model and not callable(getattr(teacher, "signal", None)):
        raise PotstillError(
            "teacher must be a causal LM or a signal source with .signal(batch) (OnlineTeacher, CachedSignal)"
        )
    source_t = None if is_model else getattr(teacher, "temperature", None)
    if source_t is not None and float(source_t) != float(temperature):
        raise PotstillError(
            f"the teacher signal holds temperature {source_t} but temperature={temperature}; "
            "score at the signal's temperature or rebuild the cache at this one"
        )
    return is_model


def _check_batch_signal(t_sig, s_sig, vocab: int, vocab_size: int | None) -> None:
    """The teacher signal covers the batch's response tokens, over the student's vocabulary."""
    from ..signals import DenseSignal

    if t_sig.num_rows != s_sig.num_rows:
        raise PotstillError(
            f"the teacher signal has {t_sig.num_rows} rows for {s_sig.num_rows} response tokens "
            "of the batch; the signal was made for other data: rebuild it"
        )
    if isinstance(t_sig, DenseSignal) and (t_sig.vocab < vocab or (vocab_size is None and t_sig.vocab != vocab)):
        raise PotstillError(
            f"teacher vocabulary ({t_sig.vocab}) and student vocabulary ({vocab}) differ; "
            "pass vocab_size= to align vocabularies that differ only by padding rows"
        )


def _teacher_terms(
    zs: Tensor, t_sig, s: int, e: int, vocab: int, divergence: str, f, temperature: float, kw: Mapping[str, Any]
) -> tuple[Tensor, Tensor]:
    """``(divergence, H(p))`` per target row ``s:e``, from the student logits ``zs [e - s, V]`` and
    the teacher signal (dense, or sparse: top-k coarsened or sampled; see :func:`kd_stats`)."""
    from ..divergences import sparse_divergence
    from ..divergences.sparse import coarsen
    from ..signals import SparseSignal

    if isinstance(t_sig, SparseSignal):
        t = t_sig.chunk(s, e).to(zs.device)
        try:
            div = sparse_divergence(divergence, zs, t, temperature=temperature, **kw)
        except ValueError as err:
            raise PotstillError(
                f"the sparse teacher signal does not fit the student ({err}); "
                "build it with the student's tokenizer and vocabulary"
            ) from None
        if t.weights is not None:
            live = ~torch.isneginf(t.logprobs)
            h_t = torch.where(live, t.weights.float() * -t.logprobs.float(), 0.0).sum(-1)
        else:
            h_t = entropy(coarsen(zs, t, temperature=temperature)[1])
    else:
        zt = t_sig.chunk_logits(s, e, vocab).to(zs.device).float()
        if not bool(torch.isfinite(zt).all()):
            raise PotstillError("teacher logits contain NaN/inf; check the teacher model/dtype (try float32)")
        div = f(zs, zt, temperature=temperature, **kw)
        h_t = entropy(torch.log_softmax(zt / temperature, -1))
    if not bool(torch.isfinite(div).all()):
        raise PotstillError(
            f"{divergence} is not finite on some response tokens; check both models' "
            "logits (NaN/inf) or choose a bounded divergence"
        )
    return div, h_t


def kd_divergence_score(
    student: torch.nn.Module, teacher, examples: Sequence[dict], *, divergence: str = "forward_kl", **kwargs
) -> Tensor:
    """Mean teacher-student ``divergence`` over each example's response tokens, ``[N]``
    (0 where the two agree; high = the student has most to learn there). See :func:`kd_stats`."""
    return kd_stats(student, teacher, examples, divergence=divergence, **kwargs)["divergence"]


def confident_teacher_unsure_student(student: torch.nn.Module, teacher, examples: Sequence[dict], **kwargs) -> Tensor:
    """Mean over response tokens of ``(1 - H(p)/log V) * H(q)/log V`` (clipped to [0, 1]), ``[N]``:
    potstill's score for tokens where the teacher is sure and the student is not. See :func:`kd_stats`."""
    return kd_stats(student, teacher, examples, **kwargs)["confident_teacher_unsure_student"]
