"""Writing a teacher-signal cache: run the teacher once, shard by shard, resumably.

:func:`write_cache` writes the plan, then every shard this process owns that has no valid
record yet (:func:`build_shard` runs the teacher, :mod:`.encode` encodes its output), each
file atomically; :func:`finalize_cache` writes the manifest once every shard is on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from potstill.fingerprints import example_hash, sha256_hex, text_hash, weights_fingerprint

from ...errors import PotstillError
from ...io import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from ..online import target_index, target_rows
from ..quant import id_bits
from .encode import EncodedRows, assemble_shard, empty_rows, example_rows, extract, row_seed
from .format import (
    FORMAT,
    HISTORY_KEYS,
    MANIFEST,
    PLAN,
    VERSION,
    CacheSpec,
    record_name,
    refuse_a_file,
    revision_of,
    shard_bounds,
    shard_name,
    shard_record_ok,
)

log = logging.getLogger("potstill")

_DEFAULT_SPEC = CacheSpec()  # frozen: one shared default for write_cache


def _num_rows(labels) -> int:
    t = torch.as_tensor(labels)
    return int((t[1:] != -100).sum())


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def build_shard(
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
    ids = list(range(first_id, first_id + len(examples)))
    rows = encode_examples(teacher, head, examples, ids, spec, vocab, pad_id, device, timings)
    return assemble_shard(examples, rows, first_id, spec, bits)


def encode_examples(
    teacher,
    head,
    examples: list[dict],
    example_ids: list[int],
    spec: CacheSpec,
    vocab: int,
    pad_id: int,
    device,
    timings: dict | None = None,
) -> list[EncodedRows]:
    """The teacher's encoded rows for each of ``examples`` (their ids seed the sampled draws)."""
    from ...data import PadCollator
    from ...models import final_hidden

    per_example: list[EncodedRows | None] = [None] * len(examples)
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
            seeds = [row_seed(spec.seed, example_ids[i], r) for i, c in zip(members, counts) for r in range(c)]
        with torch.no_grad():
            t0 = time.perf_counter()
            hidden = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
            rows = target_rows(hidden, target_index(labels))
            sync_device(device)
            fwd = time.perf_counter() - t0
            parts = []
            for s in range(0, rows.shape[0], spec.chunk_size):
                t0 = time.perf_counter()
                z = head(rows[s : s + spec.chunk_size]).float()[:, :vocab]
                sync_device(device)
                fwd += time.perf_counter() - t0
                parts.append(extract(z, spec, vocab, None if seeds is None else seeds[s : s + spec.chunk_size]))
        if timings is not None:
            timings["forward_s"] = timings.get("forward_s", 0.0) + fwd
            timings["tokens_read"] = timings.get("tokens_read", 0) + int(batch["attention_mask"].sum())
        cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        start = 0
        for i, c in zip(members, counts):
            per_example[i] = example_rows(cols, start, start + c, spec) if c else empty_rows(spec, vocab)
            start += c
    # `order` covers every example, so each one has been encoded above.
    return cast("list[EncodedRows]", per_example)


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
    spec: CacheSpec = _DEFAULT_SPEC,
    *,
    teacher_name: str = "",
    append: bool = False,
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
    the time spent in the teacher's body and head, ``tokens_read``, the tokens the teacher
    read, and ``total_s``, the whole call.

    ``append``: ``examples`` extend the cached ones (the cached examples are their first ones,
    unchanged); shards are written for the new examples only, the existing shards stay as
    they are, byte for byte. Without it a grown dataset is refused, naming the flag.
    """
    from ...data.collate import pad_id

    t_start = time.perf_counter()
    path = Path(path)
    if not examples:
        raise PotstillError("no examples to cache; check the recipe's data section")
    if not 0 <= rank < world_size:
        raise PotstillError(f"rank {rank} is not in [0, {world_size}); pass --rank in 0..world_size-1")
    refuse_a_file(path, "point cache.dir at a directory (new or one `potstill cache` wrote)")
    from ...models.placement import head_on, input_device

    device = input_device(teacher)  # a teacher spread by a device map: where its embeddings run
    head = head_on(teacher, device)
    vocab = head.vocab
    spec.check(vocab)
    teacher.eval()
    plan = _open_plan(path, _cache_plan(teacher, tokenizer, examples, spec, vocab, teacher_name), examples, append)
    n_shards = plan["num_shards"]
    mine = [j for j in range(n_shards) if j % world_size == rank]
    todo = [j for j in mine if shard_record_ok(path, j, revision=revision_of(plan, j)) is None]
    if todo:
        log.info("caching %d of %d shards (rank %d of %d) into %s", len(todo), n_shards, rank, world_size, path)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"cache rank {rank}" if world_size > 1 else "cache", unit="shard")
    pad = pad_id(tokenizer, required=True)
    bounds = shard_bounds(plan)
    _write_shards(teacher, head, examples, path, todo, bounds, spec, vocab, pad, device, bar, on_shard, timings)
    if bar is not None:
        bar.close()
    manifest = finalize_cache(path)
    if timings is not None:
        timings["total_s"] = time.perf_counter() - t_start
    return manifest


def _cache_plan(teacher, tokenizer, examples: list[dict], spec: CacheSpec, vocab: int, teacher_name: str) -> dict:
    """What the cache at hand is: ``plan.json``'s content (spec and teacher/tokenizer/data fingerprints)."""
    from potstill.fingerprints import tokenizer_fingerprint

    hashes = [example_hash(x["input_ids"], x["labels"]) for x in examples]
    num_rows = sum(_num_rows(x["labels"]) for x in examples)
    n_shards = math.ceil(len(examples) / spec.examples_per_shard)
    return {
        "format": FORMAT,
        "version": VERSION,
        "spec": asdict(spec),
        "vocab_size": vocab,
        "id_bits": id_bits(vocab),
        "teacher": {"name": teacher_name, "fingerprint": weights_fingerprint(teacher)},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer)},
        "chat_template": text_hash(getattr(tokenizer, "chat_template", None)),
        "data": {
            "fingerprint": hashlib.sha256(b"".join(hashes)).hexdigest(),
            "num_examples": len(examples),
            "num_rows": num_rows,
        },
        "num_shards": n_shards,
    }


def _open_plan(path: Path, plan: dict, examples: list[dict], append: bool) -> dict:
    """Write ``plan.json``, or check it against the directory's plan and return the plan in force:
    a resumed cache must match, and with ``append`` a cache whose examples are the first of
    ``examples`` grows by one segment. Then remove the temporary files a killed writer left."""
    plan_path = path / PLAN
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise PotstillError(f"{plan_path} is not valid JSON; delete the cache directory and rerun")
        history = {k: old[k] for k in HISTORY_KEYS if k in old}
        plan = {**plan, **history}
        plan["num_shards"] = len(shard_bounds(plan))  # the same data in the same segments
        changed = _diff_plans(old, plan)
        grown = _grown_by(old, examples) if changed and set(changed) <= _GROWTH else 0
        if grown and not append:
            raise PotstillError(
                f"the data grew by {grown} examples past the {old['data']['num_examples']} cached in '{path}'; "
                "rerun `potstill cache --append` to cache the new ones only"
            )
        if changed and not grown:
            raise PotstillError(
                f"the cache at '{path}' was made for another setup ({', '.join(changed)} differ); "
                "choose another cache directory or delete this one"
            )
        if grown:
            n_old = int(old["data"]["num_examples"])
            plan["segments"] = [*history.get("segments", []), n_old]
            if "sources" in history:
                plan["sources"] = [*history["sources"], [n_old, grown, plan["teacher"]["fingerprint"]]]
            log.info("appending %d examples to the %d cached in %s", grown, n_old, path)
        plan["num_shards"] = len(shard_bounds(plan))
        if plan != old:
            atomic_write_json(plan_path, plan)
    else:
        atomic_write_json(plan_path, plan)
    for stale in remove_stale_temporaries(path):  # left by a killed writer (their pid is gone)
        log.info("removed %s, a temporary file of a killed `potstill cache`", stale)
    return plan


# What differs between a cache's plan and the plan of the same data with examples appended.
_GROWTH = {"data.fingerprint", "data.num_examples", "data.num_rows", "num_shards"}


def _grown_by(old: dict, examples: list[dict]) -> int:
    """How many examples ``examples`` adds after the ones cached under ``old`` (0: not an extension)."""
    n_old = int(old["data"]["num_examples"])
    if len(examples) <= n_old:
        return 0
    prefix = hashlib.sha256(b"".join(example_hash(x["input_ids"], x["labels"]) for x in examples[:n_old]))
    return len(examples) - n_old if prefix.hexdigest() == old["data"]["fingerprint"] else 0


def _write_shards(
    teacher, head, examples, path, todo, bounds, spec, vocab, pad, device, bar, on_shard, timings
) -> None:
    """Build the shards ``todo`` one after another; each is written to disk in a background thread
    while the teacher runs over the next."""
    bits = id_bits(vocab)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for j in todo:
            lo, hi = bounds[j]
            cols = build_shard(teacher, head, examples[lo:hi], lo, spec, vocab, bits, pad, device, timings)
            if pending is not None:
                pending.result()
            pending = pool.submit(write_shard, path, j, cols, lo, hi, spec, on_shard)
            if bar is not None:
                bar.update(1)
        if pending is not None:
            pending.result()


def write_shard(
    path: Path,
    j: int,
    cols: dict[str, Tensor],
    lo: int,
    hi: int,
    spec: CacheSpec,
    on_shard: Callable[[int], None] | None,
    revision: int = 0,
) -> None:
    from safetensors.torch import save

    # One metadata key: safetensors writes a multi-key map in a random (per-process) order,
    # and a shard's bytes must not depend on the process that wrote it.
    meta = json.dumps({"format": FORMAT, "version": VERSION, "shard": j, "kind": spec.kind}, sort_keys=True)
    data = save(cols, metadata={"potstill": meta})
    atomic_write_bytes(path / shard_name(j, revision), data)
    rec = {
        "index": j,
        "file": shard_name(j, revision),
        "first_example": lo,
        "num_examples": hi - lo,
        "num_rows": int(cols["row_offsets"][-1]),
        "num_slots": int(cols["slot_offsets"][-1]),
        "bytes": len(data),
        "sha256": sha256_hex(data),
        **({"revision": revision} if revision else {}),
    }
    atomic_write_json(path / record_name(j, revision), rec)
    if on_shard is not None:
        on_shard(j)


def finalize_cache(path: str | Path) -> dict | None:
    """Write ``manifest.json`` if every shard of the plan is on disk; return it (or None)."""
    path = Path(path)
    plan = json.loads((path / PLAN).read_text())
    records = []
    for j in range(plan["num_shards"]):
        rec = shard_record_ok(path, j, check_hash=False, revision=revision_of(plan, j))
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


def record_in_plan(path: str | Path, key: str, value) -> dict:
    """Set a history entry of a finished cache's plan (``HISTORY_KEYS``, e.g. its certificate) and
    write the manifest that carries it."""
    path = Path(path)
    if key not in HISTORY_KEYS:
        raise ValueError(f"{key!r} is not a history key of a cache plan ({', '.join(HISTORY_KEYS)})")
    plan = json.loads((path / PLAN).read_text())
    plan[key] = value
    atomic_write_json(path / PLAN, plan)
    manifest = finalize_cache(path)
    if manifest is None:
        raise PotstillError(f"the cache at '{path}' is incomplete; finish it with `potstill cache` first")
    return manifest
