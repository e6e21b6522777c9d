"""Several teachers behind one :class:`SignalSource`: their distributions combined per token.

For teachers ``k = 1..K`` sharing the student's vocabulary, with ``p_k`` each teacher's
distribution at the distillation temperature ``T`` for a target row, the combined teacher is

* ``mean``: ``p = sum_k w_k p_k`` with fixed weights ``w`` (uniform by default): the
  averaged soft targets of multi-teacher KD (Hinton et al. 2015, ensembles; You et al.
  2017, "Learning from Multiple Teacher Networks");
* ``confidence``: per token ``a_k = c_k / sum_j c_j`` with ``c_k = 1 - H(p_k) / log V``
  (``entropy``) or ``c_k = max_v p_k(v)`` (``maxprob``), ``p = sum_k a_k p_k`` (uniform
  where every ``c_k`` is 0): each token listens most to the teacher that is surest of it
  (confidence-weighted multi-teacher KD, cf. Zhang et al. 2022, CA-MKD);
* ``select``: per example, the single teacher with the lowest mean cross-entropy on the
  example's own response tokens (the teacher that best explains the reference), its
  distribution on all of the example's rows (per-example teacher selection).

Teachers with another tokenizer join through :class:`~potstill.signals.cross.CrossTokenizerTeacher`
(their distribution projected onto the student's vocabulary on the rows where the two
tokenizations align). Such a teacher is *partial*: on a row it does not cover its weight is 0 in
every mode (``mean`` and ``confidence`` renormalize over the teachers that cover the row;
``select`` ranks a teacher by its mean CE over the rows it covers and picks, per row, the best
teacher that covers it). At least one teacher must share the student's tokenizer, so that every
row has one.

The result is a :class:`DenseSignal` whose logits are ``T * log p``, so that the reducer's
``softmax(logits / T)`` gives back exactly ``p``. It holds ``[n, V]`` float32 logits for the
batch's target rows (each teacher is projected chunk by chunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, cast

import torch
from torch import Tensor

from ..errors import PotstillError
from .online import target_index
from .types import DenseSignal, SparseSignal

MultiMode = Literal["mean", "confidence", "select"]
MULTI_MODES = ("mean", "confidence", "select")
CONFIDENCES = ("entropy", "maxprob")


class MultiTeacher:
    """Combine the signals of several same-vocabulary teachers (see module docstring)."""

    def __init__(
        self,
        sources: Sequence,
        *,
        mode: str = "mean",
        confidence: str = "entropy",
        weights: Sequence[float] | None = None,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        chunk_size: int = 256,
    ):
        if len(sources) < 2:
            raise PotstillError(f"a multi-teacher source needs at least 2 teachers, got {len(sources)}")
        if mode not in MULTI_MODES:
            raise PotstillError(f"unknown multi-teacher mode '{mode}'; use one of {MULTI_MODES}")
        if confidence not in CONFIDENCES:
            raise PotstillError(f"unknown confidence '{confidence}'; use one of {CONFIDENCES}")
        if weights is not None:
            if len(weights) != len(sources) or any(not (w >= 0) for w in weights) or sum(weights) <= 0:
                raise PotstillError(f"weights {list(weights)} must be {len(sources)} non-negative numbers, not all 0")
            weights = [float(w) / sum(weights) for w in weights]
        if not temperature > 0:
            raise PotstillError(f"temperature={temperature} must be > 0")
        if all(getattr(s, "partial", False) for s in sources):
            raise PotstillError(
                "every teacher has another tokenizer than the student; a multi-teacher source needs "
                "at least one teacher that shares the student's tokenizer (the others cover aligned "
                "rows only)"
            )
        vocabs = cast(set[int], {getattr(s, "vocab_size", None) for s in sources} - {None})
        if vocab_size is None:
            if len(vocabs) > 1:
                raise PotstillError(
                    f"the teachers have different vocabularies {sorted(vocabs)}; use teachers that "
                    "share the student's tokenizer, or pass vocab_size= when they differ by padding"
                )
            vocab_size = vocabs.pop() if vocabs else None
        self.sources = list(sources)
        self.mode = mode
        self.confidence = confidence
        self.weights = weights or [1.0 / len(sources)] * len(sources)
        self.temperature = None  # holds no temperature of its own: the trainer's T is used
        self._T = float(temperature)
        self.vocab_size = vocab_size
        self.chunk_size = int(chunk_size)
        self.selected_counts = [0] * len(sources)

    def to(self, device) -> MultiTeacher:
        for s in self.sources:
            if hasattr(s, "to"):
                s.to(device)
        return self

    def _logprobs(self, sig, start: int, end: int, vocab: int) -> Tensor:
        if isinstance(sig, SparseSignal):
            raise PotstillError(
                "multi-teacher KD needs dense teachers (live models or dense caches), not top-k or sampled caches"
            )
        return torch.log_softmax(sig.chunk_logits(start, end, vocab).float() / self._T, dim=-1)

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor]) -> DenseSignal:
        from ..divergences.chunked import full_head

        sigs = [s.signal(batch) for s in self.sources]
        # A teacher sharded with FSDP2 has a sharded head: gathered once per batch, on every process alike.
        sigs = [
            replace(s, head=full_head(s.head)) if isinstance(s, DenseSignal) and s.head is not None else s for s in sigs
        ]
        n = sigs[0].num_rows
        if any(s.num_rows != n for s in sigs):
            raise PotstillError("the teachers returned different row counts for one batch; they must see the same data")
        vocab = self.vocab_size or sigs[0].vocab
        device = batch["labels"].device
        out = torch.empty(n, vocab, dtype=torch.float32, device=device)
        # [K, n] bool: which teacher informs which row (partial, cross-tokenizer teachers: aligned rows)
        valid = torch.stack(
            [
                s.valid.to(device)
                if getattr(s, "valid", None) is not None
                else torch.ones(n, dtype=torch.bool, device=device)
                for s in sigs
            ]
        )
        if n and not bool(valid.any(0).all()):
            raise PotstillError("some target rows have no teacher; keep a teacher with the student's tokenizer")
        choice = self._select(batch, sigs, vocab, valid) if self.mode == "select" else None
        for start in range(0, n, self.chunk_size):
            end = min(start + self.chunk_size, n)
            lps = torch.stack([self._logprobs(s, start, end, vocab) for s in sigs])  # [K, c, V]
            v = valid[:, start:end]
            if self.mode == "select":
                assert choice is not None  # computed above in "select" mode
                c = choice[start:end]
                mix = lps.gather(0, c.view(1, -1, 1).expand(1, -1, vocab)).squeeze(0)
            else:
                if self.mode == "mean":
                    a = torch.tensor(self.weights, device=device).view(-1, 1)
                    a = a.expand(-1, end - start)
                else:
                    a = self._confidence(lps)  # [K, c]
                a = _renormalize(a * v, v)
                log_a = torch.where(a > 0, a.clamp_min(1e-30).log(), torch.full_like(a, -math.inf))
                mix = torch.logsumexp(lps + log_a.unsqueeze(-1), dim=0)
            out[start:end] = mix * self._T
        return DenseSignal(logits=out)

    def _confidence(self, lps: Tensor) -> Tensor:
        """Per-token teacher confidences ``[K, c]`` (unnormalized; :func:`_renormalize` makes them weights)."""
        p = lps.exp()
        if self.confidence == "maxprob":
            return p.max(-1).values
        h = -(p * lps).sum(-1)
        return (1.0 - h / math.log(lps.shape[-1])).clamp_min(0.0)

    def _select(self, batch, sigs, vocab, valid: Tensor) -> Tensor:
        """Per row, the index of the teacher with the lowest mean CE over the row's example (over the
        rows each teacher covers), among the teachers that cover the row."""
        labels = batch["labels"]
        index = target_index(labels)
        targets = labels[:, 1:].reshape(-1).index_select(0, index)
        example = torch.div(index, labels.shape[1] - 1, rounding_mode="floor")
        n_ex = labels.shape[0]
        ce = torch.zeros(len(sigs), n_ex, dtype=torch.float64, device=labels.device)
        count = torch.zeros(len(sigs), n_ex, dtype=torch.float64, device=labels.device)
        for k, s in enumerate(sigs):
            for start in range(0, index.numel(), self.chunk_size):
                end = min(start + self.chunk_size, index.numel())
                lp = self._logprobs(s, start, end, vocab)
                nll = -lp.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1)
                v = valid[k, start:end]
                ce[k].index_add_(0, example[start:end], torch.where(v, nll.double(), 0.0))
                count[k].index_add_(0, example[start:end], v.double())
        mean = torch.where(count > 0, ce / count.clamp_min(1), torch.full_like(ce, math.inf))  # [K, n_ex]
        per_row = torch.where(valid, mean[:, example], torch.full_like(mean[:, example], math.inf))
        best = per_row.argmin(0)  # [n]; ties go to the first teacher
        # count an example for the teacher chosen on most of its rows (all of them without partial teachers)
        votes = torch.zeros(len(sigs), n_ex, dtype=torch.long, device=labels.device)
        votes.index_put_((best, example), torch.ones_like(best), accumulate=True)
        for k in votes.argmax(0)[votes.sum(0) > 0].tolist():
            self.selected_counts[k] += 1
        return best


def _renormalize(a: Tensor, valid: Tensor) -> Tensor:
    """Weights ``[K, c]`` renormalized to sum to 1 per column; uniform over the valid teachers where they sum to 0."""
    total = a.sum(0, keepdim=True)
    uniform = valid.float() / valid.float().sum(0, keepdim=True).clamp_min(1.0)
    return torch.where(total > 0, a / total.clamp_min(1e-30), uniform)
