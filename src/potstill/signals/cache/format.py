"""The teacher-signal cache's on-disk format: what a cache is, its file names and records.

:class:`CacheSpec` (what is stored and how it is computed; the content fingerprints that tie a
cache to its teacher, tokenizer and data are :mod:`potstill.fingerprints`), the shard file names and records, and the
manifest's schema with :func:`read_manifest`, which refuses a cache that is incomplete or
does not match its records. The layout is described in :mod:`potstill.signals.cache`.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ...errors import PotstillError
from ...fingerprints import file_sha256
from ..quant import VALUE_DTYPES, ValueDType
from ..types import TailMode

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


# ------------------------------------------------------------------- files and records


def shard_name(j: int, revision: int = 0) -> str:
    """Shard ``j``'s file; a refresh writes revision ``g`` beside it (``shard-00003.r1.safetensors``)."""
    return f"shard-{j:05d}.safetensors" if revision == 0 else f"shard-{j:05d}.r{revision}.safetensors"


def record_name(j: int, revision: int = 0) -> str:
    return shard_name(j, revision).replace(".safetensors", ".json")


# Plan keys that record a cache's history (appends, refreshes, certificate), not what a recipe asks for:
# a recipe's fresh plan is compared with plan.json without them, and they are carried over.
HISTORY_KEYS = ("segments", "revisions", "sources", "refreshes", "certificate")


def shard_bounds(plan: dict) -> list[tuple[int, int]]:
    """The ``[first, end)`` examples of every shard of a plan.

    Shards of ``examples_per_shard`` examples tile each *segment* of the data: one segment
    for a cache written at once, one more for each append (plan key ``segments``: the
    example counts before each append), so appending never moves an existing shard.
    """
    size = int(plan["spec"]["examples_per_shard"])
    ends = [*plan.get("segments", []), int(plan["data"]["num_examples"])]
    out, lo = [], 0
    for end in ends:
        out += [(a, min(a + size, end)) for a in range(lo, end, size)]
        lo = end
    return out


def revision_of(plan: dict, j: int) -> int:
    return int(plan.get("revisions", {}).get(str(j), 0))


def row_teachers(plan: dict) -> list[tuple[int, int, str]]:
    """``(first_example, num_examples, teacher fingerprint)`` runs covering every example."""
    runs = plan.get("sources")
    if runs is None:
        return [(0, int(plan["data"]["num_examples"]), plan["teacher"]["fingerprint"])]
    return [(int(a), int(n), str(fp)) for a, n, fp in runs]


def shard_record_ok(path: Path, j: int, check_hash: bool = True, revision: int = 0) -> dict | None:
    """The record of shard ``j`` (at ``revision``) if the shard file exists and matches it, else None."""
    rec_path = path / record_name(j, revision)
    shard = path / shard_name(j, revision)
    try:
        rec = json.loads(rec_path.read_text())
        if not shard.is_file() or shard.stat().st_size != rec["bytes"]:
            return None
        if check_hash and file_sha256(shard) != rec["sha256"]:
            return None
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse_a_file(path: Path, fix: str) -> None:
    """A one-line error when ``path`` (or the nearest existing folder above it) is not a directory."""
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists() or p.is_symlink():
            where = "is a file" if p == path else f"lies under '{p}', which is a file"
            raise PotstillError(f"cache.dir '{path}' {where}, not a directory; {fix}")


# --------------------------------------------------------------------------- manifest

# The manifest's structure (read_manifest validates it before anything indexes into it).
_Strict = ConfigDict(extra="forbid", strict=True)


# CacheSpec's fields, every one required, with its declared types.
_spec_fields: dict[str, Any] = {f.name: (typing.get_type_hints(CacheSpec)[f.name], ...) for f in fields(CacheSpec)}
_SpecRecord = create_model("_SpecRecord", __config__=_Strict, **_spec_fields)


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
    revision: int = Field(0, ge=0)


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


class _RefreshRecord(BaseModel):
    model_config = _Strict
    revision: int = Field(ge=1)
    teacher: _TeacherRecord
    previous: _TeacherRecord
    threshold: float | None
    fraction: float | None
    probe_tokens: int | None
    drift_rows: int = Field(ge=0)
    examples_probed: int = Field(ge=0)
    examples_recomputed: int = Field(ge=0)
    mean_drift: float | None


class _Manifest(BaseModel):
    model_config = _Strict
    format: str
    version: int
    spec: _SpecRecord
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
    # history (absent in a cache written at once with one teacher)
    segments: list[int] | None = None
    revisions: dict[str, int] | None = None
    sources: list[list[int | str]] | None = None  # [first_example, num_examples, teacher fingerprint]
    refreshes: list[_RefreshRecord] | None = None
    certificate: dict[str, Any] | None = None  # `potstill cache --certify` (potstill.signals.cache.certify)


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
        # The file name is fixed by the index and revision: a manifest never points outside the cache directory.
        rev = revision_of(m, j)
        bad = rec["index"] != j or rec["file"] != shard_name(j, rev) or rec["first_example"] != start
        if bad or rec.get("revision", 0) != rev:
            return f"has a bad record for shard {j} (field 'shards.{j}': index, file, revision or first_example)"
        start += rec["num_examples"]
    if start != m["data"]["num_examples"]:
        return f"has shards holding {start} examples but its field 'data.num_examples' says {m['data']['num_examples']}"
    shapes = [[type(v) for v in run] for run in m.get("sources") or []]
    if any(t != [int, int, str] for t in shapes):
        return "has a bad field 'sources' (each run is [first_example, num_examples, teacher fingerprint])"
    runs = row_teachers(m)
    covered = 0
    for a, n, _ in runs:
        if a != covered or n < 1:
            return "has a bad field 'sources' (runs must tile the examples in order)"
        covered += n
    if covered != start:
        return f"has a field 'sources' covering {covered} examples, not {start}"
    return None


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete cache, or a one-line error saying what is wrong and how to fix it."""
    path = Path(path)
    refuse_a_file(path, "point cache.dir at the directory `potstill cache` wrote")
    man = path / MANIFEST
    if not man.is_file():
        if (path / PLAN).is_file():
            try:
                plan = json.loads((path / PLAN).read_text())
                n_shards = int(plan["num_shards"])
                revs = [revision_of(plan, j) for j in range(n_shards)]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise PotstillError(
                    f"{path / PLAN} is corrupt; delete the cache directory and rerun `potstill cache`"
                ) from None
            done = sum(shard_record_ok(path, j, False, rev) is not None for j, rev in enumerate(revs))
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
