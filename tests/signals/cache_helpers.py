"""What the cache-error and cache-integrity tests share: seven tiny examples in three shards."""

from __future__ import annotations

from pathlib import Path

from potstill.data import encode_example
from potstill.signals.cache import CacheSpec

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Count from one to five:", "one, two, three, four, five"),
    ("Translate hello into Spanish:", "hola"),
]
SPEC = CacheSpec(kind="topk", k=8, dtype="fp16", examples_per_shard=3, batch_size=2)  # 7 examples -> 3 shards


def encode(tok, pairs=PAIRS, max_length: int = 64) -> list[dict]:
    out = []
    for i, (p, r) in enumerate(pairs):
        ex = encode_example(tok, [{"role": "user", "content": p}], r, max_length)
        ex["example_id"] = i
        out.append(ex)
    return out


def shard(path: Path, j: int) -> Path:
    return path / f"shard-{j:05d}.safetensors"
