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
  distribution on all of the example's rows (per-example teacher selection);
* ``student_aware``: per example, each teacher weighted by how well the *student* currently
  understands it (the idea the survey of Fang et al. 2025, multi-teacher section, credits to
  DiverseDistill: Liu, Liu, Li, Liu, Shrivastava, Bi, Hong, Chi, Zhao, "Wisdom of Committee:
  Distilling from Foundation Model to Specialized Application Model", arXiv:2402.14035, 2024;
  v4 2026 "Wisdom of Committee: Diverse Distillation from Large Foundation Models and Domain
  Experts"). With ``q`` the student's distribution at ``T`` on a row (detached), ``R_e`` the
  example's response rows a teacher covers and ``w`` the prior weights (uniform by default)::

      d_{e,k} = (1 / |R_e|) sum_{t in R_e} KL(p_k,t || q_t)             (nats, float64)
      s_{e,k} = d_{e,k} on an example's first visit, else m s_{e,k} + (1 - m) d_{e,k}   (ema = m; 0: s = d)
      a_{e,k} = w_k exp(-sign s_{e,k} / tau) / sum_j w_j exp(-sign s_{e,j} / tau)
      p_t     = sum_k a_{e,k} p_k,t   (renormalized over the teachers that cover row t)

  ``sign = +1`` (``favor="understood"``, default): the teacher the student is closest to gets
  the most weight; ``sign = -1`` (``favor="gap"``): the one it is furthest from. The paper
  does not give this formula: its weights come from a *learned* question/answer module
  (trainable teacher embeddings scored against the student's hidden state, whose "dynamic
  teacher importance" filters teachers that are of low relevance to the student per sample),
  which has no counterpart in frozen-teacher logit KD. This mode is the training-free reading
  of it that the survey's one-line description gives: the weight follows the student's
  current divergence to each teacher, recomputed every step. ``favor="understood"`` follows
  the paper's direction (irrelevant teachers are filtered out); ``gap`` is offered because the
  survey's wording ("how well the student understands each teacher") does not fix the sign.
  ``tau -> inf`` gives ``mean`` with weights ``w``. The student's rows come in through
  ``signal(batch, student=...)``; without them the mode refuses.

An *example* is a batch row, or in a packed batch (``position_ids``) one packed segment; the EMA
keys an example by ``example_id`` when the batch has it, else by a hash of its tokens.

Teachers with another tokenizer join through :class:`~potstill.signals.cross.CrossTokenizerTeacher`
(their distribution projected onto the student's vocabulary on the rows where the two
tokenizations align). Such a teacher is *partial*: on a row it does not cover its weight is 0 in
every mode (``mean``, ``confidence`` and ``student_aware`` renormalize over the teachers that cover
the row, ``student_aware`` averaging a teacher's divergence over the rows it covers; ``select``
ranks a teacher by its mean CE over the rows it covers and picks, per row, the best teacher that
covers it). At least one teacher must share the student's tokenizer, so that every row has one.

The result is a :class:`DenseSignal` whose logits are ``T * log p``, so that the reducer's
``softmax(logits / T)`` gives back exactly ``p``. It holds ``[n, V]`` float32 logits for the
batch's target rows (each teacher is projected chunk by chunk).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal, cast

import torch
from torch import Tensor

from ..errors import PotstillError
from .online import target_index, teacher_tokens
from .types import DenseSignal, SparseSignal

MultiMode = Literal["mean", "confidence", "select", "student_aware"]
MULTI_MODES = ("mean", "confidence", "select", "student_aware")
CONFIDENCES = ("entropy", "maxprob")
FAVORS = ("understood", "gap")

# What ``signal(batch, student=...)`` takes: the student's final hidden states of the batch's target rows and its
# output head ``(rows [n, H], head)`` (a :class:`~potstill.signals.types.Head` or any ``[c, H] -> [c, V]`` callable),
# its logits ``[n, V]``, or a function ``(start, end) -> logits [end - start, V]``; logits before the temperature.
StudentRows = tuple | Tensor | Callable[[int, int], Tensor]


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
        tau: float = 1.0,
        favor: str = "understood",
        ema: float = 0.0,
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
        if not tau > 0:
            raise PotstillError(f"tau={tau} must be > 0 (mode student_aware: large tau tends to mode mean)")
        if favor not in FAVORS:
            raise PotstillError(f"unknown favor '{favor}'; use one of {FAVORS}")
        if not 0.0 <= ema < 1.0:
            raise PotstillError(f"ema={ema} must be in [0, 1) (0: no smoothing of the student's divergences)")
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
        self.tau, self.favor, self.ema = float(tau), favor, float(ema)
        self._smoothed: dict[object, Tensor] = {}  # student_aware + ema: example key -> s_{e,k} [K] float64
        self.weight_sums = [0.0] * len(sources)  # student_aware: sum over examples of a_{e,k}
        self.weighted_examples = 0

    @property
    def forward_tokens(self) -> int:
        """Tokens all its teachers were asked to read (each counts its own)."""
        return sum(teacher_tokens(s) for s in self.sources)

    @property
    def wants_student(self) -> bool:
        """Whether :meth:`signal` needs the student's rows (mode ``student_aware``): the trainer passes them then."""
        return self.mode == "student_aware"

    @property
    def mean_weights(self) -> list[float] | None:
        """student_aware: each teacher's weight averaged over the examples seen so far (None before any)."""
        if not self.weighted_examples:
            return None
        return [w / self.weighted_examples for w in self.weight_sums]

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
    def signal(self, batch: dict[str, Tensor], student: StudentRows | None = None) -> DenseSignal:
        """The combined teacher for the target rows of ``batch``; ``student`` (see :data:`StudentRows`, detached
        here) is read by mode ``student_aware`` only, which refuses to run without it."""
        from ..divergences.chunked import full_head

        if self.mode == "student_aware" and student is None:
            raise PotstillError(
                "multi-teacher mode 'student_aware' weighs teachers by the student's current divergence to each, so "
                "it needs signal(batch, student=(rows, head)); use a trainer that passes the student, or mode mean"
            )
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
        aware = self._student_aware(batch, sigs, vocab, valid, student) if self.mode == "student_aware" else None
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
                elif aware is not None:  # student_aware: a_{e,k} of each row's example
                    a = aware[:, start:end]
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

    def _student_aware(self, batch, sigs, vocab: int, valid: Tensor, student: StudentRows | None) -> Tensor:
        """Per-row weights ``[K, n]``: ``a_{e,k}`` (module docstring) of each row's example ``e``, before the
        renormalization over the teachers that cover the row."""
        assert student is not None  # signal() refuses mode student_aware without the student's rows
        index = target_index(batch["labels"])
        n = index.numel()
        example, n_ex = example_of_rows(batch, index)
        logits_of = _student_chunks(student, n)
        kl = torch.zeros(len(sigs), n_ex, dtype=torch.float64, device=valid.device)
        count = torch.zeros_like(kl)
        for start in range(0, n, self.chunk_size):
            end = min(start + self.chunk_size, n)
            lq = _student_logprobs(logits_of(start, end), end - start, vocab, self._T).to(valid.device)
            ex = example[start:end]
            for k, s in enumerate(sigs):
                lp = self._logprobs(s, start, end, vocab)
                p = lp.exp()
                # KL(p_k || q) per row; p log p is 0 where p is (a projected teacher gives exact zeros)
                d = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
                v = valid[k, start:end]
                kl[k].index_add_(0, ex, torch.where(v, d.double(), 0.0))
                count[k].index_add_(0, ex, v.double())
        d = torch.where(count > 0, kl / count.clamp_min(1), torch.full_like(kl, math.inf))  # [K, n_ex]
        if self.ema > 0:
            d = self._ema_update(batch, example, n_ex, d)
        a = self._understanding_weights(d)  # [K, n_ex]
        seen = count.sum(0) > 0
        for k in range(len(sigs)):
            self.weight_sums[k] += float(a[k, seen].sum())
        self.weighted_examples += int(seen.sum())
        return a[:, example].float()

    def _understanding_weights(self, d: Tensor) -> Tensor:
        """``a_{e,k} = softmax_k(log w_k - sign d_{e,k} / tau)`` over the teachers with a finite ``d`` ``[K, n_ex]``
        (float64); a column with none is 0 (its rows are then uniform over the teachers that cover them)."""
        w = torch.tensor(self.weights, dtype=torch.float64, device=d.device).view(-1, 1)
        sign = 1.0 if self.favor == "understood" else -1.0
        finite = torch.isfinite(d)
        z = w.log() - sign * torch.where(finite, d, torch.zeros_like(d)) / self.tau
        z = torch.where(finite & (w > 0), z, torch.full_like(z, -math.inf))
        a = torch.softmax(z, dim=0)
        return torch.where(torch.isnan(a), torch.zeros_like(a), a)

    def _ema_update(self, batch, example: Tensor, n_ex: int, d: Tensor) -> Tensor:
        """``s_{e,k} = m s_{e,k} + (1 - m) d_{e,k}`` per example key (``d`` itself on a first visit) -> ``[K, n_ex]``."""
        keys = example_keys(batch, n_ex)
        out = d.clone()
        for e, key in enumerate(keys):
            old = self._smoothed.get(key)
            if old is not None:
                old = old.to(d.device)
                both = torch.isfinite(old) & torch.isfinite(d[:, e])
                out[:, e] = torch.where(both, self.ema * old + (1.0 - self.ema) * d[:, e], d[:, e])
            self._smoothed[key] = out[:, e].detach().cpu()
        return out


def _student_chunks(student: StudentRows, n: int) -> Callable[[int, int], Tensor]:
    """``student`` (see :data:`StudentRows`) as ``(start, end) -> logits [end - start, V']``, detached."""
    if isinstance(student, tuple):
        if len(student) != 2:
            raise PotstillError("student=(rows, head) takes 2 items: the target rows [n, H] and the output head")
        rows, head = student
        if rows.shape[0] != n:
            raise PotstillError(f"student rows are {rows.shape[0]} for {n} target tokens; pass the batch's target rows")
        return lambda a, b: head(rows[a:b].detach())
    if isinstance(student, Tensor):
        if student.shape[0] != n:
            raise PotstillError(f"student logits have {student.shape[0]} rows for {n} target tokens")
        return lambda a, b: student[a:b].detach()
    if callable(student):
        return lambda a, b: student(a, b).detach()
    raise PotstillError("student= must be (rows [n, H], head), logits [n, V] or a function (start, end) -> logits")


def _student_logprobs(logits: Tensor, rows: int, vocab: int, temperature: float) -> Tensor:
    """The student's ``log softmax(logits / T)`` over the first ``vocab`` entries (padding rows of a larger head
    dropped, as in the reducer) -> ``[rows, vocab]`` float32."""
    if logits.shape[0] != rows or logits.shape[-1] < vocab:
        raise PotstillError(
            f"the student gave logits {tuple(logits.shape)} for {rows} rows of a {vocab}-token vocabulary; "
            "it must cover the teachers' vocabulary"
        )
    return torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)


def example_of_rows(batch: dict[str, Tensor], index: Tensor) -> tuple[Tensor, int]:
    """Which example each target row belongs to -> ``(LongTensor [n], number of examples)``.

    An example is a batch row, or in a packed batch (``position_ids``) a run of ``position_ids`` that restarts at 0
    on a real token, numbered in row-major order (the order of ``example_id`` in a packed batch). Row ``i`` of
    :func:`target_index` predicts the label at flat position ``r * T + c + 1``: the example is the one of that
    label.
    """
    labels = batch["labels"]
    b, t = labels.shape
    r = torch.div(index, t - 1, rounding_mode="floor")
    if batch.get("position_ids") is None:
        return r, b
    seg = _segment_grid(batch)
    at = r * t + index % (t - 1) + 1
    return seg.reshape(-1).index_select(0, at.to(seg.device)).to(labels.device), int(seg.max()) + 1


def _segment_grid(batch: dict[str, Tensor]) -> Tensor:
    """``[B, T]``: the example each position of a packed batch belongs to (trailing padding: the row's last)."""
    pos = batch["position_ids"]
    mask = batch.get("attention_mask")
    starts = pos == 0
    if mask is not None:
        starts = starts & mask.bool()
    return (starts.reshape(-1).long().cumsum(0) - 1).clamp_min(0).reshape(pos.shape)


def example_keys(batch: dict[str, Tensor], n_ex: int) -> list:
    """A key per example that is the same whenever the example comes back: its ``example_id`` when the batch has
    one per example, else a hash of its tokens (``input_ids`` under ``attention_mask``; else its labels)."""
    ids = batch.get("example_id")
    if ids is not None and ids.numel() == n_ex:
        return [int(i) for i in ids.tolist()]
    tokens = batch.get("input_ids")
    keep = batch.get("attention_mask") if tokens is not None else None
    if tokens is None:
        tokens = batch["labels"]
        keep = tokens != -100
    keep = torch.ones_like(tokens, dtype=torch.bool) if keep is None else keep.bool()
    if batch.get("position_ids") is not None:
        seg = _segment_grid(batch)
    else:
        seg = torch.arange(tokens.shape[0], device=tokens.device).view(-1, 1).expand_as(tokens)
    tokens, keep, seg = tokens.detach().cpu().long(), keep.cpu(), seg.cpu()
    return [
        hashlib.blake2b(tokens[keep & (seg == e)].numpy().tobytes(), digest_size=16).hexdigest() for e in range(n_ex)
    ]


def _renormalize(a: Tensor, valid: Tensor) -> Tensor:
    """Weights ``[K, c]`` renormalized to sum to 1 per column; uniform over the valid teachers where they sum to 0."""
    total = a.sum(0, keepdim=True)
    uniform = valid.float() / valid.float().sum(0, keepdim=True).clamp_min(1.0)
    return torch.where(total > 0, a / total.clamp_min(1e-30), uniform)
