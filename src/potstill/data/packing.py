"""Packed batches: a batch's examples laid end to end in rows of ``max_length``, no padding computed.

A packed row holds several examples. Each example keeps its own positions (``position_ids``
restart at 0 where it starts) and attends only to itself: with ``attention_mask`` left out and
``position_ids`` given, transformers (>= 4.54, ``masking_utils``) turns the restarts into a
block-diagonal causal mask for SDPA / eager / flex attention, and FlashAttention-2/3 into its
variable-length kernel (``cu_seqlens``). Nothing here builds a mask by hand.

What stays exact, so that a packed batch gives the loss and gradients of the same examples padded:

* the label of each example's first token is ``-100``: position ``t`` predicts ``labels[t + 1]``,
  and the last token of one example must not be trained to predict the first of the next
  (an unpacked example never predicts its own first token either);
* the loss rows (``potstill.signals.target_index``) come out in row-major order, example after
  example; ``example_id`` (a teacher-signal cache's key) is ``[S]``, one per example in that order;
* the batch still counts *examples* (``train.batch_size``), so the token count ``N``, curricula
  and on-policy sampling see the same examples as the padded batch.

:func:`segments` finds the examples of a batch, packed or padded; :func:`check_packing` refuses
a model whose attention does not stay inside each packed example.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import PotstillError
from .collate import PadCollator, place_token_columns


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into rows of at most ``capacity`` tokens.

    Longer examples are placed first (ties in input order); a row's examples keep the order they were
    placed in. An example longer than ``capacity`` gets a row of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        j = next((r for r, free in enumerate(room) if free >= n), None)
        if j is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[j].append(i)
            room[j] -= n
    return rows


def balanced_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Rows of at most ``max_length`` tokens (an example longer than that: a row of its own) that leave the
    least padding: the first-fit-decreasing packing, over row widths, with the fewest token slots
    (rows x widest row). Packing every row full to ``max_length`` would leave the last rows short and pad
    them all to the widest; with ``R`` rows, the narrowest width that still fits them is found by bisection.
    """

    def slots(rows: list[list[int]]) -> int:
        return len(rows) * max(sum(lengths[i] for i in row) for row in rows)

    longest, total = max(lengths), sum(lengths)
    cap = max(max_length, longest)
    best = pack_rows(lengths, cap)
    for r in range(len(best), len(lengths) + 1):
        lo = max(longest, -(-total // r))
        if r * lo >= slots(best):
            break
        hi = cap
        while lo < hi:  # the narrowest width whose packing takes at most r rows
            mid = (lo + hi) // 2
            if len(pack_rows(lengths, mid)) <= r:
                hi = mid
            else:
                lo = mid + 1
        rows = pack_rows(lengths, lo)
        if slots(rows) < slots(best):
            best = rows
    return best


class PackCollator:
    """``[{"input_ids", "labels", ["example_id"]}] -> packed dict of tensors``.

    Returns ``input_ids``, ``labels``, ``position_ids`` and ``attention_mask`` as ``[R, T]`` (``R`` rows,
    ``T`` the longest row; ``attention_mask`` is 1 on example tokens and 0 on the padding at a row's end,
    which gets positions of its own and is never read), ``pack_order`` ``[S]`` (the index in ``features`` of
    each packed example, in packed order) and ``example_id`` ``[S]`` in packed order when every feature has one. ``unpacked`` is the padding collator for the same features (per-example scores).
    """

    def __init__(self, pad_token_id: int, max_length: int):
        if max_length < 1:
            raise PotstillError(f"packing needs max_length >= 1, not {max_length}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)
        self.unpacked = PadCollator(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = balanced_rows(lengths, self.max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        shape = (len(rows), width)
        ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, -100, dtype=torch.long)
        pos = torch.zeros(shape, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        order: list[int] = []
        places = [(0, 0)] * len(features)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n, f = lengths[i], features[i]
                ids[r, at : at + n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
                labels[r, at : at + n] = torch.as_tensor(f["labels"], dtype=torch.long)
                labels[r, at] = -100
                pos[r, at : at + n] = torch.arange(n)
                mask[r, at : at + n] = 1
                places[i] = (r, at)
                at += n
                order.append(i)
            pos[r, at:] = torch.arange(width - at)  # the tail padding: a run of its own, attended by nothing
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "position_ids": pos,
            "pack_order": torch.tensor(order, dtype=torch.long),
        }
        out.update(place_token_columns(features, places, shape))
        if all("example_id" in f for f in features):
            out["example_id"] = torch.tensor([int(features[i]["example_id"]) for i in order], dtype=torch.long)
        return out


def is_packed(batch: dict) -> bool:
    return batch.get("position_ids") is not None


def forward_kwargs(batch: dict) -> dict[str, Tensor]:
    """What a model call needs beyond ``input_ids`` / ``attention_mask``: ``position_ids`` of a packed batch."""
    return {"position_ids": batch["position_ids"]} if is_packed(batch) else {}


def segments(batch: dict, *, collated_order: bool = False) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every example of a batch, in row-major order (the order of its loss rows).

    Padded batch: one per row, ``[0, attention_mask.sum())``. Packed batch: the runs of ``position_ids``
    that restart at 0, on tokens with ``attention_mask`` 1; ``collated_order`` puts them back in the order
    the examples were given to the collator (``pack_order``), e.g. to sample from their prompts in that order.
    """
    out = _segments(batch)
    if collated_order and is_packed(batch) and batch.get("pack_order") is not None:
        ranked = sorted(zip(batch["pack_order"].tolist(), out))
        out = [seg for _, seg in ranked]
    return out


def _segments(batch: dict) -> list[tuple[int, int, int]]:
    mask = batch["attention_mask"].detach().cpu().bool()
    if not is_packed(batch):
        return [(r, 0, int(mask[r].sum())) for r in range(mask.shape[0])]
    pos = batch["position_ids"].detach().cpu()
    out = []
    for r in range(pos.shape[0]):
        starts = ((pos[r] == 0) & mask[r]).nonzero().flatten().tolist()
        real = int(mask[r].sum())  # examples fill a row from its start; padding only at its end
        for k, s in enumerate(starts):
            out.append((r, s, starts[k + 1] if k + 1 < len(starts) else real))
    return out


@torch.no_grad()
def check_packing(model: torch.nn.Module, who: str) -> None:
    """Refuse, in one line, a model whose attention leaks across packed examples.

    Runs two short token runs packed in one row and the second one alone, and compares the second
    one's final hidden states: a model that ignores ``position_ids`` or builds its own causal mask
    gives the second example the first one's context, and differs.
    """
    from ..models import final_hidden

    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = int(model.get_input_embeddings().weight.shape[0])
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(1, vocab, (5,), generator=g), torch.randint(1, vocab, (4,), generator=g)
        packed = torch.cat([a, b])[None].to(device)
        pos = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
        try:
            together = final_hidden(model, packed, None, position_ids=pos)[0, 5:].float()
            alone = final_hidden(model, b[None].to(device), torch.ones(1, 4, dtype=torch.long, device=device))[
                0
            ].float()
        except (TypeError, ValueError, RuntimeError) as err:
            raise PotstillError(
                f"data.packing: the {who} ({type(model).__name__}) cannot run a packed row "
                f"({str(err).splitlines()[0][:120]}); set data.packing false"
            ) from None
        scale = float(alone.abs().max().clamp_min(1e-6))
        if not torch.allclose(together, alone, rtol=0, atol=1e-3 * scale):
            impl = getattr(model.config, "_attn_implementation", None)
            raise PotstillError(
                f"data.packing: the {who} ({type(model).__name__}, attention {impl}) lets one packed example attend "
                "to another (its attention does not follow position_ids restarts); set data.packing false for it"
            )
    finally:
        model.train(was)
