"""Feature (hidden-state) distillation: ``FeatureKDConfig`` + ``FeatureKDTrainer``.

On top of the logit loss of :class:`~potstill.kd.logit.KDTrainer`, the student's hidden
states at chosen layers are pulled towards the teacher's at paired layers (FitNets,
Romero et al. 2015; TinyBERT's hidden-state loss, Jiao et al. 2020, eq. 7):

    L_feat = beta * sum_{(s, t) in pairs} sum_i d(W_s h^S_{s,i}, h^T_{t,i}) / N_global

over the response positions ``i`` (the same rows as the logit loss, so the global
normalization by ``N_global`` keeps gradient accumulation exact), with ``d`` the mean
squared error over the hidden dimension (``mse``) or ``1 - cos`` (``cosine``). ``W_s`` is a
learned linear projection (TinyBERT's ``W_h``) when the widths differ, the identity when
they are equal. Layer index 0 is the embedding output, ``i`` the output of layer ``i``;
negative indices count from the end (-1: the final, post-norm hidden state).

The projections are trained with the student (no weight decay) and are not part of the saved
student: while it trains they are a submodule of it (:data:`PROJECTIONS`), so that every engine
treats them as the student's own weights (DDP averages their gradients, FSDP2 and ZeRO-3 shard
them and their optimizer state), and they are taken out when training ends. The teacher must be a live model of the same
tokenization: a cache holds only the teacher's output distribution.

Optionally (``relation_layers``), MiniLMv2's attention-relation term (Wang et al. 2021,
eq. 1-3; :mod:`potstill.kd.attention_relation`) is added for paired decoder layers:

    L_rel = gamma * sum_{(s, t)} 1/|K| sum_{a in K} sum_i l^a_{s,t,i} / N_global

with ``K`` the relation kinds (q, k, v), ``l_i`` the KL between the teacher's and the
student's causal relation rows of query ``i`` averaged over ``R`` relation heads, over the
same response rows and ``N_global`` as the logit loss. It needs no projection, so it
works across widths and head counts. Either term may be used alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.packing import forward_kwargs
from ..errors import PotstillError
from ..signals import DenseSignal, OnlineTeacher, target_index, target_rows
from .attention_relation import (
    RELATION_KINDS,
    capture_projections,
    decoder_index,
    projection_modules,
    projection_width,
    relation_kl,
)
from .logit import KDConfig, KDTrainer

FEATURE_LOSSES = ("mse", "cosine")
PROJECTIONS = "potstill_feature_projections"
"""The name under which the projections hang on the student while it trains."""


class FeatureProjection(nn.Linear):
    """TinyBERT's ``W_h`` (student width -> teacher width, no bias); a class of its own so that FSDP2 makes
    each one a unit of its own: it is called after the student's forward, where only a unit's own hooks
    gather its weight."""


@dataclass
class FeatureKDConfig(KDConfig):
    """``KDConfig`` plus the hidden-state term and/or the attention-relation term."""

    feature_layers: list | None = field(
        default=None, metadata={"help": "Pairs [student_layer, teacher_layer] of hidden-state indices (0: embeddings)."}
    )
    feature_loss: str = field(default="mse", metadata={"help": f"One of {FEATURE_LOSSES}."})
    feature_weight: float = field(default=1.0, metadata={"help": "Weight beta of the hidden-state term."})
    relation_layers: list | None = field(
        default=None,
        metadata={
            "help": "Pairs [student_layer, teacher_layer] of decoder layers (1-based; -1: last) "
            "for MiniLMv2 attention-relation KD."
        },
    )
    relation_kinds: list = field(
        default_factory=lambda: list(RELATION_KINDS),
        metadata={"help": f"Relations to distill, a subset of {RELATION_KINDS}."},
    )
    relation_heads: int | None = field(
        default=None, metadata={"help": "Relation heads R; must divide the q/k/v widths of both models."}
    )
    relation_weight: float = field(default=1.0, metadata={"help": "Weight gamma of the attention-relation term."})

    def __post_init__(self):
        super().__post_init__()
        if not self.feature_layers and not self.relation_layers:
            raise PotstillError(
                "feature KD needs feature_layers (hidden-state pairs) or relation_layers "
                "(attention-relation pairs), or both: lists of [student_layer, teacher_layer]"
            )
        self.feature_layers = _pairs(self.feature_layers, "feature_layers")
        self.relation_layers = _pairs(self.relation_layers, "relation_layers")
        if self.feature_loss not in FEATURE_LOSSES:
            raise PotstillError(f"unknown feature_loss '{self.feature_loss}'; use one of {FEATURE_LOSSES}")
        if not self.feature_weight >= 0:
            raise PotstillError(f"feature_weight={self.feature_weight} must be >= 0")
        kinds = list(self.relation_kinds or [])
        if not kinds or any(k not in RELATION_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise PotstillError(f"relation_kinds={kinds!r} must be distinct entries of {RELATION_KINDS}")
        self.relation_kinds = kinds
        if self.ddp_find_unused_parameters is None:
            # The projections are the student's parameters used after its forward: DDP's search for unused
            # parameters (the Trainer's default) would mark them ready at the forward's end, before their gradient.
            self.ddp_find_unused_parameters = False
        if not self.relation_weight >= 0:
            raise PotstillError(f"relation_weight={self.relation_weight} must be >= 0")
        if self.relation_layers:
            if any(0 in p for p in self.relation_layers):
                raise PotstillError(
                    f"relation_layers={self.relation_layers} uses layer 0 (the embeddings, no "
                    "attention); decoder layers are 1-based, -1 the last"
                )
            if (
                not isinstance(self.relation_heads, int)
                or isinstance(self.relation_heads, bool)
                or self.relation_heads < 1
            ):
                raise PotstillError(
                    f"relation_layers needs relation_heads (R >= 1), got {self.relation_heads!r}; "
                    "R must divide the q/k/v widths of both models"
                )


def _pairs(value, name: str) -> list[tuple[int, int]]:
    pairs = []
    for p in value or []:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)):
            raise PotstillError(f"{name} entry {p!r} is not a [student_layer, teacher_layer] pair of ints")
        pairs.append((int(p[0]), int(p[1])))
    return pairs


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row distance ``[n]`` between ``student [n, H]`` (already projected) and ``teacher [n, H]``."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise PotstillError(f"unknown feature_loss '{kind}'; use one of {FEATURE_LOSSES}")


def _num_layers(model) -> int:
    from ..models.head import text_config

    return int(text_config(model).num_hidden_layers)


def _width(model) -> int:
    from ..models.head import text_config

    return int(text_config(model).hidden_size)


def _check_index(i: int, n_layers: int, who: str) -> int:
    n = n_layers + 1  # hidden_states: embeddings + one per layer
    if not -n <= i < n:
        raise PotstillError(f"{who} layer {i} is out of range for {n_layers} layers; use 0..{n_layers} or negatives")
    return i % n


class FeatureKDTrainer(KDTrainer):
    """Logit KD plus hidden-state and/or attention-relation distillation between paired layers (module docstring)."""

    def __init__(self, model, teacher_model=None, args: FeatureKDConfig | None = None, *, signal_source=None, **kwargs):
        if not isinstance(args, FeatureKDConfig):
            raise PotstillError("FeatureKDTrainer needs args=FeatureKDConfig(...)")
        teacher = teacher_model
        if teacher is None and isinstance(signal_source, OnlineTeacher):
            teacher = signal_source.model
        if teacher is None:
            raise PotstillError(
                "feature KD needs a live teacher model (a cache holds no hidden states); "
                "pass teacher_model=... or drop the cache"
            )
        super().__init__(model, teacher_model=teacher_model, args=args, signal_source=signal_source, **kwargs)
        self._teacher = teacher.to(self.args.device).eval()
        self._teacher.requires_grad_(False)
        self._teacher_head_source = signal_source if isinstance(signal_source, OnlineTeacher) else None
        n_s, n_t = _num_layers(self.model), _num_layers(teacher)
        self.pairs = [
            (_check_index(s, n_s, "student"), _check_index(t, n_t, "teacher")) for s, t in args.feature_layers
        ]
        ws, wt = _width(self.model), _width(teacher)
        self.projections = nn.ModuleList(
            [FeatureProjection(ws, wt, bias=False) if ws != wt else nn.Identity() for _ in self.pairs]
        ).to(self.args.device)
        learned = args.feature_weight > 0 and any(isinstance(m, FeatureProjection) for m in self.projections)
        if learned:  # until training ends (module docstring); unused ones stay off (DDP wants every gradient)
            self.model.add_module(PROJECTIONS, self.projections)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and learned:
            names = list(plugin.transformer_cls_names_to_wrap or [])
            plugin.transformer_cls_names_to_wrap = [*names, FeatureProjection.__name__]
        self.relation_pairs = [
            (decoder_index(s, n_s, "student"), decoder_index(t, n_t, "teacher")) for s, t in args.relation_layers
        ]
        self._check_relation_widths()
        self._student_states = None
        self._teacher_states = None
        self._student_proj = None
        self._teacher_proj = None
        self._stats["feat_sum"] = 0.0
        self._stats["rel_sum"] = 0.0

    def _relation_layers(self) -> tuple[list[int], list[int]]:
        return sorted({s for s, _ in self.relation_pairs}), sorted({t for _, t in self.relation_pairs})

    def _check_relation_widths(self) -> None:
        """Fail at construction (not at step 1) on missing projections or an R that does not divide a width."""
        if not self.relation_pairs:
            return
        kinds, r = self.args.relation_kinds, self.args.relation_heads
        ls, lt = self._relation_layers()
        mods_s = projection_modules(self.model, ls, kinds)
        mods_t = projection_modules(self._teacher, lt, kinds)
        for s, t in self.relation_pairs:
            for kind in kinds:
                widths = projection_width(mods_s[(s, kind)]), projection_width(mods_t[(t, kind)])
                if None not in widths and (widths[0] % r or widths[1] % r):
                    raise PotstillError(
                        f"relation_heads={r} does not divide the {kind}_proj widths (student layer {s + 1}: "
                        f"{widths[0]}, teacher layer {t + 1}: {widths[1]}); choose a common divisor"
                    )

    def _capture(self, model, teacher: bool):
        if not self.relation_pairs:
            return contextlib.nullcontext({})
        ls, lt = self._relation_layers()
        return capture_projections(model, lt if teacher else ls, self.args.relation_kinds)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [n for n in super().get_decay_parameter_names(model) if PROJECTIONS not in n]

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # the student leaves without them (under FSDP2 / ZeRO-3, before its weights are gathered)
            base = self.accelerator.unwrap_model(self.model)
            for holder in (base, self.model):
                if PROJECTIONS in holder._modules:
                    del holder._modules[PROJECTIONS]

    def _student_hidden(self, model, inputs):
        from ..models import all_hidden

        # The hooks live only for this forward: under activation checkpointing the backward's recompute of a
        # layer captures nothing, so the loss uses the real forward's tensors and is computed once. Checkpointing
        # must be non-reentrant (kd_config sets it): a reentrant one runs the layer without a graph and the
        # relation term's gradients into q/k/v would be silently lost.
        with self._capture(model, teacher=False) as proj:
            self._student_states = all_hidden(
                model, inputs["input_ids"], inputs["attention_mask"], **forward_kwargs(inputs)
            )
        self._student_proj = proj
        return self._student_states[-1]

    @torch.no_grad()
    def _teacher_forward(self, inputs):
        from ..models import all_hidden

        if self._teacher.training:
            self._teacher.eval()
        with self._capture(self._teacher, teacher=True) as proj:
            self._teacher_states = all_hidden(
                self._teacher, inputs["input_ids"], inputs["attention_mask"], **forward_kwargs(inputs)
            )
        self._teacher_proj = proj

    def _batch_signal(self, inputs, student=None):
        if self._teacher_head_source is None:
            return super()._batch_signal(inputs, student=student)
        # One teacher forward serves both the logit signal and the hidden states.
        self._teacher_forward(inputs)
        rows = target_rows(self._teacher_states[-1], target_index(inputs["labels"]))
        return DenseSignal(hidden=rows, head=self._teacher_head_source.head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._teacher_states = None
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        args: FeatureKDConfig = self.args
        use_feat = bool(self.pairs) and args.feature_weight > 0
        use_rel = bool(self.relation_pairs) and args.relation_weight > 0
        if use_feat or use_rel:
            if self._teacher_states is None:  # logit term was CE only or came from elsewhere
                self._teacher_forward(inputs)
            index = target_index(inputs["labels"])
            normalizer = num_items_in_batch if num_items_in_batch is not None else max(int(index.numel()), 1)
            scale = 1.0
            if (
                num_items_in_batch is not None
                and args.average_tokens_across_devices
                and self.accelerator.num_processes > 1
            ):
                scale = self.accelerator.num_processes
            if use_feat:
                feat = loss.new_zeros(())
                for proj, (ls, lt) in zip(self.projections, self.pairs):
                    s = target_rows(self._student_states[ls], index)
                    t = target_rows(self._teacher_states[lt], index)
                    feat = feat + feature_distance(proj(s), t, args.feature_loss).sum()
                self._stats["feat_sum"] += float(feat.detach())
                loss = loss + scale * args.feature_weight * feat / normalizer
            if use_rel:
                rel = loss.new_zeros(())
                mask = inputs.get("attention_mask")
                for ls, lt in self.relation_pairs:
                    for kind in args.relation_kinds:
                        per_row = relation_kl(
                            self._student_proj[(ls, kind)], self._teacher_proj[(lt, kind)], mask, args.relation_heads
                        )  # [B, T]
                        rel = rel + target_rows(per_row.unsqueeze(-1), index).sum() / len(args.relation_kinds)
                self._stats["rel_sum"] += float(rel.detach())
                loss = loss + scale * args.relation_weight * rel / normalizer
        self._student_states = self._teacher_states = None
        self._student_proj = self._teacher_proj = None
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def log(self, logs, *args, **kwargs):
        n = self._stats["n_tokens"]
        if "loss" in logs and n > 0:
            if self.pairs:
                logs["feat_per_token"] = round(self._stats["feat_sum"] / n, 6)
            if self.relation_pairs:
                logs["relation_per_token"] = round(self._stats["rel_sum"] / n, 6)
        super().log(logs, *args, **kwargs)
