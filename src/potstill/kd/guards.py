"""Stop a run at its first non-finite optimizer step, before the optimizer applies it.

A NaN or inf loss in any micro-batch of an optimizer step, or a NaN or inf gradient norm,
raises :class:`NonFiniteTrainingError` before ``optimizer.step()``, so the weights are those
after the previous step. The error is a :class:`~potstill.errors.PotstillError`: it leaves
``trainer.train()``, the runner never reaches its save (no student is written) and the CLI
prints its one line and exits 2.

Cost, per micro-batch: one on-device add of the detached loss into a running sum (no host
sync). Per optimizer step: a 7-element flag vector built from that sum and the gradient norm
``transformers.Trainer`` computes anyway (for clipping and logging), one ``all_reduce(MAX)``
of it when ``torch.distributed`` is initialized, and one device-to-host copy.

All processes decide together. Under DDP the gradients agree across ranks, but a loss is
rank-local, and under FSDP each rank holds a shard of the gradients: ranks can disagree, and
a rank raising alone would leave the others waiting in their next collective. The flags are
reduced with MAX first, so every rank raises at the same step with the same message.

Not checked: with fp16 loss scaling (a ``GradScaler``), inf gradients are the scaler's
signal to skip a step and lower the scale, so only the loss is checked. Under DeepSpeed the
engine steps inside ``backward``, before this check: the run still stops and saves nothing,
but the last update has been applied.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import PotstillError

KD_HINT = "lower train.learning_rate, raise the distillation temperature, or check the divergence parameters"
"""The usual causes of a diverging distillation run, in the recipe's terms."""

_LOSS_NAN, _LOSS_POSINF, _LOSS_NEGINF, _NORM_NAN, _NORM_POSINF, _NORM_NEGINF, _RANK = range(7)


class NonFiniteTrainingError(PotstillError):
    """The loss or the gradient norm became NaN or inf; the run stopped before applying that step."""


def _as_float_tensor(value, device) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if hasattr(value, "to_local"):  # DTensor (FSDP2): the local part's finiteness, reduced with the flags
            value = value.to_local()
        return value.detach().float().reshape(-1).to(device)
    return torch.tensor([float(value)], dtype=torch.float32, device=device)


def nonfinite_flags(loss, grad_norm, *, rank: int = 0, world_size: int = 1, device=None) -> Tensor:
    """This process's verdict on one optimizer step, as a ``[7]`` float32 tensor on ``device``.

    ``loss`` (the sum of the step's micro-batch losses) and ``grad_norm`` are tensors (any
    shape: any non-finite entry counts), numbers or None (not checked). Entries 0-5 are 0/1:
    the loss is NaN, +inf, -inf; the gradient norm is NaN, +inf, -inf. Entry 6 is
    ``world_size - rank`` when this process saw anything non-finite, else 0, so that after a
    MAX reduction ``world_size - flags[6]`` is the lowest rank that did. Builds the vector on
    the device without a host sync.
    """
    if device is None:
        device = next((v.device for v in (loss, grad_norm) if isinstance(v, Tensor)), torch.device("cpu"))
    parts = []
    for value in (loss, grad_norm):
        t = _as_float_tensor(value, device)
        if t is None or t.numel() == 0:
            parts.append(torch.zeros(3, device=device))
        else:
            parts.append(torch.stack([t.isnan().any(), t.isposinf().any(), t.isneginf().any()]).float())
    flags = torch.cat(parts)
    code = flags.amax() * float(world_size - rank)
    return torch.cat([flags, code.reshape(1)])


def _distributed() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def agree(flags: Tensor) -> Tensor:
    """``flags`` reduced with MAX over all processes when ``torch.distributed`` is initialized
    (in place; a collective: every rank must call it at the same step), else unchanged."""
    on, _, _ = _distributed()
    if on:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def _value(nan: float, posinf: float, neginf: float) -> str | None:
    if nan:
        return "nan"
    if posinf and neginf:
        return "nan"  # +inf and -inf on different micro-batches or ranks: their sum is nan
    if posinf:
        return "inf"
    if neginf:
        return "-inf"
    return None


def nonfinite_message(
    flags: Sequence[float], step: int, *, run: str | None = None, hint: str = KD_HINT, world_size: int = 1
) -> str | None:
    """The one-line error for (reduced) ``flags`` at optimizer ``step`` (1-based), or None if all finite."""
    loss = _value(*flags[_LOSS_NAN:_NORM_NAN])
    norm = _value(*flags[_NORM_NAN:_RANK])
    if loss is None and norm is None:
        return None
    where = f"training diverged at step {step}"
    if run:
        where += f" of run {' '.join(str(run).split())}"
    if world_size > 1 and flags[_RANK] > 0:
        where += f" (first on rank {world_size - int(flags[_RANK])})"
    if loss is not None:
        what = f"the loss is {loss}" + (f" (gradient norm {norm})" if norm is not None else "")
    else:
        what = f"the gradient norm is {norm} (the loss is finite)"
    return f"{where}: {what}; {hint}"


def check_finite(
    step: int, loss, grad_norm, *, run: str | None = None, hint: str = KD_HINT, distributed: bool = True, device=None
) -> None:
    """Raise :class:`NonFiniteTrainingError` if ``loss`` or ``grad_norm`` is NaN or inf on any process.

    Call it once per optimizer step, after the gradients are complete and before
    ``optimizer.step()``. With ``distributed`` (and ``torch.distributed`` initialized) it is a
    collective: every rank must call it. One host sync.
    """
    on, rank, world = _distributed() if distributed else (False, 0, 1)
    flags = nonfinite_flags(loss, grad_norm, rank=rank, world_size=world, device=device)
    if on:
        flags = agree(flags)
    message = nonfinite_message(flags.tolist(), step, run=run, hint=hint, world_size=world)
    if message is not None:
        raise NonFiniteTrainingError(message)


def _local_grad_norm(model: torch.nn.Module) -> Tensor | None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    return torch.nn.utils.get_total_norm(grads) if grads else None


@functools.cache
def _callback_class():
    from transformers import TrainerCallback  # here, so that the decision helpers import without transformers

    class NonFiniteCallback(TrainerCallback):
        """Runs the trainer's check in ``on_pre_optimizer_step`` (after clipping, before the step)."""

        def __init__(self, trainer):
            self._trainer = weakref.ref(trainer)

        def on_train_begin(self, args, state, control, **kwargs):
            trainer = self._trainer()
            if trainer is not None:
                trainer._reset_nonfinite()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            trainer = self._trainer()
            if trainer is not None:
                trainer._check_nonfinite()

    return NonFiniteCallback


class NonFiniteGuard:
    """Mixin for ``transformers.Trainer`` subclasses: ``class KDTrainer(NonFiniteGuard, Trainer)``.

    Sums each micro-batch's detached loss on the device, keeps the gradient norm the Trainer
    computes for the step, and checks both in ``on_pre_optimizer_step`` (module docstring).
    The run's name in the message is ``args.run_name`` when set.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reset_nonfinite()
        self.add_callback(_callback_class()(self))

    def _reset_nonfinite(self) -> None:
        self._step_loss: Tensor | None = None
        self._step_grad_norm = None
        self._step_grad_norm_seen = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        part = loss.detach().float().sum()
        self._step_loss = part if self._step_loss is None else self._step_loss + part
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer's own norm of this step's gradients (pre-clip), reused so the check costs no extra pass.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._step_grad_norm, self._step_grad_norm_seen = grad_norm, True
        return grad_norm

    def _check_nonfinite(self) -> None:
        loss, norm = self._step_loss, self._step_grad_norm
        if not self._step_grad_norm_seen:  # a Trainer that no longer reports its norm: take it ourselves
            norm = _local_grad_norm(self.model)
        self._reset_nonfinite()
        if getattr(self.accelerator, "scaler", None) is not None:
            norm = None  # fp16 loss scaling: an inf gradient makes the scaler skip the step, by design
        check_finite(self.state.global_step + 1, loss, norm, run=self.args.run_name, device=self.args.device)
