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

The projections are trained with the student (their own optimizer parameter group) and
are not part of the saved student. The teacher must be a live model of the same
tokenization: a cache holds only the teacher's output distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PotstillError
from ..signals import DenseSignal, OnlineTeacher, target_index, target_rows
from .logit import KDConfig, KDTrainer

FEATURE_LOSSES = ("mse", "cosine")


@dataclass
class FeatureKDConfig(KDConfig):
    """``KDConfig`` plus the hidden-state term."""

    feature_layers: list | None = field(
        default=None, metadata={"help": "Pairs [student_layer, teacher_layer] of hidden-state indices (0: embeddings)."})
    feature_loss: str = field(default="mse", metadata={"help": f"One of {FEATURE_LOSSES}."})
    feature_weight: float = field(default=1.0, metadata={"help": "Weight beta of the hidden-state term."})

    def __post_init__(self):
        super().__post_init__()
        if not self.feature_layers:
            raise PotstillError("feature KD needs feature_layers: a list of [student_layer, teacher_layer] pairs")
        pairs = []
        for p in self.feature_layers:
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)):
                raise PotstillError(f"feature_layers entry {p!r} is not a [student_layer, teacher_layer] pair of ints")
            pairs.append((int(p[0]), int(p[1])))
        self.feature_layers = pairs
        if self.feature_loss not in FEATURE_LOSSES:
            raise PotstillError(f"unknown feature_loss '{self.feature_loss}'; use one of {FEATURE_LOSSES}")
        if not self.feature_weight >= 0:
            raise PotstillError(f"feature_weight={self.feature_weight} must be >= 0")


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
    """Logit KD plus hidden-state distillation between paired layers (see module docstring)."""

    def __init__(self, model, teacher_model=None, args: FeatureKDConfig | None = None, *, signal_source=None,
                 **kwargs):
        if not isinstance(args, FeatureKDConfig):
            raise PotstillError("FeatureKDTrainer needs args=FeatureKDConfig(...)")
        teacher = teacher_model
        if teacher is None and isinstance(signal_source, OnlineTeacher):
            teacher = signal_source.model
        if teacher is None:
            raise PotstillError("feature KD needs a live teacher model (a cache holds no hidden states); "
                                "pass teacher_model=... or drop the cache")
        super().__init__(model, teacher_model=teacher_model, args=args, signal_source=signal_source, **kwargs)
        self._teacher = teacher.to(self.args.device).eval()
        self._teacher.requires_grad_(False)
        self._teacher_head_source = signal_source if isinstance(signal_source, OnlineTeacher) else None
        n_s, n_t = _num_layers(self.model), _num_layers(teacher)
        self.pairs = [(_check_index(s, n_s, "student"), _check_index(t, n_t, "teacher")) for s, t in args.feature_layers]
        ws, wt = _width(self.model), _width(teacher)
        self.projections = nn.ModuleList(
            [nn.Linear(ws, wt, bias=False) if ws != wt else nn.Identity() for _ in self.pairs]
        ).to(self.args.device)
        self._student_states = None
        self._teacher_states = None
        self._stats["feat_sum"] = 0.0

    def create_optimizer(self, *a, **k):
        opt = super().create_optimizer(*a, **k)
        params = list(self.projections.parameters())
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        if params and id(params[0]) not in held:  # the projections are not the model's parameters
            opt.add_param_group({"params": params, "weight_decay": 0.0})
        return opt

    def _student_hidden(self, model, inputs):
        from ..models import all_hidden

        self._student_states = all_hidden(model, inputs["input_ids"], inputs["attention_mask"])
        return self._student_states[-1]

    @torch.no_grad()
    def _teacher_forward(self, inputs):
        from ..models import all_hidden

        if self._teacher.training:
            self._teacher.eval()
        self._teacher_states = all_hidden(self._teacher, inputs["input_ids"], inputs["attention_mask"])

    def _batch_signal(self, inputs):
        if self._teacher_head_source is None:
            return super()._batch_signal(inputs)
        # One teacher forward serves both the logit signal and the hidden states.
        self._teacher_forward(inputs)
        rows = target_rows(self._teacher_states[-1], target_index(inputs["labels"]))
        return DenseSignal(hidden=rows, head=self._teacher_head_source.head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._teacher_states = None
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        args: FeatureKDConfig = self.args
        if args.feature_weight > 0:
            if self._teacher_states is None:  # logit term was CE only or came from elsewhere
                self._teacher_forward(inputs)
            index = target_index(inputs["labels"])
            normalizer = num_items_in_batch if num_items_in_batch is not None else max(int(index.numel()), 1)
            feat = loss.new_zeros(())
            for proj, (ls, lt) in zip(self.projections, self.pairs):
                s = target_rows(self._student_states[ls], index)
                t = target_rows(self._teacher_states[lt], index)
                feat = feat + feature_distance(proj(s), t, args.feature_loss).sum()
            self._stats["feat_sum"] += float(feat.detach())
            scale = args.feature_weight
            if (num_items_in_batch is not None and args.average_tokens_across_devices
                    and self.accelerator.num_processes > 1):
                scale = scale * self.accelerator.num_processes
            loss = loss + scale * feat / normalizer
        self._student_states = self._teacher_states = None
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def log(self, logs, *args, **kwargs):
        n = self._stats["n_tokens"]
        if "loss" in logs and n > 0:
            logs["feat_per_token"] = round(self._stats["feat_sum"] / n, 6)
        super().log(logs, *args, **kwargs)
