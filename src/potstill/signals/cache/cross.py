"""A cache written in the teacher's own tokens, read by a student with another tokenizer.

``potstill cache`` on a cross-tokenizer recipe runs the teacher over the recipe's examples encoded by the
*teacher's* tokenizer (its own chat template) and stores its signal in its own vocabulary: nothing in the
cache depends on the student. :class:`CrossTokenizerCache` serves it to any student family:

1. each student example is paired with the same example in the teacher's tokens (``example_map``) and its
   target rows with the cached rows that predict the same response text
   (:func:`~potstill.data.cross_tokenizer.response_alignment`; computed once per example);
2. the aligned cached rows are projected onto the student's vocabulary with the vocabulary map
   (:func:`project_sparse` for top-k and sampled rows, :func:`~potstill.models.vocab_map.project_teacher`
   for dense ones): the teacher's distribution conditioned on a mappable next token, as in live
   cross-tokenizer KD (:class:`~potstill.kd.cross_tokenizer.CrossTokenizerKDTrainer`, ``vocab_map``);
3. the signal covers every target row of the batch; rows that are not aligned, or whose cached ids map to
   no student token, are marked not ``valid`` and get divergence weight 0 in
   :class:`~potstill.kd.KDTrainer` (cross-entropy still trains them). The loss is then the live trainer's:
   ``[alpha * CE(all rows) + (1 - alpha) * s * D(valid rows)] / N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from ...errors import PotstillError
from ...models.vocab_map import DEFAULT_KINDS, KINDS, VocabMap, project_teacher
from ..cross import MaskedDenseSignal
from ..types import DenseSignal, SparseSignal
from .read import CachedSignal


def _mapped(ids: Tensor, vmap: VocabMap, kinds: Sequence[str]) -> Tensor:
    """Student id of every teacher id in ``ids``, or -1 (unmapped, a kind not in ``kinds``, past the map)."""
    codes = torch.tensor([KINDS.index(k) for k in kinds], dtype=torch.long)
    inside = (ids >= 0) & (ids < vmap.teacher_vocab)
    t = ids.clamp(0, vmap.teacher_vocab - 1).cpu()
    s = vmap.student_ids[t]
    ok = inside.cpu() & torch.isin(vmap.kinds[t], codes) & (s >= 0)
    return torch.where(ok, s, torch.full_like(s, -1)).to(ids.device)


def project_sparse(
    signal: SparseSignal, vmap: VocabMap, student_vocab: int, kinds: Sequence[str] = DEFAULT_KINDS
) -> tuple[SparseSignal, Tensor]:
    """A top-k or sampled teacher signal over the teacher's vocabulary -> the same over the student's, and
    the share of each row's stored mass that maps ``[n]`` (top-k: of its k ids; sampled: of its draws'
    weights; 0: nothing mapped, the row then holds a placeholder and ``valid`` is false).

    Slots whose teacher id maps to no student token (or to a kind outside ``kinds``) are dropped; slots
    mapping to one student id are merged (log-sum-exp of their log-probs, sum of their sampling weights).
    The rest is renormalized as :func:`~potstill.models.vocab_map.project_teacher` does, so the result is
    the teacher conditioned on a mappable next token:

    * top-k: over the mapped slots and the tail, taken as mappable (its split is not stored);
      ``renormalize`` (no tail): over the mapped slots;
    * sampled: the mapped mass is estimated by the mapped slots' weights ``W`` (unbiased), weights become
      ``w / W`` and log-probs ``log p - log W``. A student id's probability sums only the teacher ids that
      were drawn; the forward-KL gradient ``-sum_i w_i grad log q(s_i)`` does not use it and stays unbiased
      for the conditioned teacher up to the self-normalization by ``W``.

    Exact for a top-k row that holds the whole teacher vocabulary (equals ``project_teacher``).
    """
    ids, lp = signal.ids, signal.logprobs.float()
    n, k = ids.shape
    dev = ids.device
    s_ids = _mapped(ids, vmap, kinds)
    ok = (s_ids >= 0) & torch.isfinite(lp)
    w = None if signal.weights is None else signal.weights.float()
    if w is not None:
        ok &= w > 0
    row = torch.arange(n, device=dev).unsqueeze(1).expand(n, k)
    key = (row * student_vocab + s_ids.clamp_min(0))[ok]
    groups, inverse = torch.unique(key, sorted=True, return_inverse=True)
    g = groups.numel()
    vals = lp[ok]
    peak = torch.full((g,), float("-inf"), device=dev).scatter_reduce(0, inverse, vals, reduce="amax")
    summed = torch.zeros(g, device=dev).index_add_(0, inverse, torch.exp(vals - peak[inverse]))
    g_lp = peak + torch.log(summed)
    g_row, g_sid = groups // student_vocab, groups % student_vocab
    count = torch.bincount(g_row, minlength=n)
    first = torch.cumsum(count, 0) - count
    pos = torch.arange(g, device=dev) - first[g_row]
    width = max(1, int(count.max()) if n else 1)
    out_ids = torch.zeros((n, width), dtype=torch.long, device=dev)
    out_lp = torch.full((n, width), float("-inf"), device=dev)
    out_ids[g_row, pos] = g_sid
    out_lp[g_row, pos] = g_lp
    if w is not None:
        g_w = torch.zeros(g, device=dev).index_add_(0, inverse, w[ok])
        out_w = torch.zeros((n, width), device=dev)
        out_w[g_row, pos] = g_w
        mass = out_w.sum(1)
        valid = mass > 0
        log_z = torch.log(torch.where(valid, mass, torch.ones_like(mass)))
        out_w = out_w / torch.where(valid, mass, torch.ones_like(mass)).unsqueeze(1)
        out_lp = out_lp - log_z.unsqueeze(1)
        out_w[~valid, 0] = 1.0
        out_lp[~valid, 0] = 0.0
        return SparseSignal(ids=out_ids, logprobs=out_lp, weights=out_w, valid=valid), mass
    top = torch.logsumexp(out_lp, dim=1)  # log of the mapped top-k mass (-inf: none)
    valid = torch.isfinite(top)
    stored = torch.logsumexp(torch.where(torch.isfinite(lp), lp, torch.full_like(lp, float("-inf"))), dim=1)
    mass = torch.where(valid, torch.exp(top - stored), torch.zeros_like(top))
    tail = None
    if signal.tail == "bucket":
        t = signal.tail_logprob
        if t is None:  # the tail as the teacher's top-k left it
            t = torch.log1p(-torch.exp(torch.logsumexp(lp, dim=1)).clamp(max=1.0))
        log_z = torch.logaddexp(top, t.float())
        tail = t.float() - log_z
    else:
        log_z = top
    log_z = torch.where(valid, log_z, torch.zeros_like(log_z))
    out_lp = out_lp - log_z.unsqueeze(1)
    out_lp[~valid, 0] = 0.0  # placeholder: all mass on id 0 (weight 0 in training)
    if tail is not None:
        tail = torch.where(valid, tail, torch.full_like(tail, float("-inf")))
    return SparseSignal(ids=out_ids, logprobs=out_lp, tail=signal.tail, tail_logprob=tail, valid=valid), mass


@dataclass(frozen=True)
class Projection:
    """What a student with another tokenizer reads of a teacher's rows: the teacher's distribution over its
    own vocabulary projected onto the student's through ``vocab_map`` (the ``kinds`` of match the run
    names), conditioned on a mappable next token. :class:`CrossTokenizerCache` serves its rows through it
    and the cache's certificate (:mod:`~.certify`) measures through it."""

    vocab_map: VocabMap
    student_vocab: int
    kinds: tuple[str, ...] = tuple(DEFAULT_KINDS)

    def sparse(self, signal: SparseSignal) -> tuple[SparseSignal, Tensor]:
        """A cached top-k or sampled signal's rows as the student reads them, and each row's mapped share
        (:func:`project_sparse`; ``valid`` false: nothing mapped)."""
        return project_sparse(signal, self.vocab_map, self.student_vocab, self.kinds)

    def dense(self, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Teacher logits ``[R, V_t]`` -> student-vocabulary logits ``[R, V_s]`` whose ``log_softmax(x / T)``
        is the projected teacher at ``T`` (the reducer's view), and the mapped mass ``[R]`` (0: none)."""
        T = float(temperature)
        lp = torch.log_softmax(teacher_logits.float() / T, dim=-1)
        projected, mass = project_teacher(lp, self.vocab_map, self.student_vocab, self.kinds)
        return projected * T, mass


class CrossTokenizerCache:
    """A teacher-signal cache in the teacher's tokens as the signal source of a student with another
    tokenizer (module docstring).

    ``example_map``: student example id -> cached (teacher-side) example id; a student example without one
    (its prompt did not fit the teacher's ``max_length``) gets CE only. ``temperature``: the distillation
    temperature; a top-k or sampled cache holds one (the run must use it), a dense cache any.
    """

    def __init__(
        self,
        cache: CachedSignal,
        *,
        student_tokenizer,
        teacher_tokenizer,
        teacher_examples: list[dict],
        example_map: dict[int, int],
        vocab_map: VocabMap,
        student_vocab: int,
        kinds: Sequence[str] = DEFAULT_KINDS,
        temperature: float = 1.0,
    ):
        if cache.vocab_size > vocab_map.teacher_vocab and cache.kind == "dense":
            raise PotstillError(
                f"the cache holds {cache.vocab_size} teacher ids but the vocab map covers {vocab_map.teacher_vocab}; "
                "build the map from the teacher's own tokenizer"
            )
        self.cache = cache
        self._setup(
            student_tokenizer, teacher_tokenizer, teacher_examples, example_map, vocab_map, student_vocab, kinds
        )
        self.temperature = float(temperature) if cache.kind == "dense" else cache.temperature

    def _setup(
        self, student_tokenizer, teacher_tokenizer, teacher_examples, example_map, vocab_map, student_vocab, kinds
    ):
        from ...models.vocab_map import special_ids

        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_examples = teacher_examples
        self.example_map = example_map
        self.vocab_map = vocab_map
        self.vocab_size = int(student_vocab)
        self.kinds = tuple(kinds)
        self.projection = Projection(vocab_map, self.vocab_size, self.kinds)
        self._s_special = special_ids(student_tokenizer)
        self._t_special = special_ids(teacher_tokenizer)
        self._alignments: dict[int, list[int]] = {}
        self._cov = {"rows": 0.0, "aligned": 0.0, "valid": 0.0, "mass": 0.0}
        self.forward_tokens = 0  # nothing read by a live teacher

    def to(self, device) -> CrossTokenizerCache:
        return self

    def _alignment(self, sid: int, ids: Tensor, labels: Tensor) -> list[int]:
        from ...data.cross_tokenizer import response_alignment

        if sid not in self._alignments:
            tid = self.example_map.get(sid)
            n = int((labels[1:] != -100).sum())
            if tid is None:
                self._alignments[sid] = [-1] * n
            else:
                t = self.teacher_examples[tid]
                self._alignments[sid] = response_alignment(
                    self.student_tokenizer,
                    ids.tolist(),
                    labels.tolist(),
                    self.teacher_tokenizer,
                    t["input_ids"],
                    t["labels"],
                    student_special=self._s_special,
                    teacher_special=self._t_special,
                )
        return self._alignments[sid]

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor]) -> SparseSignal | MaskedDenseSignal:
        from ...data.packing import segments

        labels = batch["labels"]
        given = batch.get("example_id")
        if given is None:
            raise PotstillError(
                "a cross-tokenizer cache finds examples by example_id and the batch has none; keep the "
                "example_id column (potstill's data pipeline adds it)"
            )
        ids = batch["input_ids"].detach().cpu()
        lab = labels.detach().cpu()
        segs = segments(batch)
        teacher_rows: list[tuple[int, int] | None] = []  # per student target row: (cached example, its row)
        wanted: list[int] = []  # teacher example ids to gather, in order
        offset: dict[int, int] = {}
        for b, (row, start, end) in enumerate(segs):
            sid = int(given[b])
            upto = segs[b + 1][1] if b + 1 < len(segs) and segs[b + 1][0] == row else lab.shape[1]
            want = int((lab[row, start + 1 : upto] != -100).sum())
            align = self._alignment(sid, ids[row, start:end], lab[row, start:end])
            if len(align) != want:
                raise PotstillError(
                    f"example {sid}: {want} target tokens in the batch but {len(align)} in the example; "
                    "rebuild the batch without labels on padding"
                )
            tid = self.example_map.get(sid)
            if tid is not None and tid not in offset and any(a >= 0 for a in align):
                offset[tid] = -1  # placed below, once the example's row count is known
                wanted.append(tid)
            teacher_rows.extend((tid, a) if tid is not None and a >= 0 else None for a in align)
        n = len(teacher_rows)
        base = 0
        parts = self._teacher_parts(wanted)
        for t, ex in zip(wanted, parts):
            offset[t] = base
            base += ex.rows
        flat = [-1 if r is None else offset[r[0]] + r[1] for r in teacher_rows]
        index = torch.tensor(flat, dtype=torch.long)
        aligned = (index >= 0).nonzero().squeeze(1)
        self._cov["rows"] += n
        self._cov["aligned"] += aligned.numel()
        dev = labels.device
        if self._dense_rows():
            dense = self._dense(parts, index, aligned, n)
            valid = cast(Tensor, dense.valid)
            self._cov["valid"] += float(valid.sum())
            return MaskedDenseSignal(logits=cast(Tensor, dense.logits).to(dev), valid=valid.to(dev))
        sparse = self._sparse(parts, index, aligned, n)
        self._cov["valid"] += float(cast(Tensor, sparse.valid).sum())
        return sparse.to(dev)

    def _teacher_parts(self, wanted: list[int]) -> list:
        """The teacher rows of these (teacher-side) examples, each with ``.rows``: read from the cache."""
        return [self.cache.example(t) for t in wanted]

    def _dense_rows(self) -> bool:
        return self.cache.kind == "dense"

    def _sparse(self, parts, index: Tensor, aligned: Tensor, n: int) -> SparseSignal:
        if parts:
            teacher = self.cache._combine(parts).rows(index.index_select(0, aligned))
        else:
            teacher = SparseSignal(ids=torch.zeros((0, 1), dtype=torch.long), logprobs=torch.zeros((0, 1)))
            if self.cache.kind == "sampled":
                teacher.weights = torch.zeros((0, 1))
            elif self.cache.tail == "bucket":
                teacher.tail_logprob = torch.zeros(0)
        projected, mass = self.projection.sparse(teacher)
        self._cov["mass"] += float(mass.sum())
        width = projected.ids.shape[1]
        ids = torch.zeros((n, width), dtype=torch.long)
        lp = torch.full((n, width), float("-inf"))
        lp[:, 0] = 0.0  # unaligned rows: a finite placeholder, weight 0
        ids[aligned], lp[aligned] = projected.ids, projected.logprobs
        valid = torch.zeros(n, dtype=torch.bool)
        valid[aligned] = cast(Tensor, projected.valid)
        out = SparseSignal(ids=ids, logprobs=lp, tail=projected.tail, valid=valid)
        if projected.weights is not None:
            weights = torch.zeros((n, width))
            weights[:, 0] = 1.0
            weights[aligned] = projected.weights
            out.weights = weights
        if projected.tail_logprob is not None:
            tail = torch.full((n,), float("-inf"))
            tail[aligned] = projected.tail_logprob
            out.tail_logprob = tail
        return out

    def _row_logits(self, parts):
        """``rows -> teacher logits`` (any scale: log-softmax follows) over the gathered examples' rows; the
        cached rows are decoded once per batch."""
        decoded = cast(Tensor, cast(DenseSignal, self.cache._dense(parts, "cpu")).logits)
        return lambda rows: decoded[rows]

    def _dense(self, parts, index: Tensor, aligned: Tensor, n: int, chunk: int = 256) -> MaskedDenseSignal:
        T = float(self.temperature or 1.0)
        logits = torch.zeros((n, self.vocab_size))
        valid = torch.zeros(n, dtype=torch.bool)
        if parts:
            rows = index.index_select(0, aligned)
            row_logits = self._row_logits(parts)
            for s in range(0, rows.numel(), chunk):
                sl = slice(s, s + chunk)
                projected, mass = self.projection.dense(row_logits(rows[sl]).cpu(), T)
                logits[aligned[sl]] = projected
                valid[aligned[sl]] = mass > 0
                self._cov["mass"] += float(mass.sum())
        return MaskedDenseSignal(logits=logits, valid=valid)

    def coverage(self) -> dict[str, float]:
        """Shares of the student's target rows aligned to a cached row and informed by it (aligned, some
        cached mass mapped), and the mean share of an aligned cached row's stored mass (its k ids, or its
        draws) that maps onto student tokens (dense: of the whole distribution)."""
        c = self._cov
        rows = max(c["rows"], 1.0)
        return {
            "rows": int(c["rows"]),
            "aligned_row_share": c["aligned"] / rows,
            "kd_row_share": c["valid"] / rows,
            "teacher_mass_used": c["mass"] / max(c["aligned"], 1.0),
        }


class _Forward:
    """One teacher-side example's rows in a live forward: ``rows`` target rows at ``positions`` of batch row ``b``."""

    def __init__(self, b: int, positions: list[int]):
        self.b, self.positions, self.rows = b, positions, len(positions)


class OwnViewTeacher(CrossTokenizerCache):
    """The live counterpart of :class:`CrossTokenizerCache`: the teacher reads its *own* encoding of each pair
    (its own chat template) and its rows are aligned to the student's on the response, as from the cache.
    ``method: {kind: cross_tokenizer, align: vocab_map, teacher_view: own}``. The default live view
    (:class:`~potstill.kd.cross_tokenizer.CrossTokenizerKDTrainer`) has the teacher read the student's text,
    chat markup included. The teacher runs once per batch without grad on the batch's teacher-side examples;
    ``[chunk, V_t]`` logits exist for one chunk of aligned rows at a time."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        *,
        student_tokenizer,
        teacher_tokenizer,
        teacher_examples: list[dict],
        example_map: dict[int, int],
        vocab_map: VocabMap,
        student_vocab: int,
        kinds: Sequence[str] = DEFAULT_KINDS,
        temperature: float = 1.0,
    ):
        from ...data.collate import PadCollator, pad_id

        self.teacher = teacher
        self._setup(
            student_tokenizer, teacher_tokenizer, teacher_examples, example_map, vocab_map, student_vocab, kinds
        )
        self.temperature = float(temperature)
        self._collate = PadCollator(pad_id(teacher_tokenizer))
        self._hidden: Tensor | None = None

    def to(self, device) -> OwnViewTeacher:
        self.teacher.to(device)
        return self

    def _dense_rows(self) -> bool:
        return True

    def _teacher_parts(self, wanted: list[int]) -> list:
        from ...models import final_hidden

        self._hidden = None
        if not wanted:
            return []
        exs = [self.teacher_examples[t] for t in wanted]
        batch = self._collate([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in exs])
        if self.teacher.training:
            self.teacher.eval()
        dev = next(self.teacher.parameters()).device
        ids, mask = batch["input_ids"], batch["attention_mask"]
        self._hidden = final_hidden(self.teacher, ids.to(dev), mask.to(dev))
        self.forward_tokens += int(mask.sum())
        return [
            _Forward(b, [k - 1 for k in range(1, len(e["labels"])) if e["labels"][k] != -100])
            for b, e in enumerate(exs)
        ]

    def _row_logits(self, parts):
        from ...models import output_head

        hidden = cast(Tensor, self._hidden)
        length = hidden.shape[1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        where = torch.tensor([p.b * length + q for p in parts for q in p.positions], dtype=torch.long)
        head = output_head(self.teacher)
        return lambda rows: head(flat.index_select(0, where[rows].to(flat.device)))


__all__ = ["CrossTokenizerCache", "OwnViewTeacher", "Projection", "project_sparse"]
