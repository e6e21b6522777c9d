"""Datasets in, tokenized chat examples out: loading, chat templates, prompt masking, collation."""

from .chat import encode_example, encode_prompt
from .collate import PadCollator, pad_id
from .loading import load_records, records_to_pairs, train_eval_split
from .packing import PackCollator, forward_kwargs, segments

__all__ = [
    "PackCollator",
    "PadCollator",
    "forward_kwargs",
    "segments",
    "encode_example",
    "encode_prompt",
    "load_records",
    "pad_id",
    "records_to_pairs",
    "train_eval_split",
]
