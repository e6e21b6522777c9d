"""Pad a list of encoded examples into a batch (right padding; labels padded with -100), and the pad id."""

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


class PadCollator:
    """``[{"input_ids", "attention_mask", "labels", ...}] -> dict of [B, T] long tensors``.

    The three model columns are padded; an integer ``example_id`` (the key of a teacher-signal
    cache) is passed through as ``[B]``; other keys (texts) are dropped here.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if all("example_id" in f for f in features):
            out["example_id"] = torch.tensor([int(f["example_id"]) for f in features], dtype=torch.long)
        return out
