"""Content fingerprints: what a cache, a selection, a finished run or a generation records to know it still holds
for the same tokens, weights, tokenizer and files. One definition each, so two places never disagree."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def example_hash(input_ids, labels) -> bytes:
    """16-byte content hash of one example's tokens and labels (the labels carry the prompt mask)."""
    h = hashlib.blake2b(digest_size=16)
    for seq in (input_ids, labels):
        t = torch.as_tensor(seq, dtype=torch.int64).reshape(-1)
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.to(torch.int32).numpy().tobytes())
    return h.digest()


def pool_fingerprint(examples: Sequence[dict]) -> str:
    """sha256 over the examples' content hashes (token ids and prompt mask, in order): the
    same fingerprint a teacher-signal cache records for its data."""
    return hashlib.sha256(b"".join(example_hash(x["input_ids"], x["labels"]) for x in examples)).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes, and each tensor's sha256).

    Tensors are hashed from their own memory (no copy on the CPU) in a thread pool:
    ``hashlib`` releases the GIL on large buffers, so this runs on every core.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .models.placement import materialized

    state = model.state_dict()
    for name, t in state.items():  # offloaded by a device map: the weight from accelerate's offload store
        if t.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            state[name] = materialized(model.get_submodule(owner), leaf)
    seen: dict[int, str] = {}
    entries: list[tuple[str, torch.Tensor, int]] = []
    for name in sorted(state):
        t = state[name]
        key = t.data_ptr()
        entries.append((name, t, key))
        if key not in seen or key == 0:
            seen[key] = name  # tied weights: hashed once, under the first name

    def digest(t: torch.Tensor) -> str:
        arr = t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        return hashlib.sha256(arr.data).hexdigest()

    owners = {name: t for name, t, key in entries if seen.get(key) == name or key == 0}
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = dict(zip(owners, pool.map(digest, owners.values())))
    h = hashlib.sha256()
    for name, t, key in entries:
        owner = name if key == 0 else seen[key]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{digests[owner]}".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """sha256 (hex) of the sorted vocabulary (with added tokens), special tokens and chat template.

    Two tokenizers with the same fingerprint map every token to the same id, name the
    same special tokens and format chats the same way.
    """
    from .models.vocab import special_tokens

    h = hashlib.sha256()
    vocab = tok.get_vocab()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(token.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(str(idx).encode())
        h.update(b"\x01")
    h.update(json.dumps(special_tokens(tok), sort_keys=True).encode())
    template = getattr(tok, "chat_template", None)
    h.update(b"\x02" + json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()


def text_hash(text: Any) -> str:
    return hashlib.sha256(json.dumps(text, sort_keys=True, default=str).encode()).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
