"""Typed teacher output: what a teacher says about a set of token positions.

Every teacher (a live model, a cache on disk) hands the trainer one of two types, so
that trainers never branch on where the teacher's answer came from:

* :class:`DenseSignal` -- the full distribution over the vocabulary, either as logits
  ``[N, V]`` or lazily as final hidden states ``[N, H]`` plus the teacher's output
  :class:`Head`, projected chunk by chunk so that ``[N, V]`` is never materialized.
* :class:`SparseSignal` -- ``k`` token ids and their log-probabilities per position
  (top-k or sampled), with an explicit rule for the probability mass outside them.

Rows are token positions: the reducer (``potstill.divergences.chunked``) walks them in
chunks. Row ``i`` of a signal is the teacher's prediction for the same target as row
``i`` of the student's hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ..distributed import global_rows

TailMode = Literal["bucket", "renormalize"]


@dataclass(frozen=True)
class Head:
    """A model's output head as data: ``logits = f(hidden @ weight.T + bias)``.

    ``weight`` is ``[V_model, H]``; ``vocab_size`` (<= V_model) keeps only the first rows,
    which is how two vocabularies that differ only by padding rows are aligned.
    ``logit_scale`` multiplies the logits (Cohere-style ``logit_scale``);
    ``softcap`` applies ``softcap * tanh(logits / softcap)`` (Gemma-2 final logit
    softcapping). Both are part of the model's distribution: a fused path that drops
    them silently changes the loss (TRL #6629).
    """

    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float | None = None
    softcap: float | None = None
    vocab_size: int | None = None

    @property
    def vocab(self) -> int:
        return self.vocab_size if self.vocab_size is not None else global_rows(self.weight)

    def sliced(self) -> tuple[Tensor, Tensor | None]:
        """``(weight[:V], bias[:V])`` for the aligned vocabulary ``V``."""
        v = self.vocab
        w = self.weight if v == self.weight.shape[0] else self.weight[:v]
        b = self.bias
        if b is not None and v != b.shape[0]:
            b = b[:v]
        return w, b

    def __call__(self, hidden: Tensor) -> Tensor:
        """``hidden [..., H] -> logits [..., V]`` (in the head's dtype)."""
        w, b = self.sliced()
        return apply_head(hidden, w, b, self.logit_scale, self.softcap)

    def with_vocab(self, vocab_size: int) -> Head:
        return replace(self, vocab_size=vocab_size)


def apply_head(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logit_scale: float | None,
    softcap: float | None,
) -> Tensor:
    """The one place where a head's maths lives (used by :class:`Head` and the reducer)."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    if logit_scale is not None and logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@dataclass
class DenseSignal:
    """The teacher's full distribution for ``N`` positions.

    Exactly one of ``logits [N, V]`` or ``hidden [N, H]`` (with ``head``) is set.
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    head: Head | None = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.hidden is None):
            raise ValueError("DenseSignal needs exactly one of `logits` or `hidden` (+ `head`)")
        if self.hidden is not None and self.head is None:
            raise ValueError("DenseSignal(hidden=...) needs the teacher's `head`")

    @property
    def num_rows(self) -> int:
        t = self.logits if self.logits is not None else self.hidden
        assert t is not None  # __post_init__ guarantees one of them is set
        return t.shape[0]

    @property
    def vocab(self) -> int:
        if self.logits is not None:
            return self.logits.shape[-1]
        return self._hidden_head()[1].vocab

    def _hidden_head(self) -> tuple[Tensor, Head]:
        """``(hidden, head)`` of a hidden-state signal (``logits is None``)."""
        # __post_init__ guarantees both are set whenever ``logits`` is None.
        assert self.hidden is not None and self.head is not None
        return self.hidden, self.head

    def rows(self, index: Tensor) -> DenseSignal:
        """Keep the rows in ``index`` (``LongTensor [n]``)."""
        if self.logits is not None:
            return DenseSignal(logits=self.logits[index])
        hidden, head = self._hidden_head()
        return DenseSignal(hidden=hidden[index], head=head)

    def chunk_logits(self, start: int, end: int, vocab_size: int | None = None) -> Tensor:
        """Teacher logits for rows ``start:end`` -> ``[end - start, V]`` (no grad)."""
        with torch.no_grad():
            if self.logits is not None:
                out = self.logits[start:end]
                if vocab_size is not None and out.shape[-1] != vocab_size:
                    out = out[..., :vocab_size]
                return out
            hidden, head = self._hidden_head()
            if vocab_size is not None:
                head = head.with_vocab(vocab_size)
            return head(hidden[start:end])


@dataclass
class SparseSignal:
    """``k`` token ids per position and the teacher's log-probabilities of them.

    ``ids [N, k]`` (long), ``logprobs [N, k]`` (float): log p_T(id) of the teacher's
    distribution *at the distillation temperature*. Padding slots (when fewer than ``k``
    ids are meaningful) carry ``logprobs = -inf``. Two kinds:

    * **top-k** (``weights is None``): ``tail`` says what happens to the mass outside the ids:

      - ``"bucket"``: it becomes one extra outcome; the student's matching outcome is its
        own mass outside the ids. Exact divergence between the two coarsened distributions.
        ``tail_logprob [N]`` (optional) is the log of that mass as the teacher computed it
        in full precision (a cache stores it); without it the tail is ``1 - sum(exp(logprobs))``.
        With it, the coarsened teacher ``[logprobs, tail_logprob]`` is renormalized to sum
        to one, which removes the rounding of quantized log-probs.
      - ``"renormalize"``: it is dropped and both distributions are renormalized over the
        ids (DistillKit's top-k). Biased: it ignores the tail entirely.

    * **sampled** (``weights [N, k]`` given; Anshumann et al. 2025, random-sampling KD):
      the ids were drawn from a proposal ``r`` (the teacher itself, or the teacher at a
      proposal temperature) and ``weights`` make ``sum_i weights_i * g(ids_i)`` an unbiased
      estimate of ``sum_v p_v * g(v)`` for any ``g``: ``weights_i = count_i / n * p_i / r_i``
      (``count_i / n`` when ``r = p``). ``tail`` and ``tail_logprob`` are ignored; padding
      slots have weight 0.

    ``valid [N]`` (bool, optional): rows that carry information. A signal seen through another
    tokenizer (:class:`~potstill.signals.cache.cross.CrossTokenizerCache`) has rows the teacher could
    not align; they hold a finite placeholder and trainers give their divergence weight 0.
    """

    ids: Tensor
    logprobs: Tensor
    tail: TailMode = "bucket"
    weights: Tensor | None = None
    tail_logprob: Tensor | None = None
    valid: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    @property
    def sampled(self) -> bool:
        return self.weights is not None

    def _map(self, f) -> SparseSignal:
        return SparseSignal(
            ids=f(self.ids),
            logprobs=f(self.logprobs),
            tail=self.tail,
            weights=None if self.weights is None else f(self.weights),
            tail_logprob=None if self.tail_logprob is None else f(self.tail_logprob),
            valid=None if self.valid is None else f(self.valid),
        )

    def rows(self, index: Tensor) -> SparseSignal:
        return self._map(lambda t: t[index])

    def chunk(self, start: int, end: int) -> SparseSignal:
        return self._map(lambda t: t[start:end])

    def to(self, device) -> SparseSignal:
        return self._map(lambda t: t.to(device))


Signal = DenseSignal | SparseSignal
