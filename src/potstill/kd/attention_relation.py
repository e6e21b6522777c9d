"""Multi-head self-attention relation distillation (MiniLMv2, Wang et al. 2021).

For one paired (student layer, teacher layer) and one relation kind ``a`` in {q, k, v},
take the layer's attention input projection ``A = a_proj(x)`` (heads concatenated, width
``W``), split it into ``R`` relation heads of width ``d_r = W / R`` and form, per relation
head ``r`` (MiniLMv2 eq. 1-2)

    rel_r = softmax(A_r A_r^T / sqrt(d_r))          [T, T], over key positions

and the loss of query row ``i`` (eq. 3)

    l_i = 1/R sum_r KL(rel^T_{r,i} || rel^S_{r,i}).

Because only ``R`` has to be shared (it must divide the widths of both models), teacher
and student may differ in width and in attention/kv head counts; each side scales by its
own ``sqrt(d_r)``. With grouped-query attention ``k`` and ``v`` have the width
``num_key_value_heads * head_dim``, not the hidden size; ``R`` must divide those too.

Adaptation to causal LMs: the original relates every position to every other
(bidirectional encoders). A decoder's position ``i`` only ever sees positions ``j <= i``,
so the softmax runs over the keys ``j <= i`` that are not padding (the causal + padding
mask of the model's own attention). Row ``i`` is therefore unchanged by anything after
``i``, and right-padding a batch changes no row. The trainer sums ``l_i`` over the
response rows of the logit loss and divides by the global token count (see
:mod:`potstill.kd.feature`).

:func:`capture_projections` reads the projections with forward hooks on the decoder
layers' ``self_attn.{q,k,v}_proj`` (Llama-style models); the hooks exist only inside the
``with`` block, so the models carry no hooks outside a forward of the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import PotstillError

RELATION_KINDS = ("q", "k", "v")


def relation_kl(student_x: Tensor, teacher_x: Tensor, mask: Tensor | None, heads: int) -> Tensor:
    """Per-row MiniLMv2 relation loss ``[B, T]`` (eq. 3, causal; see module docstring).

    ``student_x [B, T, W_s]`` and ``teacher_x [B, T, W_t]`` are one projection (q, k or v)
    of each model with heads concatenated; ``mask [B, T]`` is 1 for real tokens (None: no
    padding); ``heads`` is ``R``. Entry ``[b, i]`` is the mean over relation heads of
    ``KL(teacher relation row || student relation row)`` of query ``i``, 0 for padded
    queries. Computed in float32; memory ``O(B R T^2)``.
    """
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise PotstillError(
            f"relation inputs must be [B, T, W] with the same B, T; got student "
            f"{tuple(student_x.shape)} and teacher {tuple(teacher_x.shape)}"
        )
    B, T, ws = student_x.shape
    wt = teacher_x.shape[-1]
    if heads < 1 or ws % heads or wt % heads:
        raise PotstillError(
            f"relation heads R={heads} must divide the student width {ws} and the teacher width "
            f"{wt}; choose a common divisor"
        )
    keys = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool, device=student_x.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=student_x.device).tril()
    # Every query keeps itself, so no row is empty (a padded query's row is zeroed below).
    allowed = (causal & keys[:, None, :]) | torch.eye(T, dtype=torch.bool, device=student_x.device)
    allowed = allowed[:, None]  # [B, 1, T, T]

    def log_relation(x: Tensor) -> Tensor:
        d = x.shape[-1] // heads
        xr = x.float().reshape(B, T, heads, d).transpose(1, 2)  # [B, R, T, d]
        scores = xr @ xr.transpose(-1, -2) / math.sqrt(d)
        return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).log_softmax(-1)

    log_s, log_t = log_relation(student_x), log_relation(teacher_x)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~allowed, 0.0).sum(-1)  # [B, R, T]
    return kl.mean(1) * keys


def _decoder_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from ..models.head import text_config, unwrap_model
    from ..models.student import decoder_layers

    return decoder_layers(unwrap_model(model), int(text_config(model).num_hidden_layers))


def decoder_index(i: int, n_layers: int, who: str) -> int:
    """1-based decoder layer ``i`` (negative: from the end, -1 the last) -> 0-based index."""
    if not (1 <= i <= n_layers or -n_layers <= i <= -1):
        raise PotstillError(
            f"{who} relation layer {i} is out of range for {n_layers} decoder layers; use "
            f"1..{n_layers} or negatives (layer 0, the embeddings, has no attention)"
        )
    return i - 1 if i > 0 else n_layers + i


def projection_modules(
    model: nn.Module, layers: Sequence[int], kinds: Sequence[str]
) -> dict[tuple[int, str], nn.Module]:
    """``{(layer, kind): self_attn.<kind>_proj}`` for 0-based decoder ``layers``; one-line error if one is missing."""
    name, blocks = _decoder_layer_list(model)
    found = {}
    for layer in layers:
        attn = getattr(blocks[layer], "self_attn", None)
        where = f"{name}.{layer}.self_attn" if attn is not None else f"{name}.{layer}"
        for kind in kinds:
            mod = getattr(attn, f"{kind}_proj", None) if attn is not None else None
            if not isinstance(mod, nn.Module):
                raise PotstillError(
                    f"{type(blocks[layer]).__name__} {where} of {type(model).__name__} has no "
                    f"{'self_attn' if attn is None else kind + '_proj'}; attention-relation KD needs Llama-style "
                    "self_attn.q_proj/k_proj/v_proj projections (drop relation_layers for this model)"
                )
            found[(layer, kind)] = mod
    return found


def projection_width(module: nn.Module) -> int | None:
    """Output width of a projection (``out_features`` of a Linear or a peft wrapper), None if unknown."""
    width = getattr(module, "out_features", None)
    if width is None and hasattr(module, "base_layer"):
        width = getattr(module.base_layer, "out_features", None)
    return int(width) if isinstance(width, int) else None


@contextmanager
def capture_projections(
    model: nn.Module, layers: Sequence[int], kinds: Sequence[str]
) -> Iterator[dict[tuple[int, str], Tensor]]:
    """``with capture_projections(model, layers, kinds) as out: model(...)`` fills
    ``out[(layer, kind)] = <kind>_proj output [B, T, W]`` (0-based decoder ``layers``).

    The tensors keep their autograd graph (the student's loss backpropagates through
    them). The hooks are removed on exit; ``out`` stays readable.
    """
    out: dict[tuple[int, str], Tensor] = {}
    handles = []

    def hook(key):
        def store(_module, _inputs, output):
            out[key] = output

        return store

    try:
        for key, mod in projection_modules(model, layers, kinds).items():
            handles.append(mod.register_forward_hook(hook(key)))
        yield out
    finally:
        for h in handles:
            h.remove()
