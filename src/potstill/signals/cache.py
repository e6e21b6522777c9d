"""The teacher-signal cache: run the teacher once, distill from disk.

Layout of a cache directory::

    plan.json                 what this cache is (spec, teacher/tokenizer/data fingerprints)
    shard-00000.safetensors   examples [0, S), memory-mapped columns
    shard-00000.json          that shard's record (rows, bytes, sha256), written after it
    ...
    manifest.json             plan + all shard records; written once every shard exists

Shard ``j`` holds examples ``[j*S, (j+1)*S)`` of the encoded dataset, keyed by example id
*and* by a content hash of the example's tokens and labels (EasyDistill #21: a cache
indexed by step silently reads zeros in epoch 2; ours refuses any example whose tokens
changed). Each file is written atomically, so a killed run resumes at the first shard
without a valid record; a process of rank ``r`` of ``W`` writes the shards ``j % W == r``
and whichever process finishes last writes the manifest. Shard contents depend only on
the shard's examples (batches are formed inside a shard, sampling is seeded per
example), so any number of processes gives the same cache as one.

Signals (per target row, i.e. per response token; :func:`~potstill.signals.target_index`):

* ``topk``: the k largest teacher log-probs at the cache temperature, their ids and the
  exact log-mass of the tail (so a reader may choose ``tail: bucket`` or ``renormalize``);
* ``sampled``: Anshumann et al. (2025) random-sampling KD: ``draws`` ids drawn with
  replacement from the teacher at ``proposal_temperature``; unique ids, their counts
  (or importance weights when the proposal is not the teacher) and log-probs, ragged;
* ``dense``: the full log-softmax at temperature 1 (any distillation temperature can be
  applied on read); for small vocabularies.

Ids are packed to ``ceil(log2 V)`` bits, log-probs stored as fp32/fp16/bf16/8-bit
(:mod:`potstill.signals.quant`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import re
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from torch import Tensor

from ..errors import PotstillError
from ..io import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from .online import target_index, target_rows
from .quant import (
    VALUE_DTYPES,
    ValueDType,
    decode_logprobs,
    encode_logprobs,
    id_bits,
    pack_ids,
    unpack_ids,
)
from .types import DenseSignal, Signal, SparseSignal, TailMode

log = logging.getLogger("potstill")

FORMAT = "potstill-cache"
VERSION = 1
CacheKind = Literal["topk", "sampled", "dense"]
PLAN, MANIFEST = "plan.json", "manifest.json"


@dataclass(frozen=True)
class CacheSpec:
    """What the cache stores and how it is computed (every field is part of its identity)."""

    kind: CacheKind = "topk"
    k: int = 32
    draws: int = 12
    proposal_temperature: float = 1.0
    tail: TailMode = "bucket"
    dtype: ValueDType = "fp16"
    temperature: float = 1.0
    seed: int = 0
    examples_per_shard: int = 256
    batch_size: int = 8
    chunk_size: int = 256

    def check(self, vocab_size: int) -> None:
        if self.kind not in ("topk", "sampled", "dense"):
            raise PotstillError(f"cache kind '{self.kind}' is unknown; use topk, sampled or dense")
        if self.dtype not in VALUE_DTYPES:
            raise PotstillError(f"cache dtype '{self.dtype}' is unknown; use one of {list(VALUE_DTYPES)}")
        if self.kind == "topk" and not 1 <= self.k <= vocab_size:
            raise PotstillError(f"cache k={self.k} must be in [1, {vocab_size}] (the teacher's vocabulary)")
        if self.kind == "sampled" and not 1 <= self.draws <= 255:
            raise PotstillError(f"cache draws={self.draws} must be in [1, 255] (counts are stored in one byte)")
        if self.tail not in ("bucket", "renormalize"):
            raise PotstillError(f"cache tail '{self.tail}' is unknown; use bucket or renormalize")
        for name in ("temperature", "proposal_temperature"):
            if not getattr(self, name) > 0:
                raise PotstillError(f"cache {name}={getattr(self, name)} must be > 0")
        for name in ("examples_per_shard", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise PotstillError(f"cache {name}={getattr(self, name)} must be >= 1")


# ----------------------------------------------------------------------- fingerprints


def example_hash(input_ids, labels) -> bytes:
    """16-byte content hash of one example's tokens and labels (the labels carry the prompt mask)."""
    h = hashlib.blake2b(digest_size=16)
    for seq in (input_ids, labels):
        t = torch.as_tensor(seq, dtype=torch.int64).reshape(-1)
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.to(torch.int32).numpy().tobytes())
    return h.digest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes, and each tensor's sha256).

    Tensors are hashed from their own memory (no copy on the CPU) in a thread pool:
    ``hashlib`` releases the GIL on large buffers, so this runs on every core.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..models.placement import materialized

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
        return hashlib.sha256(memoryview(arr)).hexdigest()

    owners = {name: t for name, t, key in entries if seen.get(key) == name or key == 0}
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = dict(zip(owners, pool.map(digest, owners.values())))
    h = hashlib.sha256()
    for name, t, key in entries:
        owner = name if key == 0 else seen[key]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{digests[owner]}".encode())
    return h.hexdigest()


def _text_hash(text: Any) -> str:
    return hashlib.sha256(json.dumps(text, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def _num_rows(labels) -> int:
    t = torch.as_tensor(labels)
    return int((t[1:] != -100).sum())


# ----------------------------------------------------------------------------- writer


@dataclass
class _Rows:
    """One example's encoded rows before packing."""

    ids: Tensor  # [S] long (slots, row-major)
    values: dict[str, Tensor]  # encode_logprobs output over slots ([S]) + per-row scale
    tail: Tensor | None = None  # [R] topk
    row_len: Tensor | None = None  # [R] sampled
    counts: Tensor | None = None  # [S] sampled, proposal = teacher
    weights: Tensor | None = None  # [S] sampled, other proposal
    rows: int = 0


def _row_seed(seed: int, example_id: int, row: int) -> int:
    d = hashlib.blake2b(f"{seed}:{example_id}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def _log1mexp64(x: Tensor) -> Tensor:
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
        _check_finite(lp.amax(-1))
        return {"lp": lp.cpu()}
    T = spec.temperature
    if spec.kind == "topk":
        lp = torch.log_softmax(z if T == 1.0 else z / T, -1)
        vals, idx = lp.topk(spec.k, dim=-1)
        _check_finite(vals[:, 0])
        if spec.k < vocab:
            tail = _log1mexp64(torch.logsumexp(vals.double(), -1)).float()
        else:
            tail = torch.full((z.shape[0],), float("-inf"), device=z.device)
        return {"ids": idx.cpu(), "lp": vals.cpu(), "tail": tail.cpu()}
    n, tau = spec.draws, spec.proposal_temperature
    # The teacher's probabilities once (no [r, V] log-probs): log p is taken at the drawn ids only.
    p_t = torch.softmax(z if T == 1.0 else z / T, -1)
    _check_finite(p_t.amax(-1))
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


def _check_finite(row_max: Tensor) -> None:
    """NaN/inf logits surface in each row's largest (log-)probability: checked there, not over ``[r, V]``."""
    if not bool(torch.isfinite(row_max).all()):
        raise PotstillError(
            "teacher logits contain NaN/inf while caching; check the teacher weights or "
            "load it with teacher.dtype: float32"
        )


def _example_rows(cols: dict[str, Tensor], a: int, b: int, spec: CacheSpec) -> _Rows:
    """Rows ``a:b`` of a batch's :func:`extract` output -> one example's :class:`_Rows`."""
    lp = cols["lp"][a:b]
    if spec.kind == "dense":
        enc = encode_logprobs(lp, spec.dtype)
        return _Rows(
            ids=torch.zeros(0, dtype=torch.long),
            values={"values": enc["values"].reshape(-1), **({"scale": enc["scale"]} if "scale" in enc else {})},
            rows=b - a,
        )
    enc = encode_logprobs(lp, spec.dtype)
    if spec.kind == "topk":
        return _Rows(
            ids=cols["ids"][a:b].reshape(-1),
            rows=b - a,
            tail=cols["tail"][a:b],
            values={"values": enc["values"].reshape(-1), **({"scale": enc["scale"]} if "scale" in enc else {})},
        )
    counts = cols["counts"][a:b]
    live = counts > 0
    out = _Rows(
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


def _ragged_to_padded(flat: Tensor, row_len: Tensor, fill: float) -> tuple[Tensor, Tensor]:
    """``[S]`` slots of rows with ``row_len`` -> ``[R, max_len]`` padded, plus the slot mask."""
    r = row_len.numel()
    width = int(row_len.max()) if r else 0
    mask = torch.arange(width).unsqueeze(0) < row_len.unsqueeze(1)
    out = torch.full((r, width), fill, dtype=flat.dtype)
    out[mask] = flat
    return out, mask


def _tail_dtype(dtype: ValueDType) -> torch.dtype:
    return torch.float32 if dtype == "fp32" else torch.float16


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _build_shard(
    teacher,
    head,
    examples: list[dict],
    first_id: int,
    spec: CacheSpec,
    vocab: int,
    bits: int,
    pad_id: int,
    device,
    timings: dict | None = None,
) -> dict[str, Tensor]:
    """Run the teacher over one shard's examples and return its safetensors columns.

    ``timings["forward_s"]`` (when given) accumulates the time of the teacher's own work
    (body and head), so a caller can split writing into forward and everything else.
    """
    from ..data import PadCollator
    from ..models import final_hidden

    per_example: list[_Rows | None] = [None] * len(examples)
    # Batches are formed inside the shard (by length, to save padding), so a shard's
    # contents never depend on which process wrote it or on what else it wrote.
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))
    collate = PadCollator(pad_id)
    for b0 in range(0, len(order), spec.batch_size):
        members = order[b0 : b0 + spec.batch_size]
        batch = collate([examples[i] for i in members])
        batch = {k: v.to(device) for k, v in batch.items() if k != "example_id"}
        labels = batch["labels"]
        counts = (labels[:, 1:] != -100).sum(-1).tolist()
        seeds = None
        if spec.kind == "sampled":
            seeds = [_row_seed(spec.seed, first_id + i, r) for i, c in zip(members, counts) for r in range(c)]
        with torch.no_grad():
            t0 = time.perf_counter()
            hidden = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
            rows = target_rows(hidden, target_index(labels))
            _sync(device)
            fwd = time.perf_counter() - t0
            parts = []
            for s in range(0, rows.shape[0], spec.chunk_size):
                t0 = time.perf_counter()
                z = head(rows[s : s + spec.chunk_size]).float()[:, :vocab]
                _sync(device)
                fwd += time.perf_counter() - t0
                parts.append(extract(z, spec, vocab, None if seeds is None else seeds[s : s + spec.chunk_size]))
        if timings is not None:
            timings["forward_s"] = timings.get("forward_s", 0.0) + fwd
        cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        start = 0
        for i, c in zip(members, counts):
            per_example[i] = _example_rows(cols, start, start + c, spec) if c else _empty_rows(spec, vocab)
            start += c
    return _assemble(examples, per_example, first_id, spec, bits)


def _empty_rows(spec: CacheSpec, vocab: int) -> _Rows:
    width = {"topk": spec.k, "sampled": spec.draws, "dense": vocab}[spec.kind]
    cols = {
        "lp": torch.zeros(0, width),
        "ids": torch.zeros(0, width, dtype=torch.long),
        "tail": torch.zeros(0),
        "counts": torch.zeros(0, width, dtype=torch.long),
        "weights": torch.zeros(0, width),
    }
    return _example_rows(cols, 0, 0, spec)


def _assemble(examples: list[dict], rows: list[_Rows], first_id: int, spec: CacheSpec, bits: int) -> dict[str, Tensor]:
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
    if spec.kind == "topk":
        cols["tail"] = torch.cat([r.tail for r in rows]).to(_tail_dtype(spec.dtype))
    if spec.kind == "sampled":
        cols["row_len"] = torch.cat([r.row_len for r in rows]).to(torch.uint8)
        if spec.proposal_temperature == 1.0:
            cols["counts"] = torch.cat([r.counts for r in rows]).to(torch.uint8)
        else:
            cols["weights"] = torch.cat([r.weights for r in rows]).float()
    return {k: v.contiguous() for k, v in cols.items()}


def _shard_record_ok(path: Path, j: int, check_hash: bool = True) -> dict | None:
    """The record of shard ``j`` if the shard file exists and matches it, else None."""
    rec_path = path / _shard_name(j).replace(".safetensors", ".json")
    shard = path / _shard_name(j)
    try:
        rec = json.loads(rec_path.read_text())
        if not shard.is_file() or shard.stat().st_size != rec["bytes"]:
            return None
        if check_hash and _file_sha256(shard) != rec["sha256"]:
            return None
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _diff_plans(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                out += [f"{key}.{k}" for k in _diff_plans(old[key], new[key])]
            else:
                out.append(key)
    return out


def write_cache(
    teacher: torch.nn.Module,
    tokenizer,
    examples: list[dict],
    path: str | Path,
    spec: CacheSpec = CacheSpec(),
    *,
    teacher_name: str = "",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    timings: dict | None = None,
) -> dict | None:
    """Run ``teacher`` over ``examples`` and write (or finish) the cache at ``path``.

    ``examples`` are encoded examples (``input_ids``, ``labels``, ``attention_mask``);
    their list index is their example id. With ``world_size > 1`` this process writes the
    shards ``j % world_size == rank``. Returns the manifest once the cache is complete (the
    last process to finish writes it), else ``None``. ``on_shard(j)`` is called after each
    shard is on disk (progress hooks, tests). ``timings`` (a dict) receives ``forward_s``,
    the time spent in the teacher's body and head, and ``total_s``, the whole call.
    """
    from ..generate import pad_id as _pad_id
    from ..models import tokenizer_fingerprint

    t_start = time.perf_counter()
    path = Path(path)
    if not examples:
        raise PotstillError("no examples to cache; check the recipe's data section")
    if not 0 <= rank < world_size:
        raise PotstillError(f"rank {rank} is not in [0, {world_size}); pass --rank in 0..world_size-1")
    _refuse_a_file(path, "point cache.dir at a directory (new or one `potstill cache` wrote)")
    from ..models.placement import head_on, input_device

    device = input_device(teacher)  # a teacher spread by a device map: where its embeddings run
    head = head_on(teacher, device)
    vocab = head.vocab
    spec.check(vocab)
    teacher.eval()
    hashes = [example_hash(x["input_ids"], x["labels"]) for x in examples]
    num_rows = sum(_num_rows(x["labels"]) for x in examples)
    n_shards = math.ceil(len(examples) / spec.examples_per_shard)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "spec": asdict(spec),
        "vocab_size": vocab,
        "id_bits": id_bits(vocab),
        "teacher": {"name": teacher_name, "fingerprint": weights_fingerprint(teacher)},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer)},
        "chat_template": _text_hash(getattr(tokenizer, "chat_template", None)),
        "data": {
            "fingerprint": hashlib.sha256(b"".join(hashes)).hexdigest(),
            "num_examples": len(examples),
            "num_rows": num_rows,
        },
        "num_shards": n_shards,
    }
    plan_path = path / PLAN
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise PotstillError(f"{plan_path} is not valid JSON; delete the cache directory and rerun")
        changed = _diff_plans(old, plan)
        if changed:
            raise PotstillError(
                f"the cache at '{path}' was made for another setup ({', '.join(changed)} differ); "
                "choose another cache directory or delete this one"
            )
    else:
        atomic_write_json(plan_path, plan)
    for stale in remove_stale_temporaries(path):  # left by a killed writer (their pid is gone)
        log.info("removed %s, a temporary file of a killed `potstill cache`", stale)

    mine = [j for j in range(n_shards) if j % world_size == rank]
    todo = [j for j in mine if _shard_record_ok(path, j) is None]
    if todo:
        log.info("caching %d of %d shards (rank %d of %d) into %s", len(todo), n_shards, rank, world_size, path)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"cache rank {rank}" if world_size > 1 else "cache", unit="shard")
    pad = _pad_id(tokenizer)
    bits = id_bits(vocab)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for j in todo:
            lo, hi = j * spec.examples_per_shard, min((j + 1) * spec.examples_per_shard, len(examples))
            cols = _build_shard(teacher, head, examples[lo:hi], lo, spec, vocab, bits, pad, device, timings)
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_shard, path, j, cols, lo, hi, spec, on_shard)
            if bar is not None:
                bar.update(1)
        if pending is not None:
            pending.result()
    if bar is not None:
        bar.close()
    manifest = finalize_cache(path)
    if timings is not None:
        timings["total_s"] = time.perf_counter() - t_start
    return manifest


def _write_shard(
    path: Path,
    j: int,
    cols: dict[str, Tensor],
    lo: int,
    hi: int,
    spec: CacheSpec,
    on_shard: Callable[[int], None] | None,
) -> None:
    from safetensors.torch import save

    # One metadata key: safetensors writes a multi-key map in a random (per-process) order,
    # and a shard's bytes must not depend on the process that wrote it.
    meta = json.dumps({"format": FORMAT, "version": VERSION, "shard": j, "kind": spec.kind}, sort_keys=True)
    data = save(cols, metadata={"potstill": meta})
    atomic_write_bytes(path / _shard_name(j), data)
    rec = {
        "index": j,
        "file": _shard_name(j),
        "first_example": lo,
        "num_examples": hi - lo,
        "num_rows": int(cols["row_offsets"][-1]),
        "num_slots": int(cols["slot_offsets"][-1]),
        "bytes": len(data),
        "sha256": _sha256(data),
    }
    atomic_write_json(path / _shard_name(j).replace(".safetensors", ".json"), rec)
    if on_shard is not None:
        on_shard(j)


def finalize_cache(path: str | Path) -> dict | None:
    """Write ``manifest.json`` if every shard of the plan is on disk; return it (or None)."""
    path = Path(path)
    plan = json.loads((path / PLAN).read_text())
    records = []
    for j in range(plan["num_shards"]):
        rec = _shard_record_ok(path, j, check_hash=False)
        if rec is None:
            return None
        records.append(rec)
    total = sum(r["bytes"] for r in records)
    rows = sum(r["num_rows"] for r in records)
    manifest = {
        **plan,
        "shards": records,
        "total_bytes": total,
        "bytes_per_token": total / rows if rows else 0.0,
        "complete": True,
    }
    man_path = path / MANIFEST
    if man_path.is_file():
        try:
            if json.loads(man_path.read_text()) == manifest:
                return manifest
        except ValueError:
            pass
    atomic_write_json(man_path, manifest)
    return manifest


def _refuse_a_file(path: Path, fix: str) -> None:
    """A one-line error when ``path`` (or the nearest existing folder above it) is not a directory."""
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            where = "is a file" if p == path else f"lies under '{p}', which is a file"
            raise PotstillError(f"cache.dir '{path}' {where}, not a directory; {fix}")


# ----------------------------------------------------------------------------- reader

# The manifest's structure (read_manifest validates it before anything indexes into it).
_Strict = ConfigDict(extra="forbid", strict=True)
_SpecRecord = create_model(  # CacheSpec's fields, every one required, with its declared types
    "_SpecRecord",
    __config__=_Strict,
    **{f.name: (typing.get_type_hints(CacheSpec)[f.name], ...) for f in fields(CacheSpec)},
)


class _ShardRecord(BaseModel):
    model_config = _Strict
    index: int = Field(ge=0)
    file: str
    first_example: int = Field(ge=0)
    num_examples: int = Field(ge=1)
    num_rows: int = Field(ge=0)
    num_slots: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _TeacherRecord(BaseModel):
    model_config = _Strict
    name: str | None  # the recipe's teacher.model (None: unnamed)
    fingerprint: str


class _TokenizerRecord(BaseModel):
    model_config = _Strict
    fingerprint: str


class _DataRecord(BaseModel):
    model_config = _Strict
    fingerprint: str
    num_examples: int = Field(ge=1)
    num_rows: int = Field(ge=0)


class _Manifest(BaseModel):
    model_config = _Strict
    format: str
    version: int
    spec: _SpecRecord  # type: ignore[valid-type]
    vocab_size: int = Field(ge=1)
    id_bits: int = Field(ge=1)
    teacher: _TeacherRecord
    tokenizer: _TokenizerRecord
    chat_template: str
    data: _DataRecord
    num_shards: int = Field(ge=1)
    shards: list[_ShardRecord]
    total_bytes: int = Field(ge=0)
    bytes_per_token: float
    complete: bool


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with a manifest's structure (first problem only), or None."""
    try:
        _Manifest.model_validate(m)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "missing":
            return f"has no field '{field}'"
        if e["type"] == "extra_forbidden":
            return f"has an unknown field '{field}'"
        got = e["input"]
        shown = repr(got) if isinstance(got, (bool, int, float, str, type(None))) else type(got).__name__
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        # pydantic's words, without its class names: "a valid dictionary or instance of _SpecRecord"
        why = re.sub(r" or instance of \w+", "", " ".join(str(e["msg"]).split())).replace(
            "valid dictionary", "JSON object"
        )
        return f"has a bad field '{field}' ({why}, got {shown})"
    if len(m["shards"]) != m["num_shards"]:
        return f"lists {len(m['shards'])} shards but its field 'num_shards' says {m['num_shards']}"
    start = 0
    for j, rec in enumerate(m["shards"]):
        # The file name is fixed by the index: a manifest never points outside the cache directory.
        if rec["index"] != j or rec["file"] != _shard_name(j) or rec["first_example"] != start:
            return f"has a bad record for shard {j} (field 'shards.{j}': index, file or first_example)"
        start += rec["num_examples"]
    if start != m["data"]["num_examples"]:
        return f"has shards holding {start} examples but its field 'data.num_examples' says {m['data']['num_examples']}"
    return None


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete cache, or a one-line error saying what is wrong and how to fix it."""
    path = Path(path)
    _refuse_a_file(path, "point cache.dir at the directory `potstill cache` wrote")
    man = path / MANIFEST
    if not man.is_file():
        if (path / PLAN).is_file():
            try:
                n_shards = int(json.loads((path / PLAN).read_text())["num_shards"])
            except (ValueError, KeyError, TypeError):
                raise PotstillError(
                    f"{path / PLAN} is corrupt; delete the cache directory and rerun `potstill cache`"
                ) from None
            done = sum(_shard_record_ok(path, j, check_hash=False) is not None for j in range(n_shards))
            raise PotstillError(
                f"the cache at '{path}' is incomplete ({done} of {n_shards} shards); "
                "rerun `potstill cache` with the same recipe to finish it"
            )
        raise PotstillError(f"no teacher-signal cache at '{path}' (no {MANIFEST}); run `potstill cache` first")
    try:
        m = json.loads(man.read_text())
    except ValueError:
        raise PotstillError(f"{man} is corrupt (not JSON); rerun `potstill cache` to rewrite it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PotstillError(f"{man} is not a potstill cache manifest; point the recipe at a cache directory")
    if m.get("version") != VERSION:
        raise PotstillError(f"cache format version {m.get('version')} is not {VERSION}; rebuild the cache")
    problem = _manifest_problem(m)
    if problem is not None:
        raise PotstillError(f"{man} {problem}; rerun `potstill cache` with the same recipe to rewrite it")
    return m


@dataclass
class _Example:
    rows: int
    ids: Tensor | None
    values: Tensor
    scale: Tensor | None = None
    tail: Tensor | None = None
    row_len: Tensor | None = None
    counts: Tensor | None = None
    weights: Tensor | None = None


@dataclass
class _Shard:
    handle: Any
    token_hash: Tensor
    row_off: list[int]
    slot_off: list[int]
    byte_off: list[int]


class CachedSignal:
    """A finished cache behind :class:`~potstill.signals.SignalSource`: no teacher in memory.

    ``signal(batch)`` finds each example of the batch by ``batch["example_id"]`` (or, when
    the batch has no ids, by the content hash of its tokens), checks that its tokens are
    the cached ones and that its number of target rows matches, and returns a
    :class:`SparseSignal` (top-k or sampled) or a :class:`DenseSignal` (dense) for the
    batch's rows. ``tokenizer`` (and ``teacher_fingerprint``) are checked against the
    manifest when given.

    Opening the cache checks every shard file against its manifest record before any
    batch is read, so a damaged cache stops a run before it trains: the size of every
    shard always, and its sha256 too unless ``verify=False`` (hashing streams each file
    once; shard contents are still loaded lazily, when a batch first needs them).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer=None,
        teacher_fingerprint: str | None = None,
        tail: TailMode | None = None,
        verify: bool = True,
        max_open: int = 64,
    ):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.spec = CacheSpec(**m["spec"])
        self.kind: CacheKind = self.spec.kind
        self.vocab_size: int = int(m["vocab_size"])
        self.bits: int = int(m["id_bits"])
        self.tail: TailMode = tail or self.spec.tail
        self.verify = verify
        self.max_open = max_open
        # Dense caches hold log-softmax at T = 1, valid at any distillation temperature.
        self.temperature: float | None = None if self.kind == "dense" else float(self.spec.temperature)
        if tokenizer is not None:
            from ..models import tokenizer_fingerprint

            if tokenizer_fingerprint(tokenizer) != m["tokenizer"]["fingerprint"]:
                raise PotstillError(
                    f"the cache at '{self.path}' was written with another tokenizer or chat template; "
                    "distill with the teacher's tokenizer or rebuild the cache"
                )
        if teacher_fingerprint is not None and teacher_fingerprint != m["teacher"]["fingerprint"]:
            raise PotstillError(
                f"the cache at '{self.path}' was written by another teacher ({m['teacher']['name'] or 'unnamed'}, "
                "other weights); rebuild the cache with this recipe's teacher"
            )
        self._starts = [s["first_example"] for s in m["shards"]]
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._by_hash: dict[bytes, int] | None = None
        self._check_files()

    _FIX = "rerun `potstill cache` with the same recipe to rewrite it"

    def _check_size(self, j: int) -> Path:
        rec = self.manifest["shards"][j]
        f = self.path / rec["file"]
        if not f.is_file():
            raise PotstillError(f"cache shard {f} is missing; {self._FIX}")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise PotstillError(
                f"cache shard {f} does not match its manifest: {size} bytes, the manifest says "
                f"{rec['bytes']} (truncated or overwritten); {self._FIX}"
            )
        return f

    def _check_files(self) -> None:
        """Every shard's size, then (with ``verify``) every shard's sha256, streamed in parallel."""
        files = [self._check_size(j) for j in range(len(self.manifest["shards"]))]
        if not self.verify:
            return
        t0 = time.perf_counter()
        # hashlib releases the GIL on large reads, so threads hash several shards at once.
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            digests = list(pool.map(_file_sha256, files))
        for f, rec, got in zip(files, self.manifest["shards"], digests):
            if got != rec["sha256"]:
                raise PotstillError(
                    f"cache shard {f} does not match its manifest: its sha256 differs (corrupt); {self._FIX}"
                )
        log.info(
            "verified the sha256 of %d cache shards (%.1f MB) in %.1f s",
            len(files),
            self.manifest["total_bytes"] / 1e6,
            time.perf_counter() - t0,
        )

    def check_data(self, examples: list[dict]) -> None:
        """Refuse a dataset other than the cached one (before any training starts)."""
        hashes = [example_hash(x["input_ids"], x["labels"]) for x in examples]
        if hashlib.sha256(b"".join(hashes)).hexdigest() != self.manifest["data"]["fingerprint"]:
            raise PotstillError(
                f"the training examples differ from those cached in '{self.path}' ({len(examples)} now, "
                f"{self.manifest['data']['num_examples']} cached; data, max_length, system prompt or template "
                "changed); rerun `potstill cache` into a new directory"
            )

    def check_spec(self, spec: CacheSpec) -> None:
        """Refuse a recipe whose cache section asks for another signal than the one on disk
        (the tail rule is a reading choice and may differ)."""
        want, have = asdict(spec), dict(self.manifest["spec"])
        want.pop("tail"), have.pop("tail", None)
        changed = sorted(k for k in want if want[k] != have.get(k))
        if changed:
            raise PotstillError(
                f"the recipe's cache section differs from the cache at '{self.path}' ({', '.join(changed)}); "
                "rerun `potstill cache` into a new directory or restore the recipe"
            )

    # -------------------------------------------------------------------- shards
    def _shard(self, j: int) -> _Shard:
        sh = self._open.get(j)
        if sh is not None:
            self._open.move_to_end(j)
            return sh
        from safetensors import safe_open

        rec = self.manifest["shards"][j]
        f = self._check_size(j)  # again: cheap, and catches a file replaced since the cache was opened
        fix = self._FIX
        try:
            handle = safe_open(str(f), framework="pt")
            sh = _Shard(
                handle=handle,
                token_hash=handle.get_tensor("token_hash"),
                row_off=handle.get_tensor("row_offsets").tolist(),
                slot_off=handle.get_tensor("slot_offsets").tolist(),
                byte_off=handle.get_tensor("id_byte_offsets").tolist(),
            )
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise PotstillError(f"cache shard {f} cannot be read ({type(err).__name__}); {fix}") from None
        if len(sh.row_off) != rec["num_examples"] + 1 or sh.row_off[-1] != rec["num_rows"]:
            raise PotstillError(f"cache shard {f} does not match its manifest record; {fix}")
        self._open[j] = sh
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return sh

    def _locate(self, example_id: int) -> tuple[int, int]:
        j = bisect.bisect_right(self._starts, example_id) - 1
        n = self.manifest["data"]["num_examples"]
        if j < 0 or not 0 <= example_id < n:
            raise PotstillError(
                f"example id {example_id} is not in the cache ({n} examples); the data changed, rebuild the cache"
            )
        return j, example_id - self._starts[j]

    def _hash_index(self) -> dict[bytes, int]:
        if self._by_hash is None:
            index = {}
            for j, start in enumerate(self._starts):
                for i, row in enumerate(self._shard(j).token_hash):
                    index.setdefault(bytes(row.tolist()), start + i)
            self._by_hash = index
        return self._by_hash

    def example(self, example_id: int, token_hash: bytes | None = None) -> _Example:
        """The cached rows of one example; ``token_hash`` (if given) must match the cached one."""
        j, i = self._locate(example_id)
        sh = self._shard(j)
        if token_hash is not None and bytes(sh.token_hash[i].tolist()) != token_hash:
            raise PotstillError(
                f"example {example_id}: its tokens differ from the cached ones (data, tokenizer, chat template or "
                f"max_length changed); rebuild the cache with `potstill cache`"
            )
        h = sh.handle
        r0, r1 = sh.row_off[i], sh.row_off[i + 1]
        s0, s1 = sh.slot_off[i], sh.slot_off[i + 1]
        b0, b1 = sh.byte_off[i], sh.byte_off[i + 1]
        ex = _Example(
            rows=r1 - r0,
            ids=None if self.kind == "dense" else unpack_ids(h.get_slice("ids")[b0:b1], self.bits, s1 - s0),
            values=h.get_slice("values")[s0:s1],
        )
        if self.spec.dtype == "int8":
            ex.scale = h.get_slice("scale")[r0:r1]
        if self.kind == "topk":
            ex.tail = h.get_slice("tail")[r0:r1]
        if self.kind == "sampled":
            ex.row_len = h.get_slice("row_len")[r0:r1]
            if self.spec.proposal_temperature == 1.0:
                ex.counts = h.get_slice("counts")[s0:s1]
            else:
                ex.weights = h.get_slice("weights")[s0:s1]
        return ex

    # -------------------------------------------------------------------- signal
    def signal(self, batch: dict[str, Tensor]) -> Signal:
        from ..data.packing import segments

        labels = batch["labels"]
        ids = batch["input_ids"].detach().cpu()
        lab = labels.detach().cpu()
        given = batch.get("example_id")
        parts: list[_Example] = []
        segs = segments(batch)  # one per example, packed or padded
        for b, (row, start, end) in enumerate(segs):
            h = example_hash(ids[row, start:end], lab[row, start:end])
            if given is not None:
                eid = int(given[b])
            else:
                eid = self._hash_index().get(h)
                if eid is None:
                    raise PotstillError(
                        f"no cached teacher signal for example {b} of this batch (its tokens are not in '{self.path}'); "
                        "the data, tokenizer or chat template changed: rebuild the cache"
                    )
            ex = self.example(eid, h)
            # its targets up to the next example of the row or the row's end (a label on padding counts: refused)
            upto = segs[b + 1][1] if b + 1 < len(segs) and segs[b + 1][0] == row else lab.shape[1]
            want = int((lab[row, start + 1 : upto] != -100).sum())
            if ex.rows != want:
                raise PotstillError(
                    f"example {eid}: {want} target tokens in the batch but {ex.rows} cached rows; rebuild the cache"
                )
            parts.append(ex)
        return self._combine(parts).to(labels.device) if self.kind != "dense" else self._dense(parts, labels.device)

    def _dense(self, parts: list[_Example], device) -> DenseSignal:
        v = self.vocab_size
        lp = [
            decode_logprobs(p.values.reshape(p.rows, v), self.spec.dtype, None if p.scale is None else p.scale)
            for p in parts
        ]
        return DenseSignal(logits=torch.cat(lp).to(device) if lp else torch.zeros(0, v, device=device))

    def _combine(self, parts: list[_Example]) -> SparseSignal:
        dtype = self.spec.dtype
        if self.kind == "topk":
            k = self.spec.k
            ids = torch.cat([p.ids.reshape(p.rows, k) for p in parts])
            lp = torch.cat([decode_logprobs(p.values.reshape(p.rows, k), dtype, p.scale) for p in parts])
            tail = torch.cat([p.tail.float() for p in parts])
            return SparseSignal(
                ids=ids, logprobs=lp, tail=self.tail, tail_logprob=tail if self.tail == "bucket" else None
            )
        row_len = torch.cat([p.row_len.long() for p in parts])
        flat_ids = torch.cat([p.ids for p in parts])
        flat_vals = torch.cat([p.values for p in parts])
        ids, _ = _ragged_to_padded(flat_ids, row_len, 0)
        if dtype == "int8":
            codes, _ = _ragged_to_padded(flat_vals, row_len, 0)
            scale = torch.cat([p.scale for p in parts])
            lp = decode_logprobs(codes, dtype, scale)
        else:
            lp, _ = _ragged_to_padded(decode_logprobs(flat_vals, dtype), row_len, float("-inf"))
        if self.spec.proposal_temperature == 1.0:
            w_flat = torch.cat([p.counts for p in parts]).float() / self.spec.draws
        else:
            w_flat = torch.cat([p.weights for p in parts]).float()
        weights, _ = _ragged_to_padded(w_flat, row_len, 0.0)
        return SparseSignal(ids=ids, logprobs=lp, weights=weights)
