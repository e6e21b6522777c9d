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
  pass feeds both soft targets and data scores. They live in :mod:`potstill.dd.kd_scores`
  and are re-exported here; the batching and forward-pass helpers the scorers share live in
  :mod:`potstill.dd.forward_pass`.

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import PotstillError
from .forward_pass import (
    IGNORE_INDEX,
    batches,
    check_examples,
    device_of,
    entropy,
    eval_mode,
    model_signal,
    pad_id,
    row_owner,
    row_targets,
)
from .kd_scores import confident_teacher_unsure_student, kd_divergence_score, kd_stats  # re-exported

__all__ = [
    "IFD_ABOVE_ONE",
    "IGNORE_INDEX",
    "Dropped",
    "Filter",
    "Selection",
    "SelectionReport",
    "apply_filters",
    "as_scores",
    "confident_teacher_unsure_student",
    "drop_ifd_above_one",
    "example_stats",
    "filter_stream",
    "ifd_loss_ratio",
    "ifd_ppl_ratio",
    "kd_divergence_score",
    "kd_stats",
    "keep_indices",
    "perplexity_score",
    "reason_key",
    "response_only_example",
    "response_tokens",
    "score_threshold",
    "top_k",
]

# old names, removed once dd/pipeline.py imports the public ones (from potstill.dd.forward_pass)
_batches = batches
_check_examples = check_examples
_device_of = device_of
_eval_mode = eval_mode
_pad_id = pad_id

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


def as_scores(scores, name: str) -> Tensor:
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
    s = as_scores(scores, name)
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
    s = as_scores(scores, name)
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


def _response_only_start(
    model: torch.nn.Module, n: int, response_only: Sequence[dict] | None, start_token_id: int | None
) -> int | None:
    """Check ``response_only`` (one per example) or find the start token of prompt-free responses."""
    if response_only is not None:
        if len(response_only) != n:
            raise PotstillError(
                f"response_only has {len(response_only)} examples for {n} examples; give one per example, same order"
            )
        check_examples(response_only, "response_only example")
        return start_token_id
    if start_token_id is None:
        from ..models.head import text_config

        start_token_id = getattr(text_config(model), "bos_token_id", None)
    if start_token_id is None:
        raise PotstillError(
            "the model config has no bos_token_id to start a prompt-free response; pass start_token_id= "
            "(e.g. the tokenizer's BOS or EOS id) or response_only="
        )
    return start_token_id


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

    check_examples(examples)
    n = len(examples)
    start_token_id = _response_only_start(model, n, response_only, start_token_id)
    if chunk_size < 1:
        raise PotstillError(f"chunk_size={chunk_size} must be >= 1")
    collate = PadCollator(pad_id(model, pad_token_id))
    sums = torch.zeros(3, 2 * n, dtype=torch.float64)  # nll, entropy, count per sequence
    with eval_mode(model):
        device = device_of(model)
        for members in batches(examples, batch_size):
            alone = [
                response_only[i] if response_only is not None else response_only_example(examples[i], start_token_id)
                for i in members
            ]
            feats = [{k: examples[i][k] for k in ("input_ids", "labels")} for i in members]
            feats += [{k: a[k] for k in ("input_ids", "labels")} for a in alone]
            batch = collate(feats)
            sig = model_signal(model, batch)
            labels = batch["labels"].to(device)
            owner = row_owner(labels)
            seq = torch.tensor(members + [n + i for i in members], device=device)[owner]
            targets = row_targets(labels)
            for s in range(0, sig.num_rows, chunk_size):
                e = min(s + chunk_size, sig.num_rows)
                lp = torch.log_softmax(sig.chunk_logits(s, e).float(), -1)
                nll = -lp.gather(-1, targets[s:e, None]).squeeze(-1)
                if not bool(torch.isfinite(nll).all()):
                    raise PotstillError("the model's logits contain NaN/inf; check its weights or load it in float32")
                idx = seq[s:e].cpu()
                sums[0].index_add_(0, idx, nll.double().cpu())
                sums[1].index_add_(0, idx, entropy(lp).double().cpu())
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
    return as_scores(stats[key], key)


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
