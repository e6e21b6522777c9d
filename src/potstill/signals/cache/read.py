"""Reading a teacher-signal cache: :class:`CachedSignal`, a :class:`~potstill.signals.SignalSource`
with no teacher in memory (shards memory-mapped, checked against the manifest before use)."""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from potstill.fingerprints import example_hash, file_sha256

from ...errors import PotstillError
from ..quant import decode_logprobs, unpack_ids
from ..types import DenseSignal, Signal, SparseSignal, TailMode
from .encode import EncodedRows
from .format import CacheKind, CacheSpec, read_manifest, row_teachers

log = logging.getLogger("potstill")


def _ragged_to_padded(flat: Tensor, row_len: Tensor, fill: float) -> tuple[Tensor, Tensor]:
    """``[S]`` slots of rows with ``row_len`` -> ``[R, max_len]`` padded, plus the slot mask."""
    r = row_len.numel()
    width = int(row_len.max()) if r else 0
    mask = torch.arange(width).unsqueeze(0) < row_len.unsqueeze(1)
    out = torch.full((r, width), fill, dtype=flat.dtype)
    out[mask] = flat
    return out, mask


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

    A refreshed cache may hold rows of more than one teacher (``potstill cache --refresh``
    below its threshold keeps the rows that barely moved); reading it is refused unless
    ``allow_mixed``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer=None,
        teacher_fingerprint: str | None = None,
        tail: TailMode | None = None,
        verify: bool = True,
        allow_mixed: bool = False,
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
            from potstill.fingerprints import tokenizer_fingerprint

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
        teachers = {fp for _, _, fp in row_teachers(m)}
        if len(teachers) > 1 and not allow_mixed:
            old = sum(n for _, n, fp in row_teachers(m) if fp != m["teacher"]["fingerprint"])
            raise PotstillError(
                f"the cache at '{self.path}' holds rows of {len(teachers)} teachers ({old} of "
                f"{m['data']['num_examples']} examples from an earlier one, kept by a refresh); set "
                "cache.allow_mixed: true to train on it, or refresh with threshold 0"
            )
        self.mixed = len(teachers) > 1
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
            digests = list(pool.map(file_sha256, files))
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
            index: dict[bytes, int] = {}
            for j, start in enumerate(self._starts):
                for i, row in enumerate(self._shard(j).token_hash):
                    index.setdefault(bytes(row.tolist()), start + i)
            self._by_hash = index
        return self._by_hash

    def example(self, example_id: int, token_hash: bytes | None = None) -> EncodedRows:
        """The cached rows of one example as stored (:meth:`stored_rows`); ``token_hash`` (if given) must match
        the cached one."""
        j, i = self._locate(example_id)
        sh = self._shard(j)
        if token_hash is not None and bytes(sh.token_hash[i].tolist()) != token_hash:
            raise PotstillError(
                f"example {example_id}: its tokens differ from the cached ones (data, tokenizer, chat template or "
                f"max_length changed); rebuild the cache with `potstill cache`"
            )
        return self.stored_rows(example_id)

    def stored_rows(self, example_id: int) -> EncodedRows:
        """One example's columns exactly as stored (ids unpacked, values still encoded), so a
        refresh can write them into a new shard bit for bit."""
        j, i = self._locate(example_id)
        sh = self._shard(j)
        h = sh.handle
        r0, r1 = sh.row_off[i], sh.row_off[i + 1]
        s0, s1 = sh.slot_off[i], sh.slot_off[i + 1]
        b0, b1 = sh.byte_off[i], sh.byte_off[i + 1]
        values = {"values": h.get_slice("values")[s0:s1]}
        if self.spec.dtype == "int8":
            values["scale"] = h.get_slice("scale")[r0:r1]
        ids = torch.zeros(0, dtype=torch.long)
        if self.kind != "dense":
            ids = unpack_ids(h.get_slice("ids")[b0:b1], self.bits, s1 - s0).long()
        out = EncodedRows(ids=ids, values=values, rows=r1 - r0)
        if self.kind == "topk":
            out.tail = h.get_slice("tail")[r0:r1]
        if self.kind == "sampled":
            out.row_len = h.get_slice("row_len")[r0:r1]
            if self.spec.proposal_temperature == 1.0:
                out.counts = h.get_slice("counts")[s0:s1]
            else:
                out.weights = h.get_slice("weights")[s0:s1]
        return out

    def rows_signal(self, example_ids: list[int], device=None) -> Signal:
        """The cached signal of these examples' rows, in order (no batch, no token check)."""
        parts = [self.example(e) for e in example_ids]
        if self.kind == "dense":
            return self._dense(parts, device or "cpu")
        return self._combine(parts).to(device or "cpu")

    # -------------------------------------------------------------------- signal
    def signal(self, batch: dict[str, Tensor]) -> Signal:
        from ...data.packing import segments

        labels = batch["labels"]
        ids = batch["input_ids"].detach().cpu()
        lab = labels.detach().cpu()
        given = batch.get("example_id")
        parts: list[EncodedRows] = []
        segs = segments(batch)  # one per example, packed or padded
        for b, (row, start, end) in enumerate(segs):
            h = example_hash(ids[row, start:end], lab[row, start:end])
            if given is not None:
                eid = int(given[b])
            else:
                found = self._hash_index().get(h)
                if found is None:
                    raise PotstillError(
                        f"no cached teacher signal for example {b} of this batch (its tokens are not in '{self.path}'); "
                        "the data, tokenizer or chat template changed: rebuild the cache"
                    )
                eid = found
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

    def _dense(self, parts: list[EncodedRows], device) -> DenseSignal:
        v = self.vocab_size
        lp = [
            decode_logprobs(p.values["values"].reshape(p.rows, v), self.spec.dtype, p.values.get("scale"))
            for p in parts
        ]
        return DenseSignal(logits=torch.cat(lp).to(device) if lp else torch.zeros(0, v, device=device))

    def _combine(self, parts: list[EncodedRows]) -> SparseSignal:
        # The optional fields of `parts` are set for this cache's kind and dtype (see :meth:`example`).
        dtype = self.spec.dtype
        if self.kind == "topk":
            k = self.spec.k
            ids = torch.cat([cast(Tensor, p.ids).reshape(p.rows, k) for p in parts])
            lp = torch.cat(
                [decode_logprobs(p.values["values"].reshape(p.rows, k), dtype, p.values.get("scale")) for p in parts]
            )
            tail = torch.cat([cast(Tensor, p.tail).float() for p in parts])
            return SparseSignal(
                ids=ids, logprobs=lp, tail=self.tail, tail_logprob=tail if self.tail == "bucket" else None
            )
        row_len = torch.cat([cast(Tensor, p.row_len).long() for p in parts])
        flat_ids = torch.cat([cast(Tensor, p.ids) for p in parts])
        flat_vals = torch.cat([p.values["values"] for p in parts])
        ids, _ = _ragged_to_padded(flat_ids, row_len, 0)
        if dtype == "int8":
            codes, _ = _ragged_to_padded(flat_vals, row_len, 0)
            scale = torch.cat([p.values["scale"] for p in parts])
            lp = decode_logprobs(codes, dtype, scale)
        else:
            lp, _ = _ragged_to_padded(decode_logprobs(flat_vals, dtype), row_len, float("-inf"))
        if self.spec.proposal_temperature == 1.0:
            w_flat = torch.cat([cast(Tensor, p.counts) for p in parts]).float() / self.spec.draws
        else:
            w_flat = torch.cat([cast(Tensor, p.weights) for p in parts]).float()
        weights, _ = _ragged_to_padded(w_flat, row_len, 0.0)
        return SparseSignal(ids=ids, logprobs=lp, weights=weights)
