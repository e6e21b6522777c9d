"""Build a student from a teacher.

* :func:`student_from_teacher` -- layer dropping (DistilBERT, Sanh et al. 2019, Sec. 3
  "initialize the student from the teacher by taking one layer out of two"; Minitron depth
  pruning, Muralidharan et al. 2024): same class and config with fewer decoder layers,
  copying the embeddings, the final norm, the lm_head and the chosen layers' weights.
* :func:`student_scaled` -- a randomly initialized, smaller model of the teacher's
  architecture with the same vocabulary and special token ids, so it keeps the teacher's
  tokenizer (no cross-tokenizer method needed).

Per-layer config lists (Gemma-3's ``layer_types`` sliding/full pattern, SmolLM3's
``no_rope_layers``, ...) are sliced with the layers: every top-level config list whose
name contains "layer" and whose length equals ``num_hidden_layers``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from potstill.errors import PotstillError
from potstill.models.head import unwrap_model

__all__ = ["select_layers", "student_from_teacher", "student_scaled"]

# keys that must never be carried into a freshly built model's config
_DROP_KEYS = ("quantization_config", "_name_or_path", "transformers_version")
# per-layer-looking keys that hold layer *indices*, not one entry per layer
_INDEX_LIST_KEYS = frozenset({"mlp_only_layers"})


def select_layers(num_teacher_layers: int, layers: int | list[int]) -> list[int]:
    """Teacher layer indices to keep.

    ``int n``: ``n`` evenly spaced layers including the first and the last
    (``round(linspace(0, L-1, n))``; ``n == 1`` keeps layer 0). ``list``: used as given;
    must be non-empty, strictly increasing, within ``[0, L)``.
    """
    L = num_teacher_layers
    if isinstance(layers, bool):
        raise PotstillError(f"layers must be an int or a list of ints, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= L:
            raise PotstillError(f"layers={layers} is out of range; the teacher has {L} layers, choose 1..{L}")
        if layers == 1:
            return [0]
        return [round(i * (L - 1) / (layers - 1)) for i in range(layers)]
    idx = list(layers)
    if not idx:
        raise PotstillError("layers is empty; choose at least one teacher layer index")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise PotstillError(f"layers must be integers, got {idx!r}")
    bad = [i for i in idx if not 0 <= i < L]
    if bad:
        raise PotstillError(f"layer indices {bad} are out of range; the teacher has layers 0..{L - 1}")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise PotstillError(f"layers {idx} must be strictly increasing (no repeats); sort them")
    return idx


def _check_text_model(base: nn.Module) -> None:
    cfg = base.config
    get = getattr(cfg, "get_text_config", None)
    if callable(get) and get() is not cfg:
        raise PotstillError(
            f"{type(base).__name__} is a multimodal model; build the student from its text-only "
            "causal LM (e.g. Gemma3ForCausalLM) instead"
        )
    if hasattr(base, "peft_config") or any("lora_" in n for n, _ in base.named_parameters()):
        raise PotstillError("the teacher has peft adapters; merge them first: teacher = teacher.merge_and_unload()")
    if getattr(cfg, "num_hidden_layers", None) is None:
        raise PotstillError(f"{type(base).__name__} has no config.num_hidden_layers; use a decoder-only causal LM")


def _config_dict(cfg) -> dict:
    d = cfg.to_dict()
    for k in _DROP_KEYS:
        d.pop(k, None)
    return d


def _is_per_layer(key: str, value, num_layers: int) -> bool:
    # a list with one entry per layer ("layer_types", "no_rope_layers"); not token-id lists
    # such as eos_token_id=[1, 106] nor index lists such as Qwen-MoE's mlp_only_layers
    return (
        isinstance(value, (list, tuple))
        and len(value) == num_layers
        and "layer" in key.lower()
        and key not in _INDEX_LIST_KEYS
    )


def _slice_per_layer(d: dict, num_layers: int, keep: list[int]) -> None:
    for k, v in list(d.items()):
        if _is_per_layer(k, v, num_layers):
            d[k] = [v[i] for i in keep]


def decoder_layers(base: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of decoder layers."""
    target = None
    get_dec = getattr(base, "get_decoder", None)
    dec = get_dec() if callable(get_dec) else None
    if dec is not None and isinstance(getattr(dec, "layers", None), nn.ModuleList):
        target = dec.layers
    for name, mod in base.named_modules():
        if target is not None and mod is target:
            return name, mod
        if target is None and isinstance(mod, nn.ModuleList) and len(mod) == num_layers:
            return name, mod
    raise PotstillError(f"cannot find the decoder layers of {type(base).__name__}; use a decoder-only causal LM")


def _new_model(base: nn.Module, cfg, dtype: torch.dtype) -> nn.Module:
    model = type(base)._from_config(cfg, dtype=dtype)
    return model


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def student_from_teacher(teacher: nn.Module, layers: int | list[int]) -> nn.Module:
    """A copy of ``teacher`` that keeps only some decoder layers (layer dropping).

    Returns a new model of the teacher's class whose config equals the teacher's except
    ``num_hidden_layers = len(layers)`` (and per-layer lists sliced to match). Embeddings,
    final norm and lm_head are copied (a tied lm_head stays tied); student layer ``j`` is a
    copy of teacher layer ``layers[j]``. With all layers the student computes exactly the
    teacher's logits. Same dtype, device and train/eval mode as the teacher; the teacher
    is not modified. ``teacher`` may be wrapped (DDP ``.module``); peft adapters must be
    merged first.
    """
    base = unwrap_model(teacher)
    _check_text_model(base)
    cfg = base.config
    L = int(cfg.num_hidden_layers)
    keep = select_layers(L, layers)
    prefix, teacher_layers = decoder_layers(base, L)
    if len(teacher_layers) != L:
        raise PotstillError(
            f"config says {L} layers but the model has {len(teacher_layers)}; fix config.num_hidden_layers"
        )

    d = _config_dict(cfg)
    d["num_hidden_layers"] = len(keep)
    _slice_per_layer(d, L, keep)
    new_cfg = type(cfg).from_dict(d)

    dtype = _model_dtype(base)
    student = _new_model(base, new_cfg, dtype)

    src = base.state_dict()
    layer_prefix = prefix + "."
    mapped = {}
    for key in student.state_dict():
        if key.startswith(layer_prefix):
            j, rest = key[len(layer_prefix) :].split(".", 1)
            skey = f"{layer_prefix}{keep[int(j)]}.{rest}"
        else:
            skey = key
        if skey not in src:
            raise PotstillError(f"teacher has no weight {skey} for student weight {key}; report this as a bug")
        mapped[key] = src[skey]
    student.load_state_dict(mapped, strict=True)
    if getattr(base, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(base.generation_config)
    student.to(_model_device(base))
    student.train(base.training)
    return student


def _resolve_sizes(
    cfg,
    hidden_size: int | None,
    intermediate_size: int | None,
    num_attention_heads: int | None,
    num_key_value_heads: int | None,
) -> dict:
    t_hidden = int(cfg.hidden_size)
    t_heads = int(cfg.num_attention_heads)
    t_kv = int(getattr(cfg, "num_key_value_heads", None) or t_heads)
    t_head_dim = getattr(cfg, "head_dim", None) or t_hidden // t_heads
    hidden = int(hidden_size or t_hidden)
    heads = int(num_attention_heads or t_heads)
    if heads < 1 or hidden < 1:
        raise PotstillError(f"hidden_size={hidden} and num_attention_heads={heads} must be positive")
    coupled = t_head_dim * t_heads == t_hidden  # head_dim = hidden / heads (Llama, Qwen, ...)
    out: dict = {"hidden_size": hidden, "num_attention_heads": heads}
    if coupled:
        if hidden % heads:
            raise PotstillError(
                f"hidden_size={hidden} is not divisible by num_attention_heads={heads}; choose sizes so "
                "that head_dim = hidden_size / num_attention_heads is an integer"
            )
        head_dim = hidden // heads
    else:  # decoupled head_dim (Gemma): keep the teacher's
        head_dim = t_head_dim
    if hasattr(cfg, "head_dim"):
        out["head_dim"] = head_dim
    if getattr(cfg, "query_pre_attn_scalar", None) == t_head_dim:
        out["query_pre_attn_scalar"] = head_dim
    if num_key_value_heads is not None:
        kv = int(num_key_value_heads)
    else:
        kv = math.gcd(heads, t_kv)
    if kv < 1 or heads % kv:
        raise PotstillError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; choose a divisor"
        )
    if hasattr(cfg, "num_key_value_heads"):
        out["num_key_value_heads"] = kv
    if intermediate_size is not None:
        out["intermediate_size"] = int(intermediate_size)
    elif hasattr(cfg, "intermediate_size") and hidden != t_hidden:
        # keep the teacher's MLP ratio, rounded to a multiple of 8
        out["intermediate_size"] = max(8, 8 * round(cfg.intermediate_size * hidden / t_hidden / 8))
    return out


def student_scaled(
    teacher_or_config,
    *,
    num_layers: int,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialized smaller model of the teacher's architecture.

    Same class (a config gives ``AutoModelForCausalLM.from_config``), vocabulary size and
    special token ids as the teacher, so it uses the teacher's tokenizer. Unset sizes
    keep the teacher's; ``head_dim`` follows ``hidden_size / num_attention_heads`` when the
    teacher's does (Llama), else stays the teacher's (Gemma); ``intermediate_size``
    defaults to the teacher's MLP ratio; ``num_key_value_heads`` to
    ``gcd(heads, teacher_kv_heads)``. Per-layer lists (``layer_types``) are those of
    ``num_layers`` evenly spaced teacher layers. Initialization is seeded by ``seed``
    without touching the global RNG. Same dtype (and device) as the teacher; a config
    gives its ``dtype`` or float32.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(teacher_or_config, PretrainedConfig):
        base, cfg = None, teacher_or_config
        dtype = getattr(cfg, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, torch.float32)
        device = torch.device("cpu")
    else:
        base = unwrap_model(teacher_or_config)
        _check_text_model(base)
        cfg = base.config
        dtype = _model_dtype(base)
        device = _model_device(base)
    L = int(cfg.num_hidden_layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise PotstillError(f"num_layers={num_layers!r} must be a positive integer")
    d = _config_dict(cfg)
    d["num_hidden_layers"] = num_layers
    if num_layers <= L:
        _slice_per_layer(d, L, select_layers(L, num_layers))
    else:
        # deeper than the teacher: repeat the teacher's per-layer pattern
        for k, v in list(d.items()):
            if _is_per_layer(k, v, L):
                d[k] = [v[i % L] for i in range(num_layers)]
    d.update(_resolve_sizes(cfg, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads))
    new_cfg = type(cfg).from_dict(d)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if base is not None:
            student = _new_model(base, new_cfg, dtype)
        else:
            student = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
    if base is not None and getattr(base, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(base.generation_config)
    return student.to(device)
