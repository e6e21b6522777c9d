"""Finished students on disk: written atomically with checksums, verified before reuse.

A run's student lives in ``<output_dir>/runs/<name>``. It is written into ``<name>.partial``
and renamed into place only when complete, so the final directory is either absent or whole.
Its ``POTSTILL_DONE`` marker (JSON) records the sha256 of every file and the part of the
recipe that decided the student (teacher, student, data, train, cache signal and the run).

A rerun reuses a finished student only if every recorded hash matches and it was trained by
the same recipe; anything else is named in one line (``PotstillError``), never retrained or
reused silently:

* a directory without the marker (half-written by something else, or a user's folder);
* a marker from a potstill that kept no checksums;
* a file that is missing or whose bytes changed (corrupt, truncated, edited);
* a student from another recipe (the first recipe key that differs is named).

Mid-run checkpoints would be the "previous valid one" to fall back to; until they exist, a
finished student that does not verify stops the run (exit 2) with the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PotstillError
from .fingerprints import file_sha256
from .io import atomic_write_json, atomic_write_text

DONE = "POTSTILL_DONE"
CHECKPOINTS = "checkpoints"  # <output_dir>/checkpoints/<run>/checkpoint-<step>: a run's Trainer checkpoints
MARK = "potstill_run.json"  # written into a checkpoint last: the run fingerprint it belongs to
FORMAT = 1
PARTIAL = ".partial"


# ------------------------------------------------------------------------ output dir


def check_output_dir(out: Path, key: str = "output_dir") -> None:
    """Refuse an output directory that cannot be written, before anything is loaded or written.

    A regular file, a dangling symlink, or a directory (or nearest existing parent) where a file
    cannot be created gives one line naming the path and the fix."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise PotstillError(
            f"{key} '{out}' is a symbolic link to nothing ({os.readlink(out)}); remove the link "
            f"or point {key} elsewhere"
        )
    if out.exists() and not out.is_dir():
        raise PotstillError(f"{key} '{out}' is a file, not a directory; set {key} to a directory path")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PotstillError(f"{key} '{out}' lies under the file '{probe}'; set {key} to a directory path")
    try:
        fd, name = tempfile.mkstemp(prefix=".potstill-probe-", dir=probe)
    except OSError as err:
        raise PotstillError(
            f"{key} '{out}' cannot be written ('{probe}': {err.strerror}); choose a writable "
            "directory or fix its permissions"
        ) from None
    os.close(fd)
    os.unlink(name)


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be ours to replace: not a symlink, and not a folder potstill did not finish."""
    for p in (run_dir.parent, run_dir, run_dir.with_name(run_dir.name + PARTIAL)):
        if p.is_symlink():
            raise PotstillError(
                f"'{p}' is a symbolic link; potstill writes its runs itself, so remove the link "
                "or choose another output_dir"
            )
    if run_dir.exists() and not (run_dir / DONE).is_file():
        raise PotstillError(
            f"'{run_dir}' exists but is not a finished potstill student (no {DONE}); move it away "
            "or delete it to train this run"
        )


@contextlib.contextmanager
def owned_output_dir(out: Path) -> Iterator[Path]:
    """Create ``out`` if needed; if this call created it and fails before any student finished, remove it.

    So bad input found late (a NaN at step 3, a layer index the trainer checks) leaves nothing behind,
    while a directory the user had, or one holding a finished student, is never deleted."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        runs = out / "runs"
        finished = runs.is_dir() and any((d / DONE).is_file() for d in runs.iterdir() if not d.is_symlink())
        saved = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).glob("*/checkpoint-*"))
        if created and not finished and not saved and out.is_dir() and not out.is_symlink():
            shutil.rmtree(out, ignore_errors=True)
        raise


def trainer_scratch(run_dir: Path) -> Path:
    """The Trainer's own output_dir for one run (it writes nothing there with saving off): a fixed name inside
    ``runs/``, so a killed run leaves no temporary directory elsewhere, and the next run reuses the name."""
    return run_dir.with_name(f".{run_dir.name}.trainer")


def remove_scratch(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------- finished


def run_fingerprint(recipe, run) -> dict[str, Any]:
    """The recipe keys that decide run ``run``'s student (JSON-ready): not eval, device, output_dir or other runs."""
    data = recipe.model_dump(mode="json")
    keep = {k: data[k] for k in ("teacher", "extra_teachers", "student", "data", "train")}
    # The engine (ddp / fsdp2) does not change the student; the number of processes does (the global batch).
    keep["train"] = {
        k: v
        for k, v in keep["train"].items()
        if k
        not in (
            "gradient_checkpointing",
            "logging_steps",
            "distributed",
            "deepspeed_config",
            "report_to",
            "eval_steps",
            "save_steps",
            "save_total_limit",
        )
    }
    if keep["train"].get("loss_backend") == "potstill":  # the default: fingerprints from before the key stay valid
        del keep["train"]["loss_backend"]
    for entry in [keep["teacher"], keep["student"], *keep["extra_teachers"]]:  # loading options left unset: likewise
        for k in ("attn_implementation", "quantization"):
            if entry.get(k, 0) is None:
                del entry[k]
        for k in ("device", "device_map", "max_memory", "offload_folder"):  # where a teacher runs, not what it says
            entry.pop(k, None)
    if not keep["data"].get("packing", True):  # off, the default: fingerprints from before the key stay valid
        del keep["data"]["packing"]
    gen = data.get("generation") or {}
    if gen.get("backend", "hf") != "hf":  # who samples the on-policy steps
        keep["generation"] = {"backend": gen["backend"], "mode": gen["vllm"]["mode"]}
    from .distributed import world_size

    if world_size() > 1:
        keep["processes"] = world_size()
    if data.get("cache") is not None:
        keep["cache"] = {k: v for k, v in data["cache"].items() if k not in ("dir", "verify", "batch_size")}
    keep["run"] = run.flat_dump()  # the shape before `method:`: runs finished before it still verify
    return keep


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{prefix}.{i}")
            if d is not None:
                return d
        return None
    return None if a == b else (prefix or "<recipe>")


def save_student(model, tokenizer, out_dir: Path, info: dict, fingerprint: dict | None = None) -> None:
    """Write a finished student atomically, with a checksummed ``POTSTILL_DONE`` marker.

    ``info`` is serialized first (strict JSON), so a NaN in it fails before anything is written; a
    failure midway removes the ``.partial`` directory this call made."""
    out_dir = Path(out_dir)
    info_text = json.dumps(info, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    check_run_dir(out_dir)
    tmp = out_dir.with_name(out_dir.name + PARTIAL)
    if tmp.exists():  # left by a killed run: ours by name, and check_run_dir refused a symlink
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "train_info.json", info_text)
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and not f.name.startswith(".")}
        atomic_write_json(tmp / DONE, {"format": FORMAT, "files": files, "recipe": fingerprint})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():  # a finished student being replaced (its marker was checked above)
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def verify_finished(out_dir: Path, fingerprint: dict | None = None) -> bool:
    """``True`` if ``out_dir`` holds a finished student that verifies, ``False`` if there is none.

    Raises a one-line ``PotstillError`` for anything else (see the module docstring)."""
    out_dir = Path(out_dir)
    check_run_dir(out_dir)
    if not out_dir.exists():
        return False
    fix = f"delete '{out_dir}' to train it again"
    try:
        marker = json.loads((out_dir / DONE).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise PotstillError(
            f"the finished student '{out_dir}' has no checksums (written by an older potstill or "
            f"edited), so it cannot be verified; {fix}"
        )
    for name, digest in marker["files"].items():
        f = out_dir / name
        if not f.is_file():
            raise PotstillError(f"the finished student '{out_dir}' is missing its file '{name}'; {fix}")
        if file_sha256(f) != digest:
            raise PotstillError(
                f"the finished student '{out_dir}' does not verify: '{name}' changed since it was "
                f"written (corrupt or edited); {fix}"
            )
    if fingerprint is not None:
        diff = _first_difference(marker.get("recipe"), fingerprint)
        if diff is not None:
            raise PotstillError(
                f"the finished student '{out_dir}' was trained by another recipe ({diff} differs); "
                f"{fix}, or use another output_dir"
            )
    return True


def load_finished(out_dir: Path, device, fingerprint: dict | None = None, *, verified: bool = False):
    """``(model, loss curve)`` of a verified finished student, ``None`` if there is none (see ``verify_finished``).

    ``verified``: the caller ran ``verify_finished`` on it already (``distill``'s preflight), so the files are
    not hashed a second time."""
    exists = (Path(out_dir) / DONE).is_file() if verified else verify_finished(out_dir, fingerprint)
    if not exists:
        return None
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(out_dir).to(device)
    except (OSError, ValueError, SafetensorError) as err:
        raise PotstillError(
            f"the finished student '{out_dir}' does not load ({str(err).splitlines()[0][:200]}); "
            f"delete it to train it again"
        ) from None
    info = json.loads((Path(out_dir) / "train_info.json").read_text(encoding="utf-8"))
    return model, [tuple(x) for x in info.get("loss_curve", [])]
