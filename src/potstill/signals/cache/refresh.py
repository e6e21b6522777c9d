"""Refreshing a teacher-signal cache against a changed teacher: recompute only the rows that moved.

A teacher fine-tuned a little moves its distribution on some examples and barely on others.
:func:`refresh_cache` measures, per cached example, the *drift* of the new teacher from the
cached signal, ``KL(new || old)`` per target token, and recomputes only the examples whose
drift exceeds a threshold (or the top fraction of them); every other example keeps its rows,
bit for bit, and the manifest records which examples come from which teacher (``sources``).

The drift is measured on what the cache holds. For a top-k or sampled cache both
distributions are coarsened onto the cached ids plus one bucket for everything else (the
old teacher's log-probs at its ids are stored exactly), so the drift is an exact KL between
the coarsened pair and, by the data-processing inequality, never above the dense
``KL(new || old)``; for a dense cache it is the dense KL. It is estimated from a sample of
each example's rows: its first ``probe_tokens`` target tokens, which a causal teacher scores
by reading only the prompt and those tokens (``probe_tokens: None`` reads them all and the
drift is exact). The probe is the price of the refresh: it costs the teacher's forward over
the prompts and the first response tokens, instead of over every token. Under a threshold an
example over it is finished from its probe's key/value cache (the teacher reads only the tokens
after the probe), so a refresh reads no token twice and never more tokens than a new cache; under
a fraction every drift is needed first and the chosen examples are read again whole.

Files, beside the cache's own: ``refresh.json`` (the refresh in progress: the new teacher,
the rule, the revision ``g``), ``drift-<g>-<shard>.json`` (each shard's drifts, the unit of
resume), and the recomputed shards as revision ``g`` (``shard-00003.r1.safetensors``). The
old manifest and shards stay valid until the new manifest replaces them, so a killed refresh
resumes where it stopped and a reader never sees half a refresh; the superseded files are
removed afterwards. ``drift.json`` keeps the last refresh's per-example drifts.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from ...errors import PotstillError
from ...io import atomic_write_json
from ..online import target_index, target_rows
from ..quant import id_bits
from ..types import DenseSignal, Signal, SparseSignal
from .encode import EncodedRows, assemble_shard, empty_rows, example_rows, extract, log1mexp64, row_seed
from .format import MANIFEST, PLAN, CacheSpec, record_name, revision_of, row_teachers, shard_record_ok
from .read import CachedSignal
from .write import encode_examples, finalize_cache, sync_device, write_shard

log = logging.getLogger("potstill")

REFRESH = "refresh.json"
DRIFT = "drift.json"
DEFAULT_THRESHOLD = 0.01
_MANIFEST_ONLY = ("shards", "total_bytes", "bytes_per_token", "complete")


@dataclass(frozen=True)
class RefreshRule:
    """Which examples a refresh recomputes.

    ``threshold``: those whose drift (nats per target token) exceeds it; ``fraction``: the
    top fraction of the probed examples by drift (one process only: it needs every drift).
    ``probe_tokens``: target tokens per example the drift is measured on (None: all).
    """

    threshold: float | None = DEFAULT_THRESHOLD
    fraction: float | None = None
    probe_tokens: int | None = 16

    def check(self, world_size: int) -> None:
        if (self.threshold is None) == (self.fraction is None):
            raise PotstillError("cache.refresh: give exactly one of threshold and fraction")
        if self.threshold is not None and not self.threshold >= 0:
            raise PotstillError(f"cache.refresh.threshold={self.threshold} must be >= 0 (nats per token)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise PotstillError(f"cache.refresh.fraction={self.fraction} must be in (0, 1]")
        if self.probe_tokens is not None and self.probe_tokens < 1:
            raise PotstillError(f"cache.refresh.probe_tokens={self.probe_tokens} must be >= 1 (or null: all)")
        if self.fraction is not None and world_size > 1:
            raise PotstillError(
                "cache.refresh.fraction needs every example's drift in one process; refresh with one process "
                "or use cache.refresh.threshold"
            )


# ------------------------------------------------------------------------- drift


def _kl_rows(lp: Tensor, lo: Tensor) -> Tensor:
    """``KL(p || o)`` per row from log-probs (``-inf`` allowed; ``0 log 0 = 0``)."""
    p = lp.exp()
    diff = lp - lo.clamp_min(-1e4)
    return torch.where(p > 0, p * diff, torch.zeros_like(p)).sum(-1)


def drift_rows(new_logprobs: Tensor, old: Signal) -> Tensor:
    """``KL(new || old)`` per row, on what the cached ``old`` signal can tell (see the module doc).

    ``new_logprobs`` ``[R, V]``: the new teacher's log-softmax at the cache's temperature
    (temperature 1 for a dense cache, whose rows are stored at 1).
    """
    if isinstance(old, DenseSignal):
        return _kl_rows(new_logprobs.double(), old.chunk_logits(0, old.num_rows).double()).float()
    assert isinstance(old, SparseSignal)
    live = torch.isfinite(old.logprobs)
    ids = torch.where(live, old.ids, torch.zeros_like(old.ids))
    lq = torch.where(live, new_logprobs.gather(-1, ids).double(), torch.full(ids.shape, float("-inf")).double())
    lo = old.logprobs.double()
    new = torch.cat([lq, log1mexp64(torch.logsumexp(lq, -1)).unsqueeze(-1)], -1)
    was = torch.cat([lo, log1mexp64(torch.logsumexp(lo, -1)).unsqueeze(-1)], -1)
    return _kl_rows(new, was).float()


def _row_span(sig: Signal, a: int, b: int) -> Signal:
    """Rows ``a:b`` of a signal."""
    return sig.rows(torch.arange(a, b))


def probe_prefix(example: dict, probe_tokens: int | None) -> dict:
    """The example cut after its first ``probe_tokens`` target tokens (a causal teacher's
    prediction of those tokens reads nothing after them)."""
    labels = example["labels"]
    if probe_tokens is None:
        return example
    targets = [t for t in range(1, len(labels)) if labels[t] != -100]
    if len(targets) <= probe_tokens:
        return example
    end = targets[probe_tokens - 1] + 1
    return {k: example[k][:end] for k in ("input_ids", "labels", "attention_mask")}


def _rest(example: dict, cut: int) -> dict:
    return {k: example[k][cut:] for k in ("input_ids", "labels", "attention_mask")}


@torch.no_grad()
def example_drifts(
    teacher,
    head,
    examples: list[dict],
    example_ids: list[int],
    cached: CachedSignal,
    probe_tokens: int | None,
    batch_size: int,
    chunk_size: int,
    pad_id: int,
    device,
    timings: dict | None = None,
    encode: CacheSpec | None = None,
    continue_over: float | None = None,
) -> tuple[list[float], int, dict[int, EncodedRows]]:
    """Mean drift per target token of each example (0 for one without targets), the rows probed,
    and (with ``encode``, the cache's spec) the new rows of every example the probe read whole,
    keyed by its position in ``examples``: recomputing those needs no second forward.

    With ``continue_over`` (a threshold) an example whose drift exceeds it is finished from the
    probe's key/value cache: the teacher reads only the tokens after its probe, never one twice,
    and its new rows join the returned ones. The probe batches are left-padded for that (see
    :func:`~potstill.models.hidden_and_cache`). ``timings`` receives ``forward_s`` (the teacher's
    own work), ``probe_tokens_read``, and for the continuations ``continue_s`` and ``tokens_read``.
    """
    from ...data import PadCollator
    from ...models import hidden_and_cache

    if continue_over is not None and encode is None:
        raise ValueError("continue_over needs encode (the cache's spec)")
    temperature = 1.0 if cached.kind == "dense" else float(cached.spec.temperature)
    probes = [probe_prefix(x, probe_tokens) for x in examples]
    order = sorted(range(len(probes)), key=lambda i: (len(probes[i]["input_ids"]), i))
    # A probe batch, and a batch of continuations, holds about the tokens of a writer's batch: probes and
    # remainders are shorter than examples, so more of them go in one (fewer passes over the weights).
    budget = batch_size * sum(len(x["input_ids"]) for x in examples) / max(1, len(examples))
    per_batch = max(batch_size, int(budget * len(probes) / max(1, sum(len(x["input_ids"]) for x in probes))))
    if cached.kind == "dense":  # the old rows of a batch are whole-vocabulary rows: no larger batches
        per_batch = batch_size
    left_pad = PadCollator(pad_id, left=True)
    out = [0.0] * len(examples)
    whole: dict[int, EncodedRows] = {}
    probed = 0
    t_cont = 0.0
    vocab = cached.vocab_size
    for b0 in range(0, len(order), per_batch):
        members = order[b0 : b0 + per_batch]
        batch = {k: v.to(device) for k, v in left_pad([probes[i] for i in members]).items() if k != "example_id"}
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(0)  # each row's own positions
        labels = batch["labels"]
        counts = (labels[:, 1:] != -100).sum(-1).tolist()
        t0 = time.perf_counter()
        hidden, past = hidden_and_cache(
            teacher,
            batch["input_ids"],
            batch["attention_mask"],
            batch["position_ids"],
            use_cache=continue_over is not None,
        )
        rows = target_rows(hidden, target_index(labels))
        sync_device(device)
        fwd = time.perf_counter() - t0
        # the batch's rows, example after example: whose they are and their index in the example
        owner = [i for i, c in zip(members, counts) for _ in range(c)]
        index = [r for c in counts for r in range(c)]
        old = _probed_rows(cached, [example_ids[i] for i in members], counts)
        drift = torch.zeros(len(owner), dtype=torch.float64)
        # new rows of the examples the probe read whole, encoded as they come
        encoded: dict[int, list[dict[str, Tensor]]] = {
            i: [] for i in members if encode is not None and probes[i] is examples[i]
        }
        for s in range(0, len(owner), chunk_size):
            e = min(s + chunk_size, len(owner))
            t0 = time.perf_counter()
            z = head(rows[s:e]).float()[:, :vocab]
            sync_device(device)
            fwd += time.perf_counter() - t0
            lp = torch.log_softmax(z if temperature == 1.0 else z / temperature, -1).cpu()
            drift[s:e] = drift_rows(lp, _row_span(old, s, e)).double()
            if encode is not None:
                _encode_into(encoded, z, owner[s:e], index[s:e], encode, vocab, example_ids)
        start, first = 0, {}
        for i, c in zip(members, counts):
            if c:
                out[i] = float(drift[start : start + c].sum()) / c
                probed += c
            first[i] = start
            start += c
        pending = [
            i
            for i, c in zip(members, counts)
            if continue_over is not None and c and probes[i] is not examples[i] and out[i] > continue_over
        ]
        if pending:  # finish the cut examples over the threshold from the probe's cache
            assert encode is not None
            t0 = time.perf_counter()
            rest = {i: len(examples[i]["input_ids"]) - len(probes[i]["input_ids"]) for i in pending}
            groups = _groups(sorted(pending, key=lambda i: (rest[i], i)), rest, budget)
            tails: dict[int, Tensor] = {}
            for n, group in enumerate(groups):
                own = past if n == len(groups) - 1 else copy.deepcopy(past)  # (the last one may consume it)
                tails.update(_continue(teacher, own, batch, hidden, group, probes, examples, members, pad_id, device))
            sync_device(device)
            fwd += time.perf_counter() - t0
            # each example's rows whole: the probe's, then those after it
            c_of = dict(zip(members, counts))
            more = torch.cat([torch.cat([rows[first[i] : first[i] + c_of[i]], tails[i]]) for i in pending])
            owner = [i for i in pending for _ in range(c_of[i] + tails[i].shape[0])]
            index = [r for i in pending for r in range(c_of[i] + tails[i].shape[0])]
            encoded.update({i: [] for i in pending})
            for s in range(0, len(owner), chunk_size):
                t1 = time.perf_counter()
                z = head(more[s : s + chunk_size]).float()[:, :vocab]
                sync_device(device)
                fwd += time.perf_counter() - t1
                _encode_into(
                    encoded, z, owner[s : s + chunk_size], index[s : s + chunk_size], encode, vocab, example_ids
                )
            t_cont += time.perf_counter() - t0  # the whole recompute of these rows, extraction included
            if timings is not None:
                timings["tokens_read"] = timings.get("tokens_read", 0) + sum(
                    int(sum(examples[i]["attention_mask"][len(probes[i]["input_ids"]) :])) for i in pending
                )
        for i, parts in encoded.items():
            assert encode is not None
            if not parts:
                whole[i] = empty_rows(encode, vocab)
            else:
                cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                whole[i] = example_rows(cols, 0, cols["lp"].shape[0], encode)
        if timings is not None:
            timings["forward_s"] = timings.get("forward_s", 0.0) + fwd
            timings["probe_tokens_read"] = timings.get("probe_tokens_read", 0) + int(batch["attention_mask"].sum())
    if timings is not None and t_cont:
        timings["continue_s"] = timings.get("continue_s", 0.0) + t_cont
    return out, probed, whole


def _groups(ordered: list[int], length: dict[int, int], budget: float) -> list[list[int]]:
    """``ordered`` (by length) cut into groups whose padded size (count x longest) stays within ``budget``."""
    groups: list[list[int]] = []
    for i in ordered:
        if groups and (len(groups[-1]) + 1) * length[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _probed_rows(cached: CachedSignal, example_ids: list[int], counts: list[int]) -> Signal:
    """The cached signal of the first ``counts[b]`` rows of each example, example after example."""
    with_rows = [(e, c) for e, c in zip(example_ids, counts) if c]
    if cached.kind == "dense":  # one example at a time: a dense row is the whole vocabulary
        parts = [cast(DenseSignal, cached.rows_signal([e])).chunk_logits(0, c) for e, c in with_rows]
        return DenseSignal(logits=torch.cat(parts) if parts else torch.zeros(0, cached.vocab_size))
    take: list[int] = []
    first = 0
    for e, c in with_rows:
        take += range(first, first + c)
        first += cached.example(e).rows
    return cached.rows_signal([e for e, _ in with_rows]).rows(torch.tensor(take, dtype=torch.long))


def _encode_into(
    encoded: dict[int, list[dict[str, Tensor]]],
    z: Tensor,
    owner: list[int],
    index: list[int],
    spec: CacheSpec,
    vocab: int,
    example_ids: list[int],
) -> None:
    """Encode the rows of ``z`` whose example is in ``encoded`` (row ``index[r]`` of example ``owner[r]``,
    its draws seeded as the writer seeds them) and append each example's part to its list."""
    sel = [r for r, i in enumerate(owner) if i in encoded]
    if not sel:
        return
    seeds = [row_seed(spec.seed, example_ids[owner[r]], index[r]) for r in sel]
    cols = extract(z[sel], spec, vocab, seeds)
    a = 0
    while a < len(sel):
        b = a
        while b < len(sel) and owner[sel[b]] == owner[sel[a]]:
            b += 1
        encoded[owner[sel[a]]].append({k: v[a:b] for k, v in cols.items()})
        a = b


def _continue(teacher, past, batch, hidden: Tensor, chosen: list[int], probes, examples, members, pad_id: int, device):
    """The hidden rows of the targets after the probe of the ``chosen`` examples (of the batch of
    ``members``), read from the probe's key/value cache: the teacher reads their remaining tokens only."""
    from ...data import PadCollator
    from ...models import hidden_and_cache

    at = [members.index(i) for i in chosen]
    ends = [len(probes[i]["input_ids"]) for i in chosen]
    rests = [_rest(examples[i], e) for i, e in zip(chosen, ends)]
    right = PadCollator(pad_id)(rests)
    ids, mask = right["input_ids"], right["attention_mask"]
    position_ids = torch.tensor(ends)[:, None] + torch.arange(ids.shape[1])[None, :]
    rows = torch.tensor(at, device=device)
    if at != list(range(batch["input_ids"].shape[0])):
        past.batch_select_indices(rows)
    more, _ = hidden_and_cache(
        teacher,
        ids.to(device),
        torch.cat([batch["attention_mask"].index_select(0, rows), mask.to(device)], -1),
        position_ids.to(device),
        past,
    )
    width = hidden.shape[1]  # every probe ends in the last column (left padding)
    out = {}
    for r, (b, i, e) in enumerate(zip(at, chosen, ends)):
        seq = torch.cat([hidden[b, width - e :], more[r, : len(rests[r]["input_ids"])]])  # the example's hidden states
        targets = target_index(torch.as_tensor(examples[i]["labels"], dtype=torch.long)[None]).to(device)
        after = targets[targets >= e - 1]  # position e - 1 predicts the first token after the probe
        out[i] = seq.index_select(0, after)
    return out


# ------------------------------------------------------------------------ refresh


def _drift_name(revision: int, j: int) -> str:
    return f"drift-{revision}-{j:05d}.json"


def _state(manifest: dict, fingerprint: str, name: str, rule: RefreshRule) -> dict:
    return {
        "revision": 1 + max([0, *(r["revision"] for r in manifest.get("refreshes") or [])]),
        "teacher": {"name": name, "fingerprint": fingerprint},
        "previous": dict(manifest["teacher"]),
        "rule": asdict(rule),
        "from_manifest": _manifest_key(manifest),
    }


def _manifest_key(manifest: dict) -> str:
    from potstill.fingerprints import sha256_hex

    return sha256_hex(json.dumps(manifest, sort_keys=True).encode())


def _already_done(manifest: dict, fingerprint: str, rule: RefreshRule) -> bool:
    last = (manifest.get("refreshes") or [None])[-1]
    if manifest["teacher"]["fingerprint"] != fingerprint:
        return False
    if all(fp == fingerprint for _, _, fp in row_teachers(manifest)):
        return True  # every row is this teacher's already
    return (
        last is not None
        and last["teacher"]["fingerprint"] == fingerprint
        and {k: last[k] for k in ("threshold", "fraction", "probe_tokens")} == asdict(rule)
    )


def refresh_cache(
    teacher: torch.nn.Module,
    tokenizer,
    examples: list[dict],
    path: str | Path,
    spec: CacheSpec,
    rule: RefreshRule = RefreshRule(),  # noqa: B008 - frozen
    *,
    teacher_name: str = "",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    timings: dict | None = None,
) -> dict | None:
    """Bring the finished cache at ``path`` up to ``teacher``: recompute the examples whose drift
    exceeds the rule, keep the rest. Returns the new manifest (``None`` while other ranks work).

    ``examples`` must be the cached ones. With ``world_size > 1`` this process handles the shards
    ``j % world_size == rank`` and the last one to finish writes the manifest. ``timings``
    receives ``probe_s`` (drift), ``recompute_s`` (new rows and shards), ``forward_s`` (the
    teacher's own work in both), the tokens the teacher read for each (``probe_tokens_read``,
    ``tokens_read``) and ``total_s``.
    """
    from potstill.fingerprints import weights_fingerprint

    from ...data.collate import pad_id
    from ...models.placement import head_on, input_device

    t_start = time.perf_counter()
    path = Path(path)
    rule.check(world_size)
    cached = CachedSignal(path, tokenizer=tokenizer, allow_mixed=True)
    cached.check_spec(spec)
    cached.check_data(examples)
    manifest = cached.manifest
    device = input_device(teacher)
    head = head_on(teacher, device)
    if head.vocab != cached.vocab_size:
        raise PotstillError(
            f"the new teacher's vocabulary ({head.vocab}) is not the cache's ({cached.vocab_size}); "
            "a refresh needs a teacher of the same family: write a new cache instead"
        )
    fingerprint = weights_fingerprint(teacher)
    _finish_leftovers(path, manifest)
    if _already_done(manifest, fingerprint, rule):
        log.info("the cache at %s already holds this teacher's rows under this rule: nothing to refresh", path)
        return manifest
    state = _open_state(path, _state(manifest, fingerprint, teacher_name or "", rule))
    g = state["revision"]
    teacher.eval()
    pad = pad_id(tokenizer, required=True)
    source = _sources_per_example(manifest)
    bounds = [(r["first_example"], r["first_example"] + r["num_examples"]) for r in manifest["shards"]]
    mine = [j for j in range(len(bounds)) if j % world_size == rank]
    spent = {"probe_s": 0.0, "recompute_s": 0.0}
    common: dict[str, Any] = {
        "teacher": teacher,
        "head": head,
        "examples": examples,
        "spec": spec,
        "cached": cached,
        "pad": pad,
        "device": device,
        "timings": timings,
    }
    bar = _bar(progress, len(mine), "")
    for j in mine:
        lo, hi = bounds[j]
        if (path / _drift_name(g, j)).is_file():  # probed before a kill (and, under a threshold, rewritten)
            if rule.fraction is None:
                _recompute(path, j, g, bounds[j], _chosen(path, g, rule, [j]), {}, **common)
        else:
            t0 = time.perf_counter()
            before = dict(timings or {})
            ids = [e for e in range(lo, hi) if source[e] != fingerprint]
            drifts, rows, whole = example_drifts(
                teacher,
                head,
                [examples[e] for e in ids],
                ids,
                cached,
                rule.probe_tokens,
                spec.batch_size,
                spec.chunk_size,
                pad,
                device,
                timings,
                encode=spec,
                continue_over=rule.threshold,
            )
            ready = {ids[i]: r for i, r in whole.items()}
            cont = (timings or {}).get("continue_s", 0.0) - before.get("continue_s", 0.0)
            spent["probe_s"] += time.perf_counter() - t0 - cont
            spent["recompute_s"] += cont
            if rule.threshold is not None:
                # the threshold decides shard by shard: the shard is rewritten from the rows at hand,
                # before its drifts are recorded, so a resumed refresh probes it again rather than
                # recomputing its rows another way
                t0 = time.perf_counter()
                chosen = {e for e, x in zip(ids, drifts) if x > rule.threshold}
                _recompute(path, j, g, bounds[j], chosen, ready, **common)
                spent["recompute_s"] += time.perf_counter() - t0
            atomic_write_json(path / _drift_name(g, j), {"ids": ids, "drift": drifts, "rows": rows})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if rule.fraction is not None:  # the top fraction needs every drift first (new rows are not kept that long)
        chosen = _chosen(path, g, rule, mine)
        t0 = time.perf_counter()
        for j in mine:
            _recompute(path, j, g, bounds[j], chosen, {}, **common)
        spent["recompute_s"] += time.perf_counter() - t0
    if timings is not None:
        timings.update(spent)
    out = _finish(path, manifest, state, bounds)
    if timings is not None:
        timings["total_s"] = time.perf_counter() - t_start
    return out


def _recompute(
    path: Path,
    j: int,
    g: int,
    bound: tuple[int, int],
    chosen: set[int],
    ready: dict[int, EncodedRows],
    *,
    teacher,
    head,
    examples: list[dict],
    spec: CacheSpec,
    cached: CachedSignal,
    pad: int,
    device,
    timings: dict | None,
) -> None:
    """Write shard ``j`` at revision ``g``: the ``chosen`` examples' new rows (from ``ready`` or a
    forward), every other example's stored rows bit for bit. Nothing to do when none is chosen
    or the shard is already written."""
    lo, hi = bound
    redo = sorted(e for e in chosen if lo <= e < hi)
    if not redo or shard_record_ok(path, j, revision=g) is not None:
        return
    run = [e for e in redo if e not in ready]
    vocab = cached.vocab_size
    new = {e: ready[e] for e in redo if e in ready}
    if run:
        new.update(
            zip(run, encode_examples(teacher, head, [examples[e] for e in run], run, spec, vocab, pad, device, timings))
        )
    rows = [new[e] if e in new else cached.stored_rows(e) for e in range(lo, hi)]
    write_shard(
        path, j, assemble_shard(examples[lo:hi], rows, lo, spec, id_bits(vocab)), lo, hi, spec, None, revision=g
    )


def _bar(progress: bool, total: int, desc: str):
    if not progress or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"refresh {desc}", unit="shard")


def _sources_per_example(manifest: dict) -> list[str]:
    out: list[str] = []
    for _, n, fp in row_teachers(manifest):
        out += [fp] * n
    return out


def _open_state(path: Path, state: dict) -> dict:
    """Start the refresh ``state`` or resume it; a different refresh left half-done is dropped
    (its files are not part of any manifest)."""
    p = path / REFRESH
    if p.is_file():
        try:
            old = json.loads(p.read_text())
        except ValueError:
            old = None
        if old == state:
            return state
        log.info("dropping an unfinished refresh of %s (another teacher or rule)", path)
        _remove_unreferenced(path, read_json(path / MANIFEST))
    atomic_write_json(p, state)
    return state


def read_json(p: Path) -> dict:
    return json.loads(p.read_text())


def _chosen(path: Path, g: int, rule: RefreshRule, shards: list[int]) -> set[int]:
    """The example ids to recompute: over the threshold in ``shards``, or the top fraction of
    their probed examples (``fraction`` runs in one process, so ``shards`` are all of them)."""
    if rule.threshold is not None:
        out = set()
        for j in shards:
            d = read_json(path / _drift_name(g, j))
            out |= {e for e, x in zip(d["ids"], d["drift"]) if x > rule.threshold}
        return out
    pairs: list[tuple[float, int]] = []
    for j in shards:
        d = read_json(path / _drift_name(g, j))
        pairs += list(zip(d["drift"], d["ids"]))
    k = math.ceil(float(rule.fraction or 0) * len(pairs))
    return {e for _, e in sorted(pairs, key=lambda t: (-t[0], t[1]))[:k]}


def _finish(path: Path, manifest: dict, state: dict, bounds: list[tuple[int, int]]) -> dict | None:
    """Once every shard is probed and recomputed: the new plan, then the new manifest, then cleanup."""
    g = state["revision"]
    rule = RefreshRule(**state["rule"])
    if any(not (path / _drift_name(g, j)).is_file() for j in range(len(bounds))):
        return None
    chosen = _chosen(path, g, rule, list(range(len(bounds))))
    rebuilt = sorted({j for j, (lo, hi) in enumerate(bounds) if any(lo <= e < hi for e in chosen)})
    if any(shard_record_ok(path, j, check_hash=False, revision=g) is None for j in rebuilt):
        return None
    drifts = [read_json(path / _drift_name(g, j)) for j in range(len(bounds))]
    probed = [x for d in drifts for x in d["drift"]]
    new_fp = state["teacher"]["fingerprint"]
    source = _sources_per_example(manifest)
    for e in chosen:
        source[e] = new_fp
    plan = {k: v for k, v in manifest.items() if k not in _MANIFEST_ONLY}
    plan["teacher"] = state["teacher"]
    plan["revisions"] = {
        **{str(j): revision_of(manifest, j) for j in range(len(bounds)) if revision_of(manifest, j)},
        **{str(j): g for j in rebuilt},
    }
    runs = _runs(source)
    if len(runs) == 1 and runs[0][2] == plan["teacher"]["fingerprint"]:
        plan.pop("sources", None)
    else:
        plan["sources"] = runs
    plan["refreshes"] = [
        *(manifest.get("refreshes") or []),
        {
            "revision": g,
            "teacher": state["teacher"],
            "previous": state["previous"],
            **state["rule"],
            "drift_rows": sum(d["rows"] for d in drifts),
            "examples_probed": len(probed),
            "examples_recomputed": len(chosen),
            "mean_drift": sum(probed) / len(probed) if probed else None,
        },
    ]
    per_example = {str(e): x for d in drifts for e, x in zip(d["ids"], d["drift"])}
    atomic_write_json(path / DRIFT, {"revision": g, "drift": per_example, "recomputed": sorted(chosen)})
    atomic_write_json(path / PLAN, plan)
    new = finalize_cache(path)
    assert new is not None  # every shard of the plan was checked above
    _remove_unreferenced(path, new)
    log.info(
        "refreshed %s: %d of %d probed examples recomputed (%d shards rewritten)",
        path,
        len(chosen),
        len(probed),
        len(rebuilt),
    )
    return new


def _runs(source: list[str]) -> list[list]:
    runs: list[list] = []
    for e, fp in enumerate(source):
        if runs and runs[-1][2] == fp:
            runs[-1][1] += 1
        else:
            runs.append([e, 1, fp])
    return runs


def _finish_leftovers(path: Path, manifest: dict) -> None:
    """A refresh killed after its manifest was written: remove what it left."""
    p = path / REFRESH
    if not p.is_file():
        return
    try:
        state = json.loads(p.read_text())
        done = any(r["revision"] == state["revision"] for r in manifest.get("refreshes") or [])
    except (ValueError, KeyError, TypeError):
        done = True
    if done:
        _remove_unreferenced(path, manifest)


def _remove_unreferenced(path: Path, manifest: dict) -> None:
    """Remove shard files no manifest entry names, the drift files and ``refresh.json``."""
    keep = set()
    for j, rec in enumerate(manifest["shards"]):
        keep |= {rec["file"], record_name(j, revision_of(manifest, j))}
    for f in [*path.glob("shard-*.safetensors"), *path.glob("shard-*.json"), *path.glob("drift-*.json")]:
        if f.name not in keep:
            f.unlink(missing_ok=True)
    (path / REFRESH).unlink(missing_ok=True)
