"""A model's output head as data, and its final hidden states.

``output_head(model)`` turns the lm_head of any causal LM (plain, peft-wrapped, or
DDP/accelerate-wrapped) into a :class:`~potstill.signals.types.Head`, including the
logit transforms that live *outside* the linear layer: Cohere's ``logit_scale`` and
Gemma-2/3's ``final_logit_softcapping``. A fused/chunked loss that only takes the
linear weight silently drops them (TRL #6629).

``final_hidden(model, ...)`` returns the post-final-norm hidden states ``[B, T, H]``,
so that ``output_head(model)(final_hidden(model, ...)) == model(...).logits``; ``hidden_and_cache``
returns them with the key/value cache, to read a batch's tokens in two parts; ``eval_mode(...)`` runs
models without dropout for a while and gives each its own mode back.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from potstill.errors import PotstillError
from potstill.signals.types import Head

__all__ = ["unwrap_model", "output_head", "final_hidden", "hidden_and_cache", "text_config"]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then each model's own mode again."""
    states = [(m, m.training) for m in models if isinstance(m, nn.Module)]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was in states:
            m.train(was)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/accelerate (``.module``) and peft (``get_base_model()``) wrappers.

    Returns the innermost ``PreTrainedModel`` (e.g. ``LlamaForCausalLM``). peft's LoRA
    layers stay in place inside it, so its forward still includes the adapters.
    """
    seen = 0
    while seen < 16:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is not model:
                model = inner
                continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
            continue
        # torch.compile wraps in OptimizedModule with `_orig_mod`
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
            continue
        break
    return model


def text_config(model: nn.Module):
    """The (text) config of ``model`` after unwrapping (multimodal configs: their text part)."""
    cfg = unwrap_model(model).config
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _optional_float(value) -> float | None:
    if value is None:
        return None
    return float(value)


def output_head(model: nn.Module) -> Head:
    """The model's output head: ``logits = softcap(logit_scale * (h @ W.T + b))``.

    ``weight`` is the live lm_head parameter ``[V_model, H]`` (not a copy: tied
    embeddings and gradients are kept). ``logit_scale`` comes from ``config.logit_scale``
    (Cohere/Cohere2); ``softcap`` from ``config.final_logit_softcapping`` (Gemma-2/3),
    ``None`` when absent or unset.

    Under FSDP2 (``fully_shard``) the weight is whatever the module holds at the time of the call:
    the unsharded parameter while its unit is all-gathered, otherwise this rank's shard as a
    ``DTensor``. Nothing is gathered here; the chunked reducer gathers a sharded head once per call
    (:func:`potstill.divergences.chunked.full_head`), with the gradient flowing back to the shard.
    """
    base = unwrap_model(model)
    get_out = getattr(base, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else None
    if lm_head is None:
        raise PotstillError(
            f"{type(base).__name__} has no output embeddings (lm_head); use a causal LM "
            "(AutoModelForCausalLM), not a bare backbone"
        )
    # peft may wrap the lm_head itself (modules_to_save / LoRA on lm_head)
    weight = getattr(lm_head, "weight", None)
    if weight is None and hasattr(lm_head, "base_layer"):
        weight = lm_head.base_layer.weight
    if weight is None:
        raise PotstillError(
            f"cannot read the lm_head weight of {type(base).__name__}; pass a model whose "
            "get_output_embeddings() is a Linear layer"
        )
    bias = getattr(lm_head, "bias", None)
    cfg = text_config(base)
    scale = _optional_float(getattr(cfg, "logit_scale", None))
    softcap = _optional_float(getattr(cfg, "final_logit_softcapping", None))
    return Head(weight=weight, bias=bias, logit_scale=scale, softcap=softcap)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def final_hidden(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Post-final-norm hidden states ``[B, T, H]`` of a causal LM (see :func:`all_hidden`)."""
    return all_hidden(model, input_ids, attention_mask, **kwargs)[-1]


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes and returns its key/value cache: ``cache`` from
    transformers 5.2x on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if _accepts(unwrap_model(model).forward, "cache") else "past_key_values"


def hidden_and_cache(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    past_key_values=None,
    use_cache: bool = True,
) -> tuple[Tensor, object]:
    """Post-final-norm hidden states ``[B, T, H]`` of a causal LM and its key/value cache after them.

    The batch's positions are given, so it may be left-padded, or continue the cache an earlier
    call returned (``attention_mask`` then covers the cached columns and the new ones, as in
    ``generate``). Left padding keeps every row's cached tokens right before the new ones, so a
    key's distance in the cache is its distance in the text, as sliding-window attention counts it.
    ``use_cache=False`` keeps no cache (returned as ``None``).
    """
    base = unwrap_model(model)
    kwargs: dict = {"logits_to_keep": 1} if _accepts(base.forward, "logits_to_keep") else {}
    name = cache_argument(model)
    if past_key_values is not None:
        kwargs[name] = past_key_values
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        output_hidden_states=True,
        return_dict=True,
        **kwargs,
    )
    hidden = getattr(out, "hidden_states", None)
    cache = getattr(out, name, None)
    if hidden is None or (use_cache and cache is None):
        raise PotstillError(
            f"{type(base).__name__} returned no hidden_states or key/value cache; use a transformers causal LM"
        )
    return hidden[-1], (cache if use_cache else None)


def all_hidden(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, ...]:
    """Hidden states of every layer ``(L + 1) x [B, T, H]`` of a causal LM: index 0 is the
    embedding output, index ``i`` the output of decoder layer ``i``, the last one post-final-norm.

    Calls the *top-level* model (so DDP gradient hooks and peft adapters take part) with
    ``output_hidden_states=True`` and, when its forward accepts it, ``logits_to_keep=1``
    (so the ``[B, T, V]`` logits are never computed), and returns ``hidden_states[-1]``,
    which in transformers is the output of the final norm. Checked against
    ``get_decoder()(...).last_hidden_state`` for Llama, Gemma-2 and Cohere in the tests.
    Extra ``kwargs`` (e.g. ``position_ids``) are passed through. A packed batch
    (:mod:`potstill.data.packing`: ``position_ids`` given) runs without ``attention_mask``, so that
    transformers confines attention to each example from the position restarts.
    """
    base = unwrap_model(model)
    call_kwargs = dict(kwargs)
    if call_kwargs.get("position_ids") is not None:
        attention_mask = None
    call_kwargs.setdefault("use_cache", False)
    if _accepts(base.forward, "logits_to_keep"):
        call_kwargs["logits_to_keep"] = 1
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        return_dict=True,
        **call_kwargs,
    )
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise PotstillError(
            f"{type(base).__name__} returned no hidden_states for output_hidden_states=True; "
            "use a transformers causal LM"
        )
    return tuple(hidden)
