"""Multiple-choice scoring by log-likelihood: which of a fixed set of answers a model finds likeliest
after a prompt (the ``acc`` of lm-evaluation-harness's multiple-choice tasks, e.g. ``pubmedqa``).

For a prompt ``x`` (token ids, chat template already applied) and choices ``c_1..c_C`` (each a
token sequence), the score of choice ``j`` is ``sum_t log p(c_j,t | x, c_j,<t)``, unnormalised
by length, and the prediction is its argmax. Softmax over the ``C`` scores gives the
probabilities that :func:`~potstill.eval.cls_metrics.classification_metrics` reads (accuracy,
macro-F1, ECE).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import PotstillError


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def choice_scores(
    model,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
) -> Tensor:
    """``[N, C]`` float64 summed log-likelihoods of each choice after each prompt.

    One forward per sequence ``prompt + choice``, right-padded in batches; where every choice is
    one token, one forward per prompt reads all ``C`` scores from its last position.
    """
    if not prompts or not choices:
        raise PotstillError("choice scoring needs at least one prompt and one choice")
    if any(len(c) == 0 for c in choices):
        raise PotstillError("a choice encodes to no tokens; give non-empty choice strings")
    if any(len(p) == 0 for p in prompts):
        raise PotstillError("a prompt encodes to no tokens; give non-empty prompts")
    was_training = model.training
    model.eval()
    try:
        if all(len(c) == 1 for c in choices):
            first = torch.tensor([c[0] for c in choices])
            rows = [list(p) for p in prompts]
            last = _last_logprobs(model, rows, pad_id, batch_size)  # [N, V]
            return last[:, first].double()
        seqs = [list(p) + list(c) for p in prompts for c in choices]
        starts = [len(p) for p in prompts for _ in choices]
        scores = _sequence_scores(model, seqs, starts, pad_id, batch_size)
        return scores.view(len(prompts), len(choices))
    finally:
        model.train(was_training)


def _batches(seqs: list[list[int]], pad_id: int, batch_size: int):
    for start in range(0, len(seqs), batch_size):
        part = seqs[start : start + batch_size]
        width = max(len(s) for s in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, s in enumerate(part):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        yield start, part, ids, mask


def _hidden(model, ids: Tensor, mask: Tensor) -> Tensor:
    """Post-final-norm hidden states ``[B, T, H]``: the head is applied only to the rows that are scored, never
    to a full ``[B, T, V]`` logits tensor."""
    from ..models import final_hidden

    dev = _device(model)
    return final_hidden(model, ids.to(dev), mask.to(dev))


def _last_logprobs(model, seqs: list[list[int]], pad_id: int, batch_size: int) -> Tensor:
    from ..models import output_head

    head = output_head(model)
    out = []
    for _, part, ids, mask in _batches(seqs, pad_id, batch_size):
        hidden = _hidden(model, ids, mask)
        ends = torch.tensor([len(s) - 1 for s in part], device=hidden.device)
        last = head(hidden[torch.arange(len(part), device=hidden.device), ends]).float()
        out.append(torch.log_softmax(last, -1).cpu())
    return torch.cat(out)


def _sequence_scores(model, seqs: list[list[int]], starts: list[int], pad_id: int, batch_size: int) -> Tensor:
    from ..models import output_head

    head = output_head(model)
    out = torch.empty(len(seqs), dtype=torch.float64)
    for offset, part, ids, mask in _batches(seqs, pad_id, batch_size):
        hidden = _hidden(model, ids, mask)
        for row, s in enumerate(part):
            begin = starts[offset + row]
            targets = torch.tensor(s[begin:], device=hidden.device)
            logp = torch.log_softmax(head(hidden[row, begin - 1 : len(s) - 1]).float(), -1)
            out[offset + row] = logp.gather(-1, targets.view(-1, 1)).double().sum().cpu()
    return out


def choice_metrics(scores: Tensor, gold: Sequence[int]) -> dict:
    """Accuracy, macro-F1 and ECE of the argmax choice (``classification_metrics`` over softmaxed scores),
    plus how often each choice was predicted."""
    from .cls_metrics import classification_metrics

    probs = torch.softmax(scores.double(), -1)
    m = classification_metrics(probs, list(gold))
    m["predicted"] = torch.bincount(probs.argmax(-1), minlength=scores.shape[-1]).tolist()
    return m
