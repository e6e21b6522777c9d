"""Uncertainty-aware and dynamic KD: per-token weights and schedules.

Token weights (the ``kd_weights`` of :func:`potstill.divergences.chunked_kd_loss`; CE is
never weighted), computed without gradients, one extra pass over a head per batch:

* ``teacher_confidence``: ``w_t = 1 - H(p_t) / log V``, the teacher's normalized
  certainty (0 for a uniform teacher, 1 for a one-hot one). Tokens on which the teacher
  is unsure carry less of its (noisy) distribution: the uncertainty-aware weighting the
  survey describes (Fang et al. 2025, Sec. on uncertainty-aware KD).
* ``teacher_maxprob``: ``w_t = max_v p_t(v)``, the same idea with max-probability as the
  confidence measure.
* ``student_entropy``: selective KD: only the fraction ``ratio`` of the micro-batch's
  positions where the student's predictive entropy is highest get the divergence, with
  weight ``1 / ratio`` so the expected size of the KD term is kept (word-level selection
  of Wang et al. 2021, "Selective Knowledge Distillation for Neural Machine
  Translation", Sec. 3, with entropy as the uncertainty measure).

* ``keypoint``: KPOD's rationale-token weights (:mod:`potstill.kd.keypoint`), measured once before training
  and carried by the batch (``kd_token_weights``); :func:`token_weights` returns ``None`` for it.

Schedules move the temperature and the CE/KD mix over training (``value(progress)`` with
progress = optimizer step / max steps): ``linear`` and ``cosine`` between a start and an
end value, the annealing used since Hinton et al. 2015 and in curriculum-temperature KD
(Li et al. 2023, CTKD, a fixed schedule variant).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import PotstillError
from ..signals.types import Head, SparseSignal

TokenWeighting = Literal["none", "teacher_confidence", "teacher_maxprob", "student_entropy", "keypoint"]
TOKEN_WEIGHTINGS = ("none", "teacher_confidence", "teacher_maxprob", "student_entropy", "keypoint")
ScheduleKind = Literal["linear", "cosine"]


def scheduled(start: float, end: float | None, progress: float, kind: str = "linear") -> float:
    """The value at ``progress`` in [0, 1] going from ``start`` (0) to ``end`` (1); ``end=None`` is constant."""
    if end is None:
        return float(start)
    s = min(max(float(progress), 0.0), 1.0)
    if kind == "linear":
        f = s
    elif kind == "cosine":
        f = 0.5 * (1.0 - math.cos(math.pi * s))
    else:
        raise PotstillError(f"unknown schedule '{kind}'; use linear or cosine")
    return float(start) + (float(end) - float(start)) * f


def _entropy_and_max(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``logits [n, V]`` -> (entropy ``[n]`` in nats, max probability ``[n]``) at ``temperature``."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    p = lp.exp()
    return -(p * lp).sum(-1), p.max(-1).values


def _sparse_entropy_and_max(sig: SparseSignal) -> tuple[Tensor, Tensor]:
    """Entropy and max-prob of a sparse teacher, the tail counted as one outcome (a lower
    bound on the full entropy: the tail's own spread is unknown)."""
    lp = sig.logprobs.float()
    if sig.weights is not None:  # sampled: plug-in estimate, sum_i w_i * (-log p_i)
        w = sig.weights.float()
        h = (w * torch.where(torch.isneginf(lp), torch.zeros_like(lp), -lp)).sum(-1)
        return h, lp.max(-1).values.exp()
    p = lp.exp()
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    h = -(torch.xlogy(p, p).sum(-1) + torch.xlogy(tail, tail))
    return h, torch.maximum(p.max(-1).values, tail)


@torch.no_grad()
def teacher_uncertainty(signal, vocab: int, temperature: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Per-row teacher entropy and max-prob ``([n], [n])`` for a signal, chunk by chunk."""
    if isinstance(signal, SparseSignal):
        return _sparse_entropy_and_max(signal)
    hs, ms = [], []
    for start in range(0, signal.num_rows, chunk_size):
        end = min(start + chunk_size, signal.num_rows)
        h, m = _entropy_and_max(signal.chunk_logits(start, end, vocab), temperature)
        hs.append(h)
        ms.append(m)
    if not hs:
        z = torch.zeros(0)
        return z, z
    return torch.cat(hs), torch.cat(ms)


@torch.no_grad()
def student_entropy(rows: Tensor, head: Head, vocab: int, temperature: float, chunk_size: int) -> Tensor:
    """Per-row entropy ``[n]`` of the student's prediction from hidden ``rows [n, H]``."""
    out = []
    head = head.with_vocab(vocab)
    for start in range(0, rows.shape[0], chunk_size):
        out.append(_entropy_and_max(head(rows[start : start + chunk_size].detach()), temperature)[0])
    return torch.cat(out) if out else rows.new_zeros(0)


def token_weights(
    kind: str,
    *,
    signal=None,
    rows: Tensor | None = None,
    head: Head | None = None,
    labels: Tensor | None = None,
    vocab: int,
    temperature: float,
    ratio: float = 0.5,
    chunk_size: int = 256,
) -> Tensor | None:
    """The ``[n]`` divergence weights of ``kind`` (``None`` for ``"none"``).

    ``labels [n]`` are the target rows' labels; rows labelled ``-100`` never count when
    ranking (they are masked out of the loss anyway).
    """
    if kind in ("none", "keypoint"):  # keypoint weights come with the batch (potstill.kd.keypoint)
        return None
    if kind in ("teacher_confidence", "teacher_maxprob"):
        if signal is None:
            raise PotstillError(f"token_weighting '{kind}' needs a teacher signal; set alpha < 1")
        h, m = teacher_uncertainty(signal, vocab, temperature, chunk_size)
        if kind == "teacher_maxprob":
            return m.clamp(0.0, 1.0)
        return (1.0 - h / math.log(vocab)).clamp(0.0, 1.0)
    if kind == "student_entropy":
        if not 0.0 < ratio <= 1.0:
            raise PotstillError(f"token_weighting_ratio={ratio} must be in (0, 1]")
        h = student_entropy(rows, head, vocab, temperature, chunk_size)
        valid = torch.ones_like(h, dtype=torch.bool) if labels is None else labels != -100
        n_valid = int(valid.sum())
        w = torch.zeros_like(h)
        if n_valid == 0:
            return w
        k = max(1, round(ratio * n_valid))
        score = torch.where(valid, h, torch.full_like(h, -math.inf))
        top = score.topk(k).indices
        w[top] = n_valid / k
        return w
    raise PotstillError(f"unknown token_weighting '{kind}'; use one of {TOKEN_WEIGHTINGS}")


CURRICULA = ("none", "easy_to_hard", "hard_to_easy", "progressive_rationale")
# The curricula that order examples (progressive_rationale masks steps inside each one: potstill.kd.keypoint).
ORDER_CURRICULA = ("easy_to_hard", "hard_to_easy")


@torch.no_grad()
def example_divergences(
    model,
    source,
    examples,
    collator,
    *,
    vocab: int | None,
    temperature: float = 1.0,
    batch_size: int = 8,
    chunk_size: int = 256,
) -> Tensor:
    """Mean forward KL(teacher || student) over each example's response tokens ``[N]``.

    One no-grad pass of the student and one teacher signal per batch; examples with no
    response token score 0. The curriculum's difficulty (cf. Bengio et al. 2009; the
    teacher-student gap as difficulty, as in curriculum KD).
    """
    from ..divergences import forward_kl
    from ..models import final_hidden, output_head
    from ..signals import target_index, target_rows

    was_training = model.training
    model.eval()
    head = output_head(model)
    if vocab is not None:
        head = head.with_vocab(vocab)
    device = next(model.parameters()).device
    scores = []
    try:
        for i in range(0, len(examples), batch_size):
            rows_in = [examples[j] for j in range(i, min(i + batch_size, len(examples)))]
            batch = {k: v.to(device) for k, v in collator(rows_in).items() if isinstance(v, Tensor)}
            labels = batch["labels"]
            index = target_index(labels)
            rows = target_rows(final_hidden(model, batch["input_ids"], batch["attention_mask"]), index)
            sig = source.signal(batch)
            per_row = []
            for start in range(0, rows.shape[0], chunk_size):
                end = min(start + chunk_size, rows.shape[0])
                t = _dense_or_sparse_chunk(sig, start, end, head.vocab)
                s = head(rows[start:end])
                if isinstance(t, SparseSignal):
                    from ..divergences.sparse import sparse_divergence

                    per_row.append(sparse_divergence("forward_kl", s.float(), t, temperature=temperature))
                else:
                    per_row.append(forward_kl(s.float(), t.float(), temperature=temperature))
            d = torch.cat(per_row) if per_row else rows.new_zeros(0)
            example = torch.div(index, labels.shape[1] - 1, rounding_mode="floor")
            total = torch.zeros(labels.shape[0], dtype=torch.float64, device=d.device).index_add_(
                0, example, d.double()
            )
            count = torch.bincount(example, minlength=labels.shape[0]).clamp_min(1)
            scores.append((total / count).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def target_logprobs(logits_of, n: int, targets: Tensor, chunk: int) -> Tensor:
    """``log softmax(logits_of(lo, hi))[row, target]`` for ``n`` rows, ``chunk`` rows at a time: ``[n]`` float32."""
    out = torch.empty(n, dtype=torch.float32, device=targets.device)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        lp = logits_of(lo, hi).float().log_softmax(-1)
        out[lo:hi] = lp.gather(-1, targets[lo:hi, None]).squeeze(-1)
    return out


def _dense_or_sparse_chunk(sig, start: int, end: int, vocab: int):
    if isinstance(sig, SparseSignal):
        return sig.chunk(start, end)
    return sig.chunk_logits(start, end, vocab)


def curriculum_order(scores: Tensor, kind: str) -> list[int]:
    """Example order for a curriculum: ascending difficulty (easy_to_hard) or descending; stable."""
    if kind not in ORDER_CURRICULA:
        raise PotstillError(f"curriculum '{kind}' has no order; use easy_to_hard or hard_to_easy")
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return order if kind == "easy_to_hard" else sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
