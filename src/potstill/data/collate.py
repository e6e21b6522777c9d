"""Pad a list of encoded examples into a batch (right padding; labels padded with -100), and the pad id.

Per-token KD columns (:data:`TOKEN_COLUMNS`, aligned with ``labels``: entry ``j`` belongs to the label of token
``j``) travel with the batch when every example has them, laid out exactly like ``labels`` by
:func:`place_token_columns`; padding gets the column's fill value.
"""

from __future__ import annotations

from typing import Any

import torch


def pad_id(tokenizer, *, required: bool = False) -> int:
    """The id to pad with: the tokenizer's ``pad_token_id``, else its ``eos_token_id``.

    With neither, ``ValueError`` if ``required`` (generation, which must stop on something),
    else 0 (the padded positions are masked out anyway).
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    if required:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return 0


# name -> (dtype, fill on padding and prompt). Rationale KD (potstill.kd.keypoint): the keypoint weight of each
# label's divergence, the rank from the end of the rationale step it lies in (0: not in the rationale, always
# trained) and its rationale's number of steps.
TOKEN_COLUMNS: dict[str, tuple[torch.dtype, float]] = {
    "kd_token_weights": (torch.float32, 0.0),
    "kd_step_rank": (torch.long, 0),
    "kd_num_steps": (torch.long, 0),
}


def place_token_columns(
    features: list[dict[str, Any]], places: list[tuple[int, int]], shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """The :data:`TOKEN_COLUMNS` every feature has, as ``shape`` ``[R, T]`` tensors.

    ``places[i] = (row, start)``: where feature ``i``'s tokens begin in the batch (padded: ``(i, 0)``; packed:
    its row and offset), so each column sits under the same positions as ``labels``. Columns some feature
    lacks are left out.
    """
    out = {}
    for name, (dtype, fill) in TOKEN_COLUMNS.items():
        if not features or not all(name in f for f in features):
            continue
        col = torch.full(shape, fill, dtype=dtype)
        for f, (r, at) in zip(features, places):
            values = torch.as_tensor(f[name], dtype=dtype)
            if values.numel() != len(f["input_ids"]):
                raise ValueError(f"{name} has {values.numel()} entries for {len(f['input_ids'])} tokens")
            col[r, at : at + values.numel()] = values
        out[name] = col
    return out


class PadCollator:
    """``[{"input_ids", "attention_mask", "labels", ...}] -> dict of [B, T] long tensors``.

    The three model columns are padded; an integer ``example_id`` (the key of a teacher-signal
    cache) is passed through as ``[B]``; the per-token :data:`TOKEN_COLUMNS` are padded like ``labels``;
    other keys (texts) are dropped here. ``left=True`` pads before the tokens, so every row ends in the last
    column (a batch whose key/value cache is continued, as in generation).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, left: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.left = left  # pad before the tokens: every row ends in the last column (a cache to continue)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        starts = [n - len(f["input_ids"]) if self.left else 0 for f in features]
        for i, (f, a) in enumerate(zip(features, starts)):
            k = len(f["input_ids"])
            ids[i, a : a + k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, a : a + k] = 1
            labels[i, a : a + k] = torch.as_tensor(f["labels"], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        out.update(place_token_columns(features, list(enumerate(starts)), (len(features), n)))
        if all("example_id" in f for f in features):
            out["example_id"] = torch.tensor([int(f["example_id"]) for f in features], dtype=torch.long)
        return out
