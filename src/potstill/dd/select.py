"""Data selection: per-example scores from model outputs, and filters that keep or drop.

**Scores.** Every scorer returns one value per example, ``Tensor [N]`` (float64), in the
order of ``examples`` (encoded examples: ``input_ids`` and ``labels`` with ``-100`` on
prompt tokens, as :func:`potstill.data.encode_example` makes them). The response tokens
``A`` of an example are its *target* tokens: ``labels[t]`` for ``t >= 1`` with
``labels[t] != -100`` (position ``t - 1`` predicts them; :func:`potstill.signals.target_index`).

* :func:`example_stats` -- one pass of one model over the dataset: the mean NLL of ``A``
  given the prompt, ``L(A|Q)``, and of ``A`` alone, ``L(A)`` (the same token ids after a
  start token, no prompt), in the *same* forward call per batch.
* :func:`ifd_loss_ratio` -- Cherry LLM's IFD (Li et al. 2024, "From Quantity to Quality"):
  ``s(A|Q) / s(A)``, the conditioned over the direct answer score, each a mean
  cross-entropy: ``L(A|Q) / L(A)``.
* :func:`ifd_ppl_ratio` -- Superfiltering's IFD (Li et al. 2024, "Superfiltering:
  Weak-to-Strong Data Filtering"): ``PPL(A|Q) / PPL(A) = exp(L(A|Q) - L(A))``, a ratio of
  perplexities.
  The two agree on which side of 1 an example lies, but rank differently: the first
  orders by ``L(A|Q) / L(A)``, the second by ``L(A|Q) - L(A)``. Both names exist because
  "IFD" means either in the literature (GUIDE: names that mean two things).
* :func:`perplexity_score` -- ``exp(L(A|Q))``.
* :func:`kd_stats`, :func:`kd_divergence_score`, :func:`confident_teacher_unsure_student`
  -- teacher-student scores from one forward pass per model per batch; the teacher is a
  live model *or* any :class:`~potstill.signals.SignalSource` (an ``OnlineTeacher``, a
  ``CachedSignal``), so the cache written for KD also scores the data: one teacher
  pass feeds both soft targets and data scores.

**Filters** (GUIDE item 9; datatrove's ``filter(doc) -> bool | (False, reason)``): a filter
is ``f(example, index) -> True | (False, reason)``. :func:`filter_stream` is a generator
that yields each example with ``None`` (kept) or the reason of the first filter that
dropped it; :func:`apply_filters` collects it into a :class:`Selection` with a
:class:`SelectionReport`. A reason's *key* (what the report counts) is its text before
the first ``" ("``; per-example details (values, indices) go inside the parentheses,
e.g. ``"score below cut (ifd_loss_ratio=0.31 < 0.52)"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import PotstillError

IGNORE_INDEX = -100

Filter = Callable[[Any, int], "bool | tuple[bool, str]"]
"""``f(example, index) -> True | (False, reason)``; ``index`` is the example's position in the input."""


# =============================================================================== filters


def reason_key(reason: str) -> str:
    """The part of a drop reason that a :class:`SelectionReport` counts: its text before ``" ("``."""
    head = reason.split(" (", 1)[0].strip()
    return head or reason


@dataclass(frozen=True)
class Dropped:
    """An example that a filter dropped: its input ``index``, the ``reason``, and the example."""

    index: int
    reason: str
    example: Any = field(repr=False, compare=False)

    @property
    def key(self) -> str:
        return reason_key(self.reason)


@dataclass
class SelectionReport:
    """Counts of one selection: ``total = kept + sum(dropped.values())``.

    ``dropped`` maps each reason key (:func:`reason_key`) to its count, in the order the
    keys were first seen.
    """

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str | None) -> None:
        self.total += 1
        if reason is None:
            self.kept += 1
        else:
            key = reason_key(reason)
            self.dropped[key] = self.dropped.get(key, 0) + 1

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped)}

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in self.dropped.items())
        return f"kept {self.kept} of {self.total}" + (f"; dropped {self.num_dropped} ({parts})" if parts else "")


@dataclass
class Selection:
    """What :func:`apply_filters` returns.

    ``kept`` (examples, input order), ``kept_index`` (their input indices), ``dropped``
    (:class:`Dropped`, input order, each with its reason) and ``report``. Unpacks as
    ``kept, dropped = apply_filters(...)``.
    """

    kept: list
    kept_index: list[int]
    dropped: list[Dropped]
    report: SelectionReport

    def __iter__(self):
        return iter((self.kept, self.dropped))


def _filter_name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def _verdict(f, example, index: int) -> str | None:
    """Run one filter; ``None`` = keep, else the reason (non-empty string)."""
    out = f(example, index)
    if out is True:
        return None
    if isinstance(out, tuple) and len(out) == 2 and out[0] is False:
        reason = out[1]
        if isinstance(reason, str) and reason.strip():
            return reason
    raise PotstillError(
        f"filter {_filter_name(f)} returned {out!r} for example #{index}; a filter must return True "
        "or (False, 'reason')"
    )


def filter_stream(examples: Iterable, filters: Sequence[Filter]) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(index, example, reason)`` for each example, ``reason = None`` when kept.

    Filters run in order; the first that drops an example names the reason and the later
    ones do not see it (so stateful filters such as deduplication only remember kept
    examples). A generator: nothing runs until it is iterated.
    """
    for index, example in enumerate(examples):
        reason = None
        for f in filters:
            reason = _verdict(f, example, index)
            if reason is not None:
                break
        yield index, example, reason


def apply_filters(examples: Iterable, filters: Sequence[Filter]) -> Selection:
    """Run :func:`filter_stream` to the end: ``Selection(kept, kept_index, dropped, report)``."""
    kept, kept_index, dropped = [], [], []
    report = SelectionReport()
    for index, example, reason in filter_stream(examples, filters):
        report.add(reason)
        if reason is None:
            kept.append(example)
            kept_index.append(index)
        else:
            dropped.append(Dropped(index, reason, example))
    return Selection(kept, kept_index, dropped, report)


def _as_scores(scores, name: str) -> Tensor:
    t = torch.as_tensor(scores).detach().to("cpu", torch.float64).reshape(-1)
    if t.numel() == 0:
        raise PotstillError(f"no {name} scores (empty dataset); score at least one example")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise PotstillError(
            f"{name} score of example #{i} is {t[i].item()} ({int(bad.sum())} non-finite in all); "
            "drop or fix those examples before selecting by score"
        )
    return t


def _score_at(scores: Tensor, index: int, name: str) -> float:
    if not 0 <= index < scores.numel():
        raise PotstillError(
            f"{name} has {scores.numel()} scores but example #{index} was filtered; "
            "score exactly the examples you filter, in the same order"
        )
    return float(scores[index])


def top_k(
    scores, k: int | None = None, *, fraction: float | None = None, largest: bool = True, name: str = "score"
) -> Filter:
    """A filter keeping the ``k`` (or ``ceil(fraction * N)``) best of ``scores [N]``.

    Exactly ``k`` are kept; ties at the cut go to the lower index. The cut is taken over
    all ``N`` scores, so put ``top_k`` first or score only the examples that reach it.
    Drop reason: ``"score below cut (name=x < cut)"`` (``largest=True``) or
    ``"score above cut (name=x > cut)"``.
    """
    s = _as_scores(scores, name)
    n = s.numel()
    if (k is None) == (fraction is None):
        raise PotstillError("top_k needs exactly one of k or fraction; pass k=<count> or fraction=<0..1>")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise PotstillError(f"top_k fraction={fraction} must be in (0, 1]")
        k = math.ceil(fraction * n)
    if not 1 <= k <= n:
        raise PotstillError(f"top_k k={k} must be in [1, {n}] (the number of scored examples)")
    # Stable sort on (-s or s): ties keep input order, so the lower index wins.
    order = torch.sort(-s if largest else s, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:k]] = True
    cut = float(s[order[k - 1]])
    word, op = ("below", "<") if largest else ("above", ">")

    def top_k_filter(example, index: int):
        x = _score_at(s, index, name)
        if keep[index]:
            return True
        return False, f"score {word} cut ({name}={x:.6g} {op} {cut:.6g})"

    return top_k_filter


def score_threshold(
    scores, *, min: float | None = None, max: float | None = None, name: str = "score", reason: str | None = None
) -> Filter:
    """A filter keeping ``min <= scores[i] <= max`` (either bound optional).

    Drop reason: ``reason`` if given, else ``"{name} below {min}"`` / ``"{name} above {max}"``,
    with the value in parentheses.
    """
    s = _as_scores(scores, name)
    if min is None and max is None:
        raise PotstillError("score_threshold needs min=, max= or both")
    lo, hi = min, max

    def threshold_filter(example, index: int):
        x = _score_at(s, index, name)
        if lo is not None and x < lo:
            return False, f"{reason or f'{name} below {lo:g}'} ({name}={x:.6g})"
        if hi is not None and x > hi:
            return False, f"{reason or f'{name} above {hi:g}'} ({name}={x:.6g})"
        return True

    return threshold_filter


IFD_ABOVE_ONE = "ifd>1: response not helped by the instruction"


def drop_ifd_above_one(ifd, *, name: str = "ifd_loss_ratio") -> Filter:
    """Drop examples with IFD > 1 (as Cherry LLM and Superfiltering do, Li et al. 2024):
    the prompt makes the response *harder* to predict, so the pair is treated as misaligned.

    Works for either IFD (:func:`ifd_loss_ratio` or :func:`ifd_ppl_ratio`): both are > 1
    exactly when ``L(A|Q) > L(A)``. Reason: ``"ifd>1: response not helped by the instruction (name=x)"``.
    """
    return score_threshold(ifd, max=1.0, name=name, reason=IFD_ABOVE_ONE)


def keep_indices(indices, reason: str | Mapping[int, str]) -> Filter:
    """A filter keeping exactly ``indices`` (e.g. a subset from :mod:`potstill.dd.diversity`).

    ``reason`` is one string for every other example, or a map index -> reason (examples
    missing from it get ``"not selected"``).
    """
    keep = {int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()}

    def keep_indices_filter(example, index: int):
        if index in keep:
            return True
        if isinstance(reason, str):
            return False, reason
        return False, reason.get(index, "not selected")

    return keep_indices_filter


# =============================================================================== scores


def _check_examples(examples: Sequence[dict], what: str = "examples") -> None:
    if examples is None or len(examples) == 0:
        raise PotstillError(f"no {what} to score (empty dataset); check the data section of the recipe")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping) or "input_ids" not in ex or "labels" not in ex:
            raise PotstillError(
                f"{what} #{i} has no input_ids/labels; encode examples with potstill.data.encode_example"
            )
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise PotstillError(f"{what} #{i}: input_ids and labels differ in length; re-encode it")
        if not any(int(t) != IGNORE_INDEX for t in list(ex["labels"])[1:]):
            raise PotstillError(
                f"{what} #{i} has no response token (every label is -100); drop it before scoring "
                "(e.g. a prompt that fills max_length)"
            )


def response_tokens(example: Mapping) -> list[int]:
    """The target tokens ``A`` of an example: ``labels[t]`` for ``t >= 1`` and ``labels[t] != -100``."""
    return [int(t) for t in list(example["labels"])[1:] if int(t) != IGNORE_INDEX]


def response_only_example(example: Mapping, start_token_id: int) -> dict[str, list[int]]:
    """The response of ``example`` without its prompt: ``[start] + A``, labels ``[-100] + A``.

    The targets are the very token ids scored in the prompted example, so ``L(A|Q)`` and
    ``L(A)`` average the same tokens (Cherry LLM scores the answer alone after the
    tokenizer's BOS; ``start_token_id`` plays that role).
    """
    a = response_tokens(example)
    return {"input_ids": [int(start_token_id)] + a, "attention_mask": [1] * (len(a) + 1), "labels": [IGNORE_INDEX] + a}


@contextmanager
def _eval_mode(*models: torch.nn.Module):
    """Eval mode (no dropout) for the duration, then each model's own mode again."""
    states = [(m, m.training) for m in models if isinstance(m, torch.nn.Module)]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was in states:
            m.train(was)


def _device_of(model: torch.nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _pad_id(model: torch.nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    from ..models.head import text_config

    p = getattr(text_config(model), "pad_token_id", None)
    return int(p) if p is not None else 0  # right padding under an attention mask: any id works


def _batches(examples: Sequence[dict], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``examples`` in batches of similar length (longest first, so memory fails early)."""
    if batch_size < 1:
        raise PotstillError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    for b in range(0, len(order), batch_size):
        yield order[b : b + batch_size]


def _row_owner(labels: Tensor) -> Tensor:
    """For each row of :func:`target_index` (row-major), the batch row it belongs to: ``[n]``."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]


def _row_targets(labels: Tensor) -> Tensor:
    """The label each target row predicts: ``[n]``."""
    lab = labels[:, 1:]
    return lab[lab != IGNORE_INDEX]


def _model_signal(model: torch.nn.Module, batch: dict[str, Tensor]):
    """``DenseSignal(hidden=[n, H], head)`` of a model's own target rows (no ``[n, V]`` yet)."""
    from ..models import final_hidden, output_head
    from ..signals import DenseSignal, target_index, target_rows

    device = _device_of(model)
    hidden = final_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    rows = target_rows(hidden, target_index(batch["labels"].to(device)))
    return DenseSignal(hidden=rows, head=output_head(model))


def _entropy(lp: Tensor) -> Tensor:
    """``-sum p log p`` over the last dim from log-probs (``0 log 0 = 0``)."""
    p = lp.exp()
    return -(p * torch.where(torch.isneginf(lp), torch.zeros_like(lp), lp)).sum(-1)


@torch.no_grad()
def example_stats(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    batch_size: int = 8,
    start_token_id: int | None = None,
    response_only: Sequence[dict] | None = None,
    chunk_size: int = 1024,
    pad_token_id: int | None = None,
) -> dict[str, Tensor]:
    """Per-example token statistics of one model, one forward call per batch.

    Each batch holds the prompted examples *and* their prompt-free responses
    (:func:`response_only_example`, or ``response_only[i]`` when given, e.g. the response
    text re-encoded on its own), run through the model together; the ``[n, V]`` logits
    are formed ``chunk_size`` rows at a time. Returns, each ``[N]`` in input order:

    * ``nll_given_prompt`` (float64): ``L(A|Q) = -1/|A| sum_t log p(a_t | Q, a_<t)``;
    * ``nll_response_only`` (float64): ``L(A) = -1/|A| sum_t log p(a_t | start, a_<t)``;
    * ``entropy_given_prompt`` (float64): mean predictive entropy (nats) over the
      positions that predict ``A`` given the prompt;
    * ``num_response_tokens`` (int64): ``|A|``.

    ``start_token_id`` defaults to the model config's ``bos_token_id``. The model runs in
    eval mode (its mode is restored afterwards).
    """
    from ..data import PadCollator

    _check_examples(examples)
    n = len(examples)
    if response_only is not None:
        if len(response_only) != n:
            raise PotstillError(
                f"response_only has {len(response_only)} examples for {n} examples; give one per example, same order"
            )
        _check_examples(response_only, "response_only example")
    else:
        if start_token_id is None:
            from ..models.head import text_config

            start_token_id = getattr(text_config(model), "bos_token_id", None)
        if start_token_id is None:
            raise PotstillError(
                "the model config has no bos_token_id to start a prompt-free response; pass start_token_id= "
                "(e.g. the tokenizer's BOS or EOS id) or response_only="
            )
    if chunk_size < 1:
        raise PotstillError(f"chunk_size={chunk_size} must be >= 1")
    collate = PadCollator(_pad_id(model, pad_token_id))
    sums = torch.zeros(3, 2 * n, dtype=torch.float64)  # nll, entropy, count per sequence
    with _eval_mode(model):
        device = _device_of(model)
        for members in _batches(examples, batch_size):
            alone = [
                response_only[i] if response_only is not None else response_only_example(examples[i], start_token_id)
                for i in members
            ]
            feats = [{k: examples[i][k] for k in ("input_ids", "labels")} for i in members]
            feats += [{k: a[k] for k in ("input_ids", "labels")} for a in alone]
            batch = collate(feats)
            sig = _model_signal(model, batch)
            labels = batch["labels"].to(device)
            owner = _row_owner(labels)
            seq = torch.tensor(members + [n + i for i in members], device=device)[owner]
            targets = _row_targets(labels)
            for s in range(0, sig.num_rows, chunk_size):
                e = min(s + chunk_size, sig.num_rows)
                lp = torch.log_softmax(sig.chunk_logits(s, e).float(), -1)
                nll = -lp.gather(-1, targets[s:e, None]).squeeze(-1)
                if not bool(torch.isfinite(nll).all()):
                    raise PotstillError("the model's logits contain NaN/inf; check its weights or load it in float32")
                idx = seq[s:e].cpu()
                sums[0].index_add_(0, idx, nll.double().cpu())
                sums[1].index_add_(0, idx, _entropy(lp).double().cpu())
                sums[2].index_add_(0, idx, torch.ones(e - s, dtype=torch.float64))
    count = sums[2]
    return {
        "nll_given_prompt": sums[0, :n] / count[:n],
        "nll_response_only": sums[0, n:] / count[n:],
        "entropy_given_prompt": sums[1, :n] / count[:n],
        "num_response_tokens": count[:n].long(),
    }


def _stat(stats: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in stats:
        raise PotstillError(f"stats have no '{key}'; compute them with potstill.dd.select.example_stats")
    return _as_scores(stats[key], key)


def ifd_loss_ratio(stats: Mapping[str, Tensor]) -> Tensor:
    """Cherry LLM's Instruction-Following Difficulty (Li et al. 2024, "From Quantity to
    Quality"): ``IFD = s(A|Q) / s(A) = L(A|Q) / L(A)``, mean cross-entropies of the response with
    and without the instruction. ``stats`` from :func:`example_stats`; returns ``[N]``.

    Not :func:`ifd_ppl_ratio`: the same name, another ranking.
    """
    num, den = _stat(stats, "nll_given_prompt"), _stat(stats, "nll_response_only")
    if bool((den <= 0).any()):
        i = int((den <= 0).nonzero()[0, 0])
        raise PotstillError(
            f"L(A) of example #{i} is {den[i].item()}, so the IFD loss ratio is undefined; "
            "use ifd_ppl_ratio or drop the example"
        )
    return num / den


def ifd_ppl_ratio(stats: Mapping[str, Tensor]) -> Tensor:
    """Superfiltering's IFD (Li et al. 2024, "Superfiltering"): ``PPL(A|Q) / PPL(A)
    = exp(L(A|Q)) / exp(L(A)) = exp(L(A|Q) - L(A))``. ``stats`` from :func:`example_stats`; ``[N]``.

    Ranks by the *difference* of losses, where :func:`ifd_loss_ratio` ranks by their ratio.
    """
    return torch.exp(_stat(stats, "nll_given_prompt") - _stat(stats, "nll_response_only"))


def perplexity_score(stats: Mapping[str, Tensor], key: str = "nll_given_prompt") -> Tensor:
    """``exp(mean NLL)`` per example, ``[N]``: the response's perplexity given the prompt
    (``key="nll_response_only"``: without it)."""
    return torch.exp(_stat(stats, key))


# ----------------------------------------------------------------------------- KD scores


def _teacher_signal(teacher, batch: dict[str, Tensor]):
    if isinstance(teacher, torch.nn.Module):
        return _model_signal(teacher, batch)
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
    from ..divergences import DIVERGENCES, sparse_divergence
    from ..divergences.sparse import coarsen
    from ..models import output_head
    from ..signals import DenseSignal, SparseSignal

    _check_examples(examples)
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
    kw = dict(divergence_kwargs or {})
    vocab = vocab_size or output_head(student).vocab
    log_v = math.log(vocab)
    f = DIVERGENCES[divergence]
    n = len(examples)
    collate = PadCollator(_pad_id(student, pad_token_id))
    sums = torch.zeros(5, n, dtype=torch.float64)  # divergence, H_T, H_S, ctus, count
    with _eval_mode(student, teacher if is_model else None):
        device = _device_of(student)
        for members in _batches(examples, batch_size):
            batch = collate([examples[i] for i in members])
            s_sig = _model_signal(student, batch)
            t_sig = _teacher_signal(teacher, {k: v.to(device) for k, v in batch.items()})
            if t_sig.num_rows != s_sig.num_rows:
                raise PotstillError(
                    f"the teacher signal has {t_sig.num_rows} rows for {s_sig.num_rows} response tokens "
                    "of the batch; the signal was made for other data: rebuild it"
                )
            if isinstance(t_sig, DenseSignal) and (
                t_sig.vocab < vocab or (vocab_size is None and t_sig.vocab != vocab)
            ):
                raise PotstillError(
                    f"teacher vocabulary ({t_sig.vocab}) and student vocabulary ({vocab}) differ; "
                    "pass vocab_size= to align vocabularies that differ only by padding rows"
                )
            owner = torch.tensor(members)[_row_owner(batch["labels"])]
            for s in range(0, s_sig.num_rows, chunk_size):
                e = min(s + chunk_size, s_sig.num_rows)
                zs = s_sig.chunk_logits(s, e, vocab).float()
                lq = torch.log_softmax(zs / temperature, -1)
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
                        h_t = _entropy(coarsen(zs, t, temperature=temperature)[1])
                else:
                    zt = t_sig.chunk_logits(s, e, vocab).to(zs.device).float()
                    if not bool(torch.isfinite(zt).all()):
                        raise PotstillError(
                            "teacher logits contain NaN/inf; check the teacher model/dtype (try float32)"
                        )
                    div = f(zs, zt, temperature=temperature, **kw)
                    h_t = _entropy(torch.log_softmax(zt / temperature, -1))
                h_s = _entropy(lq)
                ctus = (1 - h_t / log_v).clamp(0, 1) * (h_s / log_v).clamp(0, 1)
                if not bool(torch.isfinite(div).all()):
                    raise PotstillError(
                        f"{divergence} is not finite on some response tokens; check both models' "
                        "logits (NaN/inf) or choose a bounded divergence"
                    )
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
