"""Cached, resumable generation on top of :func:`potstill.generate.generate`, and backends.

Layout of a generation directory::

    meta.json          what this directory holds (run key, params, model id and
                       fingerprints, number of prompts, chunk size); written first
    chunk-00000.json   the generations of prompts [0, C)
    chunk-00001.json   prompts [C, 2C)
    ...

Each chunk file is ``{"key", "chunk", "prompts_sha", "token_ids", "num_tokens",
"seconds"}`` and is written atomically (:mod:`potstill.io`), so a killed run leaves
whole chunks and at most stray ``.*.tmp`` files (removed on the next run). A rerun
with the same model, tokenizer, params, chunk size and prompts skips every valid chunk;
a chunk that is unreadable or carries another key or other prompts is regenerated, never
trusted. Sampling in chunk ``j`` is seeded with ``params.seed + j`` and a chunk's batches
are formed inside the chunk, so a resumed run writes byte-identical chunks to an
uninterrupted one (on the same device and library versions).

The run key covers the weights and tokenizer fingerprints, the params, the chunk size and
the prompts; ``model_id`` and ``batch_size`` are recorded in ``meta.json`` but are not
part of it. One writer per directory: two processes generating into the same directory
at once are not supported.

The backend: ``hf`` (:func:`potstill.generate.generate`, the default) or vLLM
(``pip install 'potstill[vllm]'``, CUDA only): pass ``engine`` (a
:class:`potstill.vllm_engine.VLLMEngine`) to :func:`generate_cached` or :func:`backend_generate`.
Chunk files are the same for both; the run key records a vLLM engine's identity (hf and
vllm outputs differ), and an hf run's key is unchanged from before backends existed.
:func:`generate_vllm` is the one-shot form that takes a model name or path.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import PotstillError
from .generate import Generations
from .io import atomic_write_bytes, atomic_write_json, remove_stale_temporaries

__all__ = [
    "BACKENDS",
    "GenerationParams",
    "backend_generate",
    "generate_cached",
    "generate_vllm",
    "prompts_sha",
    "run_key",
]

FORMAT = "potstill-generations"
VERSION = 1
META = "meta.json"
BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class GenerationParams:
    """How to generate: greedy unless ``do_sample``; ``seed`` seeds the sampling.

    ``temperature`` here is a *sampling* parameter of generation (it only matters when
    ``do_sample``) and is separate from the distillation temperature of :mod:`potstill.kd`
    and of the teacher-signal cache.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise PotstillError(f"generation max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not isinstance(self.do_sample, bool):
            raise PotstillError(f"generation do_sample={self.do_sample!r} must be true or false")
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise PotstillError(
                f"generation temperature={self.temperature!r} must be a finite number > 0 "
                "(for greedy decoding set do_sample: false instead)"
            )
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise PotstillError(
                f"generation top_p={self.top_p!r} must be in (0, 1]; use 1.0 to disable nucleus sampling"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PotstillError(f"generation seed={self.seed!r} must be an integer >= 0")

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`potstill.generate.generate` these params set."""
        return asdict(self)


# ----------------------------------------------------------------------- keys


def prompts_sha(prompts: Iterable[Iterable[int]]) -> str:
    """sha256 (hex) of a list of token-id lists (lengths included, so splits are unambiguous)."""
    h = hashlib.sha256()
    for p in prompts:
        ids = [int(t) for t in p]
        h.update(len(ids).to_bytes(8, "little"))
        for t in ids:
            h.update(t.to_bytes(8, "little", signed=True))
    return h.hexdigest()


def run_key(
    model_fp: str,
    tokenizer_fp: str,
    params: GenerationParams,
    chunk_size: int,
    prompts_digest: str,
    backend: dict | None = None,
) -> str:
    """sha256 (hex) identifying one generation run: what a directory's chunks must match.

    ``backend``: a vLLM engine's ``identity`` (``None``: the hf backend, left out of the key).
    """
    ident = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_fp,
        "tokenizer": tokenizer_fp,
        "params": asdict(params),
        "chunk_size": chunk_size,
        "prompts": prompts_digest,
    }
    if backend is not None:
        ident["backend"] = backend
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _engine():
    """The :mod:`potstill.generate` module, looked up at call time (so it can be patched)."""
    return importlib.import_module(f"{__package__}.generate")


def _chunk_name(j: int) -> str:
    return f"chunk-{j:05d}.json"


def _check_prompts(prompts) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise PotstillError("no prompts to generate from; pass a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        try:
            ids = [int(t) for t in p]
        except (TypeError, ValueError):
            raise PotstillError(f"prompt {i} is not a list of token ids; tokenize the prompts first") from None
        if not ids:
            raise PotstillError(
                f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS or a chat header)"
            )
        out.append(ids)
    return out


def _read_chunk(path: Path, key: str, j: int, sha: str, n: int) -> dict | None:
    """The chunk record at ``path`` if it is whole and belongs to this run, else ``None``."""
    try:
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    if rec.get("key") != key or rec.get("chunk") != j or rec.get("prompts_sha") != sha:
        return None
    ids = rec.get("token_ids")
    if not isinstance(ids, list) or len(ids) != n:
        return None
    if not all(
        isinstance(row, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in row) for row in ids
    ):
        return None
    num, sec = rec.get("num_tokens"), rec.get("seconds")
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        return None
    if not isinstance(sec, (int, float)) or isinstance(sec, bool) or not math.isfinite(sec) or sec < 0:
        return None
    return rec


def _clean_tmp(path: Path) -> None:
    """Remove temporary files a killed atomic write left behind: only those whose writer process is gone, so a
    second generation running in the same directory keeps its own (``potstill.io.remove_stale_temporaries``)."""
    remove_stale_temporaries(path)


# ----------------------------------------------------------------------- cached generation


def _check_args(prompts, path, params, chunk_size, batch_size) -> tuple[list[list[int]], Path]:
    """:func:`generate_cached`'s arguments checked (one-line :class:`PotstillError`); the prompts and the path."""
    if not isinstance(params, GenerationParams):
        raise PotstillError(f"params must be a GenerationParams, not {type(params).__name__}")
    prompts = _check_prompts(prompts)
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PotstillError(f"generation {name}={value!r} must be an integer >= 1")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PotstillError(f"'{path}' is a file, not a generation directory; pass a directory path")
    return prompts, path


def _open_meta(path: Path, meta: dict) -> None:
    """Write ``meta.json``, or refuse a directory whose ``meta.json`` is corrupt or has another run key."""
    meta_path = path / META
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_bytes())
        except (OSError, ValueError):
            raise PotstillError(f"{meta_path} is corrupt (not JSON); delete the directory '{path}' and rerun") from None
        if not isinstance(old, dict) or old.get("key") != meta["key"]:
            raise PotstillError(
                f"the directory '{path}' holds generations of another model/tokenizer/params/prompts "
                f"(run key differs); use another path or delete it"
            )
    else:
        atomic_write_json(meta_path, meta)


def _write_chunk(file: Path, key: str, j: int, sha: str, out: Generations) -> dict:
    """Chunk ``j``'s record of the generations ``out``, written atomically to ``file``; returns it."""
    rec = {
        "key": key,
        "chunk": j,
        "prompts_sha": sha,
        "token_ids": [[int(t) for t in row] for row in out.token_ids],
        "num_tokens": int(out.num_tokens),
        "seconds": float(out.seconds),
    }
    # One row per line: compact but still greppable.
    body = ",\n".join(json.dumps(row, separators=(",", ":")) for row in rec["token_ids"])
    head = {k: v for k, v in rec.items() if k != "token_ids"}
    text = json.dumps(head, allow_nan=False)[:-1] + ', "token_ids": [\n' + body + "\n]}\n"
    atomic_write_bytes(file, text.encode())
    return rec


def generate_cached(
    model,
    tokenizer,
    prompts: list[list[int]],
    path: str | Path,
    params: GenerationParams,
    *,
    model_id: str,
    chunk_size: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    engine=None,
) -> Generations:
    """Generate continuations of ``prompts`` into the directory ``path``, resuming from it.

    ``engine``: a :class:`~potstill.vllm_engine.VLLMEngine` serving ``model`` (``None``: the hf
    backend); ``model`` is still what the run key fingerprints.

    Returns :class:`~potstill.generate.Generations` with ``token_ids`` in the input order;
    ``num_tokens`` and ``seconds`` are summed over the chunk files, so a fully cached call
    reports the timing of the run that generated them. ``on_chunk(j)`` is called after
    chunk ``j`` is on disk (found or written), in order. Raises :class:`PotstillError`
    if ``path`` holds generations of another model, tokenizer, params or prompts.
    """
    from potstill.fingerprints import tokenizer_fingerprint, weights_fingerprint

    prompts, path = _check_args(prompts, path, params, chunk_size, batch_size)

    model_fp = weights_fingerprint(model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    backend = None if engine is None else engine.identity
    key = run_key(model_fp, tok_fp, params, chunk_size, prompts_sha(prompts), backend)
    n_chunks = -(-len(prompts) // chunk_size)

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "params": asdict(params),
        "model_id": model_id,
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tok_fp,
        "num_prompts": len(prompts),
        "chunk_size": chunk_size,
        "num_chunks": n_chunks,
        "batch_size": batch_size,
        "backend": backend or "hf",
    }
    _open_meta(path, meta)
    _clean_tmp(path)

    token_ids: list[list[int]] = []
    num_tokens, seconds = 0, 0.0
    bar = tqdm(total=n_chunks, desc=f"generate {model_id}", unit="chunk", disable=not progress)
    try:
        for j in range(n_chunks):
            chunk = prompts[j * chunk_size : (j + 1) * chunk_size]
            sha = prompts_sha(chunk)
            file = path / _chunk_name(j)
            rec = _read_chunk(file, key, j, sha, len(chunk))
            if rec is None:
                kw = {**params.generate_kwargs(), "seed": params.seed + j}
                if engine is None:
                    out = _engine().generate(model, tokenizer, chunk, batch_size=batch_size, progress=False, **kw)
                else:
                    out = engine.generate(chunk, **kw)
                rec = _write_chunk(file, key, j, sha, out)
            token_ids.extend(rec["token_ids"])
            num_tokens += rec["num_tokens"]
            seconds += rec["seconds"]
            bar.update(1)
            if on_chunk is not None:
                on_chunk(j)
    finally:
        bar.close()
    return Generations(token_ids, num_tokens, seconds)


# ----------------------------------------------------------------------- backends


def generate_vllm(
    model_name_or_path: str,
    prompts: list[list[int]],
    params: GenerationParams,
    *,
    progress: bool = True,
    eos_token_ids: Iterable[int] | None = None,
    **llm_kwargs,
) -> Generations:
    """Generate with a fresh ``vllm.LLM(model=model_name_or_path, **llm_kwargs)`` (CUDA only), one seed for the
    batch; the conventions of ``hf``: token-id prompts (no re-tokenization), greedy is temperature 0, tokens
    from the first EOS on removed (the EOS counted in ``num_tokens``). EOS ids: ``eos_token_ids``, else the
    tokenizer's, plus a stop id vLLM reports. ``seconds`` times ``llm.generate`` only, not the loading.
    """
    from .vllm_engine import MISSING_VLLM, to_generations

    try:
        import vllm
    except ImportError:
        raise PotstillError(MISSING_VLLM) from None
    if not isinstance(params, GenerationParams):
        raise PotstillError(f"params must be a GenerationParams, not {type(params).__name__}")
    if not isinstance(model_name_or_path, (str, Path)):
        raise PotstillError(
            "the vllm backend takes a model name or path, not a loaded model; pass the model id or use backend 'hf'"
        )
    prompts = _check_prompts(prompts)
    llm = vllm.LLM(model=str(model_name_or_path), **llm_kwargs)
    sampling = vllm.SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature if params.do_sample else 0.0,
        top_p=params.top_p if params.do_sample else 1.0,
        seed=params.seed,
    )
    if eos_token_ids is None:
        e = getattr(llm.get_tokenizer() if hasattr(llm, "get_tokenizer") else None, "eos_token_id", None)
        eos_token_ids = [e] if isinstance(e, int) else (e or [])
    t0 = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=sampling, use_tqdm=progress)
    seconds = time.perf_counter() - t0
    if len(results) != len(prompts):
        raise PotstillError(f"vllm returned {len(results)} outputs for {len(prompts)} prompts; check the vllm version")
    outs = [
        (c.token_ids, getattr(c, "finish_reason", None), getattr(c, "stop_reason", None))
        for c in (r.outputs[0] for r in results)
    ]
    return to_generations(outs, {int(t) for t in eos_token_ids}, seconds)


def backend_generate(
    backend: str,
    model,
    tokenizer,
    prompts: list[list[int]],
    params: GenerationParams,
    *,
    batch_size: int = 8,
    progress: bool = True,
    engine=None,
    **backend_kwargs,
) -> Generations:
    """Generate with ``backend``: ``hf`` (:func:`potstill.generate.generate`, a loaded model)
    or ``vllm``: through ``engine`` (a :class:`~potstill.vllm_engine.VLLMEngine`, e.g.
    ``VLLMEngine.from_options(model, tokenizer, recipe.generation.vllm)``) if given, else
    :func:`generate_vllm` with ``model`` a name or path (``tokenizer`` unused).

    ``backend_kwargs`` go to the backend (``generate`` for ``hf``, ``vllm.LLM`` for ``vllm``).
    """
    if backend not in BACKENDS:
        raise PotstillError(f"generation backend '{backend}' is unknown; use one of {', '.join(BACKENDS)}")
    if not isinstance(params, GenerationParams):
        raise PotstillError(f"params must be a GenerationParams, not {type(params).__name__}")
    if backend == "vllm" and engine is not None:
        return engine.generate(_check_prompts(prompts), progress=progress, **params.generate_kwargs())
    if backend == "vllm":
        return generate_vllm(model, prompts, params, progress=progress, **backend_kwargs)
    if isinstance(model, (str, Path)):
        raise PotstillError(
            f"the hf backend takes a loaded model, not '{model}'; load it with potstill.models.load_model"
        )
    return _engine().generate(
        model,
        tokenizer,
        _check_prompts(prompts),
        batch_size=batch_size,
        progress=progress,
        **params.generate_kwargs(),
        **backend_kwargs,
    )
