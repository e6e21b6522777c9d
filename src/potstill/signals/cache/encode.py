"""Teacher logits -> the cache's encoded columns: what :func:`~.write.build_shard` stores.

:func:`extract` reduces a chunk of teacher logits to the cached signal (top-k, sampled or
dense), :func:`example_rows` cuts one example's rows out of it and encodes its log-probs
(:mod:`potstill.signals.quant`), and :func:`assemble_shard` packs a shard's examples into
safetensors columns (ids bit-packed, per-example offsets, content hashes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from potstill.fingerprints import example_hash

from ...errors import PotstillError
from ..quant import ValueDType, encode_logprobs, pack_ids
from .format import CacheSpec


@dataclass
class EncodedRows:
    """One example's encoded rows before packing."""

    ids: Tensor  # [S] long (slots, row-major)
    values: dict[str, Tensor]  # encode_logprobs output over slots ([S]) + per-row scale
    tail: Tensor | None = None  # [R] topk
    row_len: Tensor | None = None  # [R] sampled
    counts: Tensor | None = None  # [S] sampled, proposal = teacher
    weights: Tensor | None = None  # [S] sampled, other proposal
    rows: int = 0


def row_seed(seed: int, example_id: int, row: int) -> int:
    d = hashlib.blake2b(f"{seed}:{example_id}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def log1mexp64(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` in float64 (``-inf`` where ``x >= 0``)."""
    x = x.double()
    inside = x < 0
    xs = torch.where(inside, x, torch.full_like(x, -1.0))
    out = torch.where(xs > -0.6931471805599453, torch.log(-torch.expm1(xs)), torch.log1p(-torch.exp(xs)))
    return torch.where(inside, out, torch.full_like(out, float("-inf")))


def extract(z: Tensor, spec: CacheSpec, vocab: int, seeds: list[int] | None = None) -> dict[str, Tensor]:
    """Teacher logits ``z [r, V]`` (float32) -> what the cache stores for these rows, on the CPU.

    Costs at most two passes over ``[r, V]`` beyond the head itself (log-softmax, then top-k
    or the proposal's probabilities), so writing runs at the teacher's forward speed.

    * topk: ``ids/lp [r, k]`` and ``tail [r]``, the log of ``1 - sum(p_topk)`` in float64
      from the k full-precision log-probs (before quantization);
    * sampled: ``spec.draws`` draws per row with ``torch.multinomial`` seeded per row
      (``seeds``), merged into unique ids with counts: ``ids/lp/counts [r, draws]`` padded
      with count 0 (and ``weights`` = ``count / n * p / r`` for a tempered proposal);
    * dense: ``lp [r, V]``, the log-softmax at temperature 1.
    """
    if spec.kind == "dense":
        lp = torch.log_softmax(z, -1)
        check_finite(lp.amax(-1))
        return {"lp": lp.cpu()}
    T = spec.temperature
    if spec.kind == "topk":
        lp = torch.log_softmax(z if T == 1.0 else z / T, -1)
        vals, idx = lp.topk(spec.k, dim=-1)
        check_finite(vals[:, 0])
        if spec.k < vocab:
            tail = log1mexp64(torch.logsumexp(vals.double(), -1)).float()
        else:
            tail = torch.full((z.shape[0],), float("-inf"), device=z.device)
        return {"ids": idx.cpu(), "lp": vals.cpu(), "tail": tail.cpu()}
    n, tau = spec.draws, spec.proposal_temperature
    # The teacher's probabilities once (no [r, V] log-probs): log p is taken at the drawn ids only.
    p_t = torch.softmax(z if T == 1.0 else z / T, -1)
    check_finite(p_t.amax(-1))
    probs = p_t if tau == 1.0 else torch.softmax(z / (T * tau), -1)
    r = z.shape[0]
    draws = torch.empty((r, n), dtype=torch.long, device=z.device)
    g = torch.Generator(device=z.device)
    for i, s in enumerate(seeds or []):
        g.manual_seed(s)
        draws[i] = torch.multinomial(probs[i], n, replacement=True, generator=g)
    draws, _ = draws.sort(-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    # counts of each run of equal ids, written at the run's first slot, then left-packed
    pos = torch.arange(n, device=z.device).expand(r, n)
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(-1).values
    counts_at = torch.zeros((r, n), dtype=torch.long, device=z.device).scatter_add_(-1, start, torch.ones_like(draws))
    order = torch.sort((~first).to(torch.uint8), dim=-1, stable=True).indices  # uniques first, in id order
    ids = draws.gather(-1, order)
    counts = counts_at.gather(-1, order)
    live = counts > 0
    ids = torch.where(live, ids, torch.zeros_like(ids))
    lp_s = torch.where(live, p_t.gather(-1, ids).log(), torch.full((r, n), float("-inf"), device=z.device))
    out = {"ids": ids.cpu(), "lp": lp_s.cpu(), "counts": counts.cpu()}
    if tau != 1.0:
        lr = torch.log(probs.gather(-1, ids)).double()
        w = counts.double() / n * torch.exp(lp_s.double() - lr)
        out["weights"] = torch.where(live, w, torch.zeros_like(w)).float().cpu()
    return out


def check_finite(row_max: Tensor) -> None:
    """NaN/inf logits surface in each row's largest (log-)probability: checked there, not over ``[r, V]``."""
    if not bool(torch.isfinite(row_max).all()):
        raise PotstillError(
            "teacher logits contain NaN/inf while caching; check the teacher weights or "
            "load it with teacher.dtype: float32"
        )


def example_rows(cols: dict[str, Tensor], a: int, b: int, spec: CacheSpec) -> EncodedRows:
    """Rows ``a:b`` of a batch's :func:`extract` output -> one example's :class:`EncodedRows`."""
    lp = cols["lp"][a:b]
    if spec.kind == "dense":
        enc = encode_logprobs(lp, spec.dtype)
        return EncodedRows(
            ids=torch.zeros(0, dtype=torch.long),
            values={"values": enc["values"].reshape(-1), **({"scale": enc["scale"]} if "scale" in enc else {})},
            rows=b - a,
        )
    enc = encode_logprobs(lp, spec.dtype)
    if spec.kind == "topk":
        return EncodedRows(
            ids=cols["ids"][a:b].reshape(-1),
            rows=b - a,
            tail=cols["tail"][a:b],
            values={"values": enc["values"].reshape(-1), **({"scale": enc["scale"]} if "scale" in enc else {})},
        )
    counts = cols["counts"][a:b]
    live = counts > 0
    out = EncodedRows(
        ids=cols["ids"][a:b][live],
        rows=b - a,
        row_len=live.sum(-1),
        values={"values": enc["values"][live], **({"scale": enc["scale"]} if "scale" in enc else {})},
    )
    if spec.proposal_temperature == 1.0:
        out.counts = counts[live]
    else:
        out.weights = cols["weights"][a:b][live]
    return out


def empty_rows(spec: CacheSpec, vocab: int) -> EncodedRows:
    width = {"topk": spec.k, "sampled": spec.draws, "dense": vocab}[spec.kind]
    cols = {
        "lp": torch.zeros(0, width),
        "ids": torch.zeros(0, width, dtype=torch.long),
        "tail": torch.zeros(0),
        "counts": torch.zeros(0, width, dtype=torch.long),
        "weights": torch.zeros(0, width),
    }
    return example_rows(cols, 0, 0, spec)


def _tail_dtype(dtype: ValueDType) -> torch.dtype:
    return torch.float32 if dtype == "fp32" else torch.float16


def assemble_shard(
    examples: list[dict], rows: list[EncodedRows], first_id: int, spec: CacheSpec, bits: int
) -> dict[str, Tensor]:
    e = len(examples)
    row_off, slot_off, byte_off = [0], [0], [0]
    packed = []
    for r in rows:
        row_off.append(row_off[-1] + r.rows)
        slot_off.append(slot_off[-1] + r.values["values"].numel())
        p = pack_ids(r.ids, bits)
        packed.append(p)
        byte_off.append(byte_off[-1] + p.numel())
    cols: dict[str, Tensor] = {
        "example_ids": torch.arange(first_id, first_id + e, dtype=torch.int64),
        "token_hash": torch.tensor(
            [list(example_hash(x["input_ids"], x["labels"])) for x in examples], dtype=torch.uint8
        ).reshape(e, 16),
        "row_offsets": torch.tensor(row_off, dtype=torch.int64),
        "slot_offsets": torch.tensor(slot_off, dtype=torch.int64),
        "id_byte_offsets": torch.tensor(byte_off, dtype=torch.int64),
        "ids": torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8),
        "values": torch.cat([r.values["values"] for r in rows]),
    }
    if spec.dtype == "int8":
        cols["scale"] = torch.cat([r.values["scale"] for r in rows]).float()
    # The optional columns below are set for this spec's kind (example_rows).
    if spec.kind == "topk":
        cols["tail"] = torch.cat([cast(Tensor, r.tail) for r in rows]).to(_tail_dtype(spec.dtype))
    if spec.kind == "sampled":
        cols["row_len"] = torch.cat([cast(Tensor, r.row_len) for r in rows]).to(torch.uint8)
        if spec.proposal_temperature == 1.0:
            cols["counts"] = torch.cat([cast(Tensor, r.counts) for r in rows]).to(torch.uint8)
        else:
            cols["weights"] = torch.cat([cast(Tensor, r.weights) for r in rows]).float()
    return {k: v.contiguous() for k, v in cols.items()}
