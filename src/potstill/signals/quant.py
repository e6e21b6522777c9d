"""Compact storage of teacher signals: token ids packed to the bits the vocabulary needs,
log-probabilities quantized to 32, 16 or 8 bits.

Every encoder here has an exact decoder: ``decode(encode(x))`` is a deterministic function
of ``x``, so a cache read back from disk equals, bit for bit, the quantized values the
writer had in memory (the round-trip tests hold the two to that).

8-bit log-probabilities (``"int8"``) use a square-root code relative to the row's largest
probability, ``p = p_max * (c / 255)^2`` with ``c in 1..255`` and ``c = 0`` for an absent
slot (log-prob ``-inf``). The code spends its levels where the KD gradient ``q - p`` needs
them: the error in ``p`` is about ``sqrt(p * p_max) / 255``, so the top tokens keep about
0.4 % of their probability and a token 100x less likely than the top one about 4 %. A
listed token never rounds to "absent": real slots get ``c >= 1``. ``p_max`` is stored per
row as a float32 log-prob.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ValueDType = Literal["fp32", "fp16", "bf16", "int8"]
FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VALUE_DTYPES = (*FLOAT_DTYPES, "int8")


def id_bits(vocab_size: int) -> int:
    """Bits needed for ids in ``[0, vocab_size)`` (at least 1)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """Non-negative ids (any shape, flattened row-major) -> ``uint8 [ceil(n * bits / 8)]``.

    Little-endian bit order; 8/16/32 bits are plain little-endian integers.
    """
    a = ids.detach().to("cpu", torch.int64).reshape(-1).numpy()
    if a.size and (a.min() < 0 or a.max() >= (1 << bits)):
        raise ValueError(f"ids must lie in [0, 2^{bits}) to be packed in {bits} bits")
    if bits in (8, 16, 32):
        out = a.astype(f"<u{bits // 8}").view(np.uint8)
    else:
        shifts = np.arange(bits, dtype=np.uint64)
        bitmat = ((a.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out = np.packbits(bitmat.reshape(-1), bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(out))


def unpack_ids(buf: Tensor | np.ndarray, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_ids`: the first ``count`` ids as ``int64 [count]``."""
    b = buf.numpy() if isinstance(buf, Tensor) else np.asarray(buf)
    b = b.view(np.uint8).reshape(-1)
    need = packed_nbytes(count, bits)
    if b.size < need:
        raise ValueError(f"packed ids are {b.size} bytes, {need} needed for {count} ids of {bits} bits")
    if bits in (8, 16, 32):
        out = b[: count * (bits // 8)].view(f"<u{bits // 8}").astype(np.int64)
    else:
        bitv = np.unpackbits(b[:need], bitorder="little")[: count * bits].reshape(count, bits)
        out = (bitv.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)
    return torch.from_numpy(np.ascontiguousarray(out))


_LOG255 = math.log(255.0)


def encode_logprobs(lp: Tensor, dtype: ValueDType) -> dict[str, Tensor]:
    """Log-probs ``[R, k]`` (``-inf`` = absent slot) -> ``{"values": ..., ["scale": [R]]}`` on the CPU."""
    lp = lp.detach().to("cpu", torch.float32)
    if dtype in FLOAT_DTYPES:
        return {"values": lp.to(FLOAT_DTYPES[dtype]).contiguous()}
    if dtype != "int8":
        raise ValueError(f"unknown value dtype {dtype!r}; use one of {VALUE_DTYPES}")
    absent = torch.isneginf(lp)
    top = torch.where(absent, torch.full_like(lp, float("-inf")), lp).amax(-1, keepdim=True)
    empty = torch.isneginf(top)
    top = torch.where(empty, torch.zeros_like(top), top)
    # c = 255 * sqrt(p / p_max), rounded; real slots at least 1.
    c = torch.round(255.0 * torch.exp(0.5 * (lp - top))).clamp_(1, 255)
    c = torch.where(absent, torch.zeros_like(c), c).to(torch.uint8)
    return {"values": c.contiguous(), "scale": top.squeeze(-1).contiguous()}


def decode_logprobs(values: Tensor, dtype: ValueDType, scale: Tensor | None = None) -> Tensor:
    """Inverse of :func:`encode_logprobs` -> float32 log-probs (``-inf`` for absent slots)."""
    if dtype in FLOAT_DTYPES:
        return values.to(torch.float32)
    if dtype != "int8":
        raise ValueError(f"unknown value dtype {dtype!r}; use one of {VALUE_DTYPES}")
    if scale is None:
        raise ValueError("int8 log-probs need their per-row scale")
    c = values.to(torch.float32)
    out = scale.to(torch.float32).unsqueeze(-1) + 2.0 * (torch.log(c) - _LOG255)
    return out  # log(0) = -inf marks absent slots


def value_nbytes(dtype: ValueDType) -> int:
    return 1 if dtype == "int8" else 4 if dtype == "fp32" else 2
