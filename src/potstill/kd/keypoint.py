"""Keypoint-based progressive rationale distillation (KPOD; Feng et al. 2024, "Keypoint-based Progressive
Chain-of-Thought Distillation for LLMs", ICML 2024, arXiv:2405.16064), on the divergence of token-level KD.

Two parts, both per-token factors of the ``kd_weights`` of :func:`potstill.divergences.chunked_kd_loss` (CE, when
``alpha > 0``, is never weighted; the normalizer stays the global count of response tokens):

* **Keypoint weights** (KPOD Sec. 4.1 weights rationale tokens by their significance to the answer). KPOD learns
  a mask generator whose keep-probabilities become the weights; this is the *measured-significance variant*: the
  significance of rationale token ``t`` is the drop of the teacher's answer log-likelihood when ``t`` alone is
  replaced by a mask token (unk, else pad, else eos),

      s_t = max(0, log p_T(a | x, r) - log p_T(a | x, r with r_t -> [mask]))

  measured once before training (one teacher forward over all masked variants of an example, in chunks). The
  weights over one rationale's ``L`` tokens are ``w_t = (1 + lambda * s_t / mean(s)) / (1 + lambda)``: their mean
  is exactly 1 (the KD term keeps the size of plain KD), ``lambda = 0`` is plain KD, a rationale whose
  tokens all have ``s = 0`` gets 1 everywhere, and a large ``lambda`` tends to ``w proportional to s``.
  Answer tokens (``" The answer is X."``) and the chat template's end tokens keep weight 1.
* **In-rationale progressive curriculum** (KPOD Sec. 4.2: first the final steps, then earlier ones, the earlier
  steps given as context). At training progress ``p`` the divergence covers only the last
  ``ceil(f(p) * L)`` of a rationale's ``L`` *steps* (lines, or sentences: :func:`potstill.data.rationale.
  rationale_steps`), plus the answer, with ``f(p) = start + (1 - start) * min(1, p / ramp)``. The paper's
  per-question schedule (a value function over step difficulty and question diversity, submodular selection)
  is replaced by this one fixed schedule for every question.

The per-token columns (``kd_token_weights``, ``kd_step_rank``, ``kd_num_steps``) are aligned with ``labels``
(:data:`potstill.data.collate.TOKEN_COLUMNS`); :func:`rationale_row_weights` takes them to the loss rows.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.rationale import rationale_steps
from ..errors import PotstillError
from ..signals import target_index

# Kinds of a response token.
RATIONALE, ANSWER, TAIL = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    """Where a ``cot`` response's tokens fall: ``kind[j]`` (RATIONALE / ANSWER / TAIL) and ``rank[j]`` (the
    rationale step's rank from the end, 1 = last step; 0 off the rationale) for each response token ``j``;
    ``steps``: the rationale's number of steps."""

    kind: list[int]
    rank: list[int]
    steps: int

    @property
    def rationale(self) -> list[int]:
        return [j for j, k in enumerate(self.kind) if k == RATIONALE]

    @property
    def answer(self) -> list[int]:
        return [j for j, k in enumerate(self.kind) if k == ANSWER]


def token_starts(tokenizer, ids: Sequence[int]) -> list[int]:
    """The character where each token of ``ids`` starts in ``tokenizer.decode(ids)`` (prefix decodes)."""
    starts, end = [], 0
    for k in range(len(ids)):
        starts.append(end)
        end = max(end, len(tokenizer.decode(list(ids[: k + 1]))))
    return starts


def response_layout(tokenizer, response_ids: Sequence[int], rationale: str, text: str) -> Layout:
    """The :class:`Layout` of ``response_ids``, the tokens of ``text = rationale + answer`` (then template tokens).

    A token belongs to the part (and step) where its first character lies. Raises ``PotstillError`` when the
    tokens do not decode back to ``text`` (a tokenizer that rewrites text: no reliable token spans).
    """
    decoded = tokenizer.decode(list(response_ids))
    if not decoded.startswith(text) and not text.startswith(decoded):  # the latter: a truncated response
        raise PotstillError(
            "rationale KD needs response tokens that decode back to the response text, and this tokenizer "
            f"decodes {decoded[:40]!r} for {text[:40]!r}; use token_weighting/curriculum other than keypoint"
        )
    spans = rationale_steps(rationale)
    kind, rank = [], []
    for c in token_starts(tokenizer, response_ids):
        if c < len(rationale):
            step = next(i for i, (a, b) in enumerate(spans) if a <= c < b)
            kind.append(RATIONALE)
            rank.append(len(spans) - step)
        else:
            kind.append(ANSWER if c < len(text) else TAIL)
            rank.append(0)
    return Layout(kind=kind, rank=rank, steps=len(spans))


@torch.no_grad()
def answer_significance(
    teacher, ids: Sequence[int], rationale: Sequence[int], answer: Sequence[int], mask_id: int, batch_size: int = 32
) -> Tensor:
    """``s [L]`` (float64, unclipped): the teacher's answer log-likelihood minus the same with rationale token
    ``rationale[i]`` replaced by ``mask_id`` (the measured-significance variant of KPOD's token weights).

    ``ids``: the whole sequence (prompt, rationale, answer, ...); ``rationale`` / ``answer``: positions in it.
    ``log p(a | ...) = sum_{j in answer} log softmax(logits[j - 1])[ids[j]]``, read from the head on the answer
    rows only. Row 0 of the batch is the unmasked sequence, rows ``1..L`` the masked variants, ``batch_size``
    rows per forward; all rows have one length, so there is no padding to get wrong. The tokens before the
    first rationale position are the same in every row: they run once and their KV cache is shared.
    """
    from ..models import cache_argument, output_head

    if not answer or not rationale:
        raise PotstillError("answer_significance needs at least one rationale and one answer position")
    end, first = max(answer) + 1, min(rationale)  # nothing after the answer can change its likelihood
    if first < 1 or max(rationale) >= min(answer):
        raise PotstillError("answer_significance needs a prompt token first and the rationale before the answer")
    device = next(teacher.parameters()).device
    base = torch.as_tensor(list(ids[:end]), dtype=torch.long, device=device)
    # logits of the last position only (the [rows, T, V] logits are never needed: the head runs on answer rows)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(teacher.forward).parameters else {}
    name = cache_argument(teacher)  # the name this transformers gives the key/value cache
    prefix = teacher(
        input_ids=base[None, :first], attention_mask=torch.ones(1, first, device=device), use_cache=True, **keep
    )
    rows = torch.tensor([j - 1 - first for j in answer], device=device)  # in the suffix [first, end)
    targets = base[list(answer)]
    head = output_head(teacher)
    positions = [None, *rationale]
    out = []
    for lo in range(0, len(positions), batch_size):
        chunk = positions[lo : lo + batch_size]
        batch = base[first:].repeat(len(chunk), 1)
        for r, j in enumerate(chunk):
            if j is not None:
                batch[r, j - first] = mask_id
        cache = copy.deepcopy(getattr(prefix, name))
        cache.batch_repeat_interleave(len(chunk))
        hidden = teacher(
            input_ids=batch,
            attention_mask=torch.ones(len(chunk), end, dtype=torch.long, device=device),
            use_cache=True,
            output_hidden_states=True,
            **keep,
            **{name: cache},
        ).hidden_states[-1]
        hidden = hidden.index_select(1, rows)
        lp = head(hidden.reshape(-1, hidden.shape[-1])).double().log_softmax(-1)
        out.append(lp.gather(-1, targets.repeat(len(chunk))[:, None]).reshape(len(chunk), -1).sum(-1))
    ll = torch.cat(out).cpu()
    return ll[0] - ll[1:]


def keypoint_weights(significance: Tensor, scale: float) -> Tensor:
    """``w [L]`` from ``s [L]``: ``(1 + scale * max(s, 0) / mean(max(s, 0))) / (1 + scale)``; mean exactly 1.

    ``scale`` is the lambda of the recipe. All-zero significance (or ``scale = 0``) gives 1 everywhere.
    """
    if scale < 0:
        raise PotstillError(f"keypoint scale={scale} must be >= 0")
    s = significance.double().clamp_min(0.0)
    mean = float(s.mean()) if s.numel() else 0.0
    if mean <= 0.0 or scale == 0.0:
        return torch.ones_like(s, dtype=torch.float32)
    return ((1.0 + scale * s / mean) / (1.0 + scale)).float()


def token_columns(n_prompt: int, layout: Layout, weights: Tensor | None) -> dict[str, list]:
    """The per-token columns of one example (``n_prompt`` prompt tokens then the response), aligned with its
    labels: keypoint weight (0 on the prompt, 1 off the rationale), step rank, number of steps."""
    w = [0.0] * n_prompt + [1.0] * len(layout.kind)
    if weights is not None:
        for j, wt in zip(layout.rationale, weights.tolist()):
            w[n_prompt + j] = float(wt)
    steps = [0] * n_prompt + [layout.steps if k == RATIONALE else 0 for k in layout.kind]
    return {"kd_token_weights": w, "kd_step_rank": [0] * n_prompt + list(layout.rank), "kd_num_steps": steps}


def progressive_fraction(progress: float, start: float, ramp: float) -> float:
    """``f(p) = start + (1 - start) * min(1, p / ramp)``: the share of each rationale's steps in the loss."""
    if not 0.0 < start <= 1.0 or not 0.0 <= ramp <= 1.0:
        raise PotstillError(f"progressive start={start} must be in (0, 1] and ramp={ramp} in [0, 1]")
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 if ramp == 0.0 else start + (1.0 - start) * min(1.0, p / ramp)


def _rows(inputs: dict, name: str, index: Tensor, who: str) -> Tensor:
    if name not in inputs:
        raise PotstillError(
            f"{who} needs the per-token column '{name}' in every batch; add it with "
            "potstill.runners.keypoint.keypoint_examples and keep it through the collator"
        )
    return inputs[name][:, 1:].reshape(-1).index_select(0, index)


def rationale_row_weights(inputs: dict | None, *, keypoint: bool, fraction: float | None) -> Tensor | None:
    """``[n]`` factors of the divergence on the loss rows of ``inputs`` (row order of ``target_index``).

    ``keypoint``: the ``kd_token_weights`` column (label ``j + 1`` is predicted at row ``j``: the shift of
    targets). ``fraction``: the progressive mask, 1 where ``kd_step_rank == 0`` (answer, not a rationale)
    or ``rank <= ceil(fraction * kd_num_steps)``, else 0. ``None`` when neither is asked for.
    """
    if not keypoint and fraction is None:
        return None
    if inputs is None or "labels" not in inputs:
        raise PotstillError("rationale KD weights are read from the batch; pass the batch (inputs) with its labels")
    index = target_index(inputs["labels"])
    w = torch.ones(index.numel(), dtype=torch.float32, device=index.device)
    if keypoint:
        w = w * _rows(inputs, "kd_token_weights", index, "token_weighting 'keypoint'").float()
    if fraction is not None:
        rank = _rows(inputs, "kd_step_rank", index, "curriculum 'progressive_rationale'")
        steps = _rows(inputs, "kd_num_steps", index, "curriculum 'progressive_rationale'")
        # ceil(f * L) in float64, less a hair so 0.3 * 10 = 3.0000000000000004 keeps 3 steps, not 4
        keep = torch.ceil(steps.double() * float(fraction) - 1e-9)
        w = w * ((rank == 0) | (rank.double() <= keep)).float()
    return w


def kept_steps(fraction: float, steps: int) -> int:
    """``ceil(fraction * steps)``, as :func:`rationale_row_weights` counts it."""
    return math.ceil(steps * fraction - 1e-9)
