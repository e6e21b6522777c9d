"""Self-distillation: the teacher is the student's own earlier self, with no second set of weights from disk.

* ``frozen``: a copy of the student taken when training starts (born-again networks, Furlanello et al. 2018,
  "Born Again Neural Networks", ICML; there the student is a fresh network trained against the converged one,
  here the copy is the initial student and the student keeps training from it, so the KD term anchors it to
  where it started).
* ``ema``: an exponential moving average of the student, updated after every optimizer step (mean teacher,
  Tarvainen & Valpola 2017, "Mean teachers are better role models", eq. 1):
  ``theta_T,t = decay * theta_T,t-1 + (1 - decay) * theta_S,t``, so after ``n`` steps from ``theta_T,0 =
  theta_S,0``: ``theta_T,n = decay^n theta_S,0 + (1 - decay) * sum_{k=1..n} decay^(n-k) theta_S,k``.

Either teacher is a plain module behind :class:`potstill.signals.OnlineTeacher`, so every trainer reads it as
any live teacher (``source.signal(batch)``) and never branches on where it came from.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import TrainerCallback

from ..distributed import is_sharded
from ..errors import PotstillError
from ..signals import OnlineTeacher

_SHARDED = (
    "self-distillation copies and averages whole parameters, but the student is sharded (FSDP2 DTensors or "
    "ZeRO-3 partitions); train it with train.distributed ddp or none"
)


def frozen_copy(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student``: same device, dtype and weights, eval mode, ``requires_grad`` False, no grads.

    Refused (one line) for a sharded student: under FSDP2 / ZeRO-3 each process holds only its shard, and a
    copy of it is no model; take the copy before sharding (the runner does, and refuses those engines).
    """
    if is_sharded(student):
        raise PotstillError(_SHARDED)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.grad = None  # a copy of a student mid-step would otherwise carry its gradients along
    teacher.requires_grad_(False)
    return teacher.eval()


def _check_decay(decay: float) -> float:
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise PotstillError(f"EMA decay {decay} is outside [0, 1); use e.g. 0.999 (1 would never follow the student)")
    return decay


@torch.no_grad()
def ema_update_(
    teacher: nn.Module, student: nn.Module, decay: float, shadow: dict[str, torch.Tensor] | None = None
) -> None:
    """One mean-teacher step in place: ``theta_T <- decay * theta_T + (1 - decay) * theta_S`` for every parameter
    (Tarvainen & Valpola 2017, eq. 1), matched by name (tied weights count once, as ``named_parameters`` yields).

    Parameters of any shape ``[...]``; ``decay`` in [0, 1). A 16-bit teacher parameter is accumulated in float32:
    at decay 0.999 the update is 1e-3 of the weight, below bfloat16's resolution (2^-8), so a bfloat16 average
    would never move. ``shadow`` (name -> float32 tensor, filled on first use) keeps that float32 average across
    calls; the teacher's parameter is its rounding. Buffers are left alone (a causal LM trains none).
    """
    decay = _check_decay(decay)
    weights = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = weights.get(name)
        if s is None or s.shape != t.shape:
            raise PotstillError(
                f"EMA teacher parameter {name} {tuple(t.shape)} has no match in the student "
                f"({None if s is None else tuple(s.shape)}); the teacher must be a copy of this student"
            )
        if t.dtype in (torch.float32, torch.float64):
            t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1.0 - decay)
            continue
        acc = t.float() if shadow is None else shadow.setdefault(name, t.detach().float())
        acc.mul_(decay).add_(s.detach().float(), alpha=1.0 - decay)
        t.copy_(acc)


class EMATeacherCallback(TrainerCallback):
    """Calls :func:`ema_update_` after every optimizer step (``on_step_end`` follows the optimizer step and the
    zeroing of gradients, once per ``gradient_accumulation_steps`` micro-batches). ``updates`` counts them."""

    def __init__(self, teacher: nn.Module, student: nn.Module, decay: float):
        self.teacher, self.student, self.decay = teacher, student, _check_decay(decay)
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if is_sharded(self.student):  # wrapped by the Trainer after this callback was made
            raise PotstillError(_SHARDED)

    def on_step_end(self, args, state, control, **kwargs):
        ema_update_(self.teacher, self.student, self.decay, self.shadow)
        self.updates += 1


def self_teacher(
    student: nn.Module, mode: str, decay: float | None = None, memo=None
) -> tuple[OnlineTeacher, EMATeacherCallback | None]:
    """The signal source of a self teacher built from ``student`` (before any adapter or wrapper is added) and,
    for ``mode`` ema, the callback that moves it; ``memo`` (a :class:`potstill.signals.TeacherMemo`) serves only
    the frozen teacher, whose answer to a batch never changes (every run of a recipe copies the same student)."""
    if mode not in ("frozen", "ema"):
        raise PotstillError(f"self teacher mode '{mode}' is unknown; use frozen or ema")
    teacher = frozen_copy(student)
    if mode == "frozen":
        return OnlineTeacher(teacher, memo=memo), None
    return OnlineTeacher(teacher), EMATeacherCallback(teacher, student, 0.999 if decay is None else decay)
