"""Where a model's inputs go and where its output head can be read, for models not on the student's device.

A teacher may sit on another device than the student (``teacher.device``) or be spread over several
devices, CPU RAM and disk by accelerate's big-model loading (``teacher.device_map``: transformers'
``from_pretrained(device_map=..., max_memory=..., offload_folder=...)``). Such a model is dispatched:
accelerate's hooks move each module's inputs to its execution device, load offloaded weights for the
time of the forward, and return outputs to the device the inputs came from. Two things still need
care, and live here:

* the device to put a batch on: the execution device of the first module (the embeddings), never
  ``meta`` (an offloaded module's parameters are on ``meta`` outside its forward);
* the output head, which the chunked reducer reads directly rather than through a forward: its weight
  is materialized (from the offload store when it is offloaded) and copied once to the device where the
  loss is computed, so the ``[tokens, vocab]`` teacher logits never exist whole on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..signals.types import Head
from .head import output_head, unwrap_model


def input_device(model: nn.Module) -> torch.device:
    """The device a batch for ``model`` goes to: the embeddings' execution device (accelerate's hook) when
    dispatched, else the device of its first parameter."""
    base = unwrap_model(model)
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def materialized(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` as a real tensor: from accelerate's offload store when the parameter is on ``meta``."""
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return t
    hook = getattr(module, "_hf_hook", None)
    store = getattr(hook, "weights_map", None)
    if store is None:
        raise RuntimeError(f"the {name} of {type(module).__name__} is on the meta device and has no offload store")
    return store[name]


def head_on(model: nn.Module, device: torch.device) -> Head:
    """``output_head(model)`` with its weight (and bias) readable on ``device``: the live parameter when it is
    already there, else a detached copy (frozen models only: a copy takes no gradient)."""
    head = output_head(model)
    base = unwrap_model(model)
    lm_head = base.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if weight.device.type == "meta":
        weight = materialized(lm_head, "weight")
        bias = materialized(lm_head, "bias")
    if weight.device != device:
        weight = weight.detach().to(device, copy=True)
        bias = None if bias is None else bias.detach().to(device, copy=True)
    return Head(
        weight=weight, bias=bias, logit_scale=head.logit_scale, softcap=head.softcap, vocab_size=head.vocab_size
    )
