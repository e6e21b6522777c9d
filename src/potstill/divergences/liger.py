"""Liger-Kernel's fused linear JSD as a second backend of the KD loss (CUDA; the ``liger`` extra).

:func:`liger_kd_loss` computes exactly the loss of :func:`~potstill.divergences.chunked_kd_loss`
(same arguments, same value, same gradients up to floating-point rounding) through
``liger_kernel.chunked_loss``'s ``LigerFusedLinearJSDFunction`` (liger-kernel 0.8), which
projects both models' hidden states through their heads chunk by chunk, so neither
``[n, V]`` logits tensor exists whole. potstill's reducer stays the default; this one is
selected with ``KDConfig(loss_backend="liger")``.

Liger's conventions, read from its source (``chunked_loss/jsd_loss.py`` and
``fused_linear_distillation.py``), and how each is mapped onto potstill's::

    L_liger = w_hard * sum_i CE(z_i, y_i) / n_valid
            + w_soft * sum_i JSD_beta(p_i, q_i) / n_valid

* ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, with
  ``p`` the teacher's and ``q`` the student's distribution, both ``softmax(z / T)``. It is not
  divided by ``beta``, so for ``beta in (0, 1)`` it is potstill's ``generalized_jsd`` with the
  same ``beta``. Liger *aliases* its end points: ``beta = 0`` computes ``KL(p || q)`` (potstill's
  ``forward_kl``) and ``beta = 1`` ``KL(q || p)`` (``reverse_kl``), where the formula would give 0.
  So ``forward_kl -> beta 0``, ``reverse_kl -> beta 1``, ``generalized_jsd(beta) -> beta``;
  ``generalized_jsd`` at 0 or 1 is refused by potstill's own parameter check, never passed on.
* Temperature divides both models' logits for the soft term only; CE is at ``T = 1``, as in
  potstill. Liger applies no ``T^2`` factor: it goes into ``w_soft``.
* Mixing: ``w_hard = alpha``, ``w_soft = (1 - alpha) * s`` with ``s = T^2`` if ``scale_t2`` else 1.
* Normalization: Liger divides both terms by ``n_valid``, the number of rows of *this call* whose
  label is not ``ignore_index`` (at least 1); potstill divides by ``normalizer``, the global count
  of target tokens across micro-batches and processes (TRL #4719). Liger's loss is multiplied by
  the detached factor ``max(n_valid, 1) / normalizer`` (0 is taken as 1, as the reducer does);
  Liger scales its stored gradients by the incoming gradient, so the gradients follow.
* Vocabulary: Liger zero-pads the *student's* logits when the teacher's head has more rows, which
  gives padding tokens real probability mass. Both heads are sliced here to the aligned
  vocabulary instead (``vocab_size``, or the student's), as the reducer does.
* Heads: Liger has plain linear heads with a bias and nothing else. A ``logit_scale`` is folded
  into the weight and bias (``s (W h + b) = (s W) h + s b``, a differentiable copy of the head);
  a ``softcap`` cannot be folded and is refused (TRL #6629).
* Precision: Liger computes CE in float32 but the soft term in the logits' dtype (in bf16 its
  log-softmax is bf16), and accumulates the head's gradient in the head's dtype; potstill's
  reducer does both in float32. In float32 the two backends agree to rounding; in bf16 they
  differ by bf16 rounding (``benchmarks/gpu_check.py`` measures it).
* Chunks: ``max(1, n // chunk_size)`` chunks of ``ceil(n / chunks)`` rows (between ``chunk_size``
  and about ``2 chunk_size``). ``compiled=True`` (Liger's default) wraps the chunk step in
  ``torch.compile``.

Not supported (one-line ``ValueError``; use the default backend): other divergences, per-row KD
weights or divergence parameters, cached logits and sparse (top-k / sampled) signals -- Liger
fuses the teacher's head, so it needs a live teacher's hidden states and head.

liger-kernel's other fused JSD (``liger_kernel.transformers.LigerFusedLinearJSD``, a Triton kernel)
is not used: it has no CE term and no bias, so ``alpha > 0`` would need a second pass over the head.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from ..signals.types import DenseSignal, Head, SparseSignal
from .chunked import IGNORE_INDEX, check_mixing, full_head, loss_normalizer
from .dense import get_core
from .params import check_divergence_params

LIGER_DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd")
"""The divergences Liger's fused JSD computes (its ``beta`` = 0, = 1, in (0, 1))."""

INSTALL_HINT = "pip install 'potstill[liger]'"
_USE_DEFAULT = "use loss_backend 'potstill' (the default)"


@functools.lru_cache(maxsize=1)
def liger_available() -> bool:
    """Whether ``liger_kernel.chunked_loss`` imports (it does not say whether CUDA is there)."""
    try:
        import liger_kernel.chunked_loss.functional  # noqa: F401
    except Exception:  # ImportError, or a broken install (its Triton missing, ...)
        return False
    return True


def require_liger(device: torch.device | str | None = None) -> None:
    """One-line ``RuntimeError`` unless liger-kernel imports and ``device`` (if given) is CUDA."""
    if not liger_available():
        raise RuntimeError(
            f"loss_backend 'liger' needs liger-kernel, which is not installed; {INSTALL_HINT} on a CUDA "
            f"machine, or {_USE_DEFAULT}"
        )
    if device is not None and torch.device(device).type != "cuda":
        raise RuntimeError(
            f"loss_backend 'liger' runs on CUDA only, but the tensors are on {torch.device(device).type}; "
            f"{_USE_DEFAULT}"
        )


def liger_beta(divergence: str, divergence_kwargs: dict | None = None) -> float:
    """Liger's ``beta`` for a potstill divergence (see the module docstring); one-line ``ValueError``
    for a divergence Liger does not compute or a degenerate parameter."""
    if divergence not in LIGER_DIVERGENCES:
        raise ValueError(
            f"loss_backend 'liger' computes {', '.join(LIGER_DIVERGENCES)} only (Liger's fused JSD), "
            f"not {divergence}; {_USE_DEFAULT}"
        )
    kwargs = dict(divergence_kwargs or {})
    check_divergence_params(divergence, kwargs)
    if divergence == "forward_kl":
        return 0.0
    if divergence == "reverse_kl":
        return 1.0
    default = inspect.signature(get_core("generalized_jsd")).parameters["beta"].default
    return float(kwargs.get("beta", default))


def check_liger_inputs(
    student_head: Head,
    teacher: DenseSignal | SparseSignal | None,
    divergence: str,
    divergence_kwargs: dict | None = None,
) -> float:
    """Refuse, in one line (``ValueError``), what the Liger backend cannot compute; return Liger's beta."""
    beta = liger_beta(divergence, divergence_kwargs)
    if teacher is None:
        raise ValueError(f"loss_backend 'liger' needs a teacher (alpha = 1 is plain cross-entropy); {_USE_DEFAULT}")
    if not isinstance(teacher, DenseSignal) or teacher.hidden is None:
        kind = "a sparse (top-k / sampled)" if isinstance(teacher, SparseSignal) else "a cached-logits"
        raise ValueError(
            f"loss_backend 'liger' fuses the teacher's lm_head, so it needs a live teacher's hidden states and "
            f"head, but the signal is {kind} one; {_USE_DEFAULT} for cached or top-k signals"
        )
    assert teacher.head is not None  # DenseSignal(hidden=...) always carries its head
    for who, head in (("student", student_head), ("teacher", teacher.head)):
        if head.softcap is not None:
            raise ValueError(
                f"the {who}'s head softcaps its logits ({head.softcap}), which Liger's fused JSD cannot apply; "
                f"{_USE_DEFAULT}"
            )
    return beta


def _linear_args(head: Head, vocab: int) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V])`` of ``head`` sliced to ``vocab`` rows, its ``logit_scale`` folded in."""
    weight, bias = head.with_vocab(vocab).sliced()
    scale = head.logit_scale
    if scale is not None and scale != 1.0:
        weight = weight * scale
        bias = None if bias is None else bias * scale
    return weight, bias


def _aligned_heads(
    student_hidden: Tensor, student_head: Head, labels: Tensor, teacher: DenseSignal, vocab_size: int | None
) -> tuple[Head, Head, int]:
    """Both heads gathered (:func:`~.chunked.full_head`) and the aligned vocabulary; ``ValueError``
    on vocabularies that differ, rows that do not align or labels out of range."""
    # check_liger_inputs has refused every teacher but one given as hidden states + head.
    assert teacher.hidden is not None and teacher.head is not None
    student_head = full_head(student_head)
    teacher_head = full_head(teacher.head)
    vocab = student_head.vocab if vocab_size is None else int(vocab_size)
    if (
        vocab > student_head.weight.shape[0]
        or vocab > teacher_head.weight.shape[0]
        or (vocab_size is None and teacher_head.vocab != vocab)
    ):
        raise ValueError(
            f"teacher vocabulary ({teacher_head.vocab}) and student vocabulary ({student_head.vocab}) differ; "
            "pass vocab_size= to align vocabularies that differ only by padding rows"
        )
    if teacher.hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(
            f"teacher has {teacher.hidden.shape[0]} rows but the student has {student_hidden.shape[0]}; rows must align"
        )
    if student_hidden.shape[0] and bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"labels must be -100 or lie in [0, {vocab})")
    return student_head, teacher_head, vocab


@torch.no_grad()
def _teacher_args(teacher: DenseSignal, teacher_head: Head, vocab: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """The teacher's ``(weight, bias, hidden)`` for Liger, without a graph; ``ValueError`` on non-finite hidden states."""
    w_t, b_t = _linear_args(teacher_head, vocab)
    assert teacher.hidden is not None  # check_liger_inputs: a teacher given as hidden states
    h_t = teacher.hidden.to(w_t.dtype)
    if h_t.shape[0] and not bool(torch.isfinite(h_t).all()):
        raise ValueError("teacher hidden states contain NaN/inf; check the teacher model/dtype (try float32)")
    return w_t, b_t, h_t


FusedJSD = Callable[..., tuple[Tensor, Tensor, Tensor]]
"""Liger's ``liger_fused_linear_jsd`` signature: ``(student_input, student_weight, teacher_input,
teacher_weight, true_labels, student_bias, teacher_bias, weight_hard_loss, weight_soft_loss, beta,
ignore_index, temperature, compiled, chunk_size, return_soft_hard_loss) -> (loss, soft_loss, hard_loss)``."""


def fused_jsd_kd_loss(
    fused: FusedJSD,
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    teacher: DenseSignal | SparseSignal | None,
    *,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    scale_t2: bool = False,
    normalizer: float | Tensor,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    compiled: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """potstill's KD loss computed by any function with Liger's fused-JSD convention (``fused``).

    The conversion layer of :func:`liger_kd_loss` (which passes Liger's own function): arguments in
    potstill's convention are mapped to Liger's, and Liger's loss back to potstill's; the module
    docstring gives each step. Arguments and return value are those of
    :func:`~potstill.divergences.chunked_kd_loss` (``kd_weights`` and per-row parameters excepted).

    Args:
        fused: a function of :data:`FusedJSD`'s signature.
        student_hidden: ``[n, H_s]`` final hidden states of the student's rows.
        student_head: the student's :class:`Head`; gathered first if FSDP2 shards it.
        labels: ``[n]`` target ids, ``-100`` for rows that count nothing.
        teacher: a :class:`DenseSignal` with the teacher's ``hidden [n, H_t]`` and ``head``.
        normalizer: the global number of target tokens (0 is treated as 1).

    Returns:
        ``(loss, stats)``: float32 scalar ``loss``; detached float32 ``ce_sum``, ``kd_sum`` (the
        divergence summed over rows, unweighted) and ``n_tokens``.
    """
    if student_hidden.dim() != 2 or labels.shape != (student_hidden.shape[0],):
        raise ValueError(
            f"student_hidden must be [n, H] and labels [n], got {tuple(student_hidden.shape)} and {tuple(labels.shape)}"
        )
    check_mixing(alpha, temperature, chunk_size)
    beta = check_liger_inputs(student_head, teacher, divergence, divergence_kwargs)
    assert isinstance(teacher, DenseSignal)  # check_liger_inputs refused every other signal
    student_head, teacher_head, vocab = _aligned_heads(student_hidden, student_head, labels, teacher, vocab_size)
    n = student_hidden.shape[0]
    valid = labels != IGNORE_INDEX
    w_s, b_s = _linear_args(student_head, vocab)
    w_t, b_t, h_t = _teacher_args(teacher, teacher_head, vocab)
    device = student_hidden.device
    norm = loss_normalizer(normalizer, device)
    n_valid = valid.sum().float()
    if n == 0:  # nothing to chunk: a zero loss that still reaches the student's tensors
        zero = student_hidden.sum().float() * 0.0 + w_s.sum().float() * 0.0
        z = torch.zeros((), dtype=torch.float32, device=device)
        return zero, {"ce_sum": z, "kd_sum": z.clone(), "n_tokens": z.clone()}

    kd_scale = float(temperature) ** 2 if scale_t2 else 1.0
    loss, soft, hard = fused(
        student_hidden.to(w_s.dtype),
        w_s,
        h_t,
        w_t,
        labels,
        b_s,
        b_t,
        float(alpha),
        (1.0 - float(alpha)) * kd_scale,
        beta,
        IGNORE_INDEX,
        float(temperature),
        bool(compiled),
        int(chunk_size),
        True,
    )
    counted = n_valid.clamp_min(1.0)
    loss = loss.float() * (counted / norm)
    stats = {"ce_sum": (hard.detach().float() * counted), "kd_sum": (soft.detach().float() * counted)}
    return loss, {**stats, "n_tokens": n_valid}


def liger_kd_loss(
    student_hidden: Tensor,
    student_head: Head,
    labels: Tensor,
    teacher: DenseSignal | SparseSignal | None,
    *,
    divergence: str = "forward_kl",
    divergence_kwargs: dict | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    scale_t2: bool = False,
    normalizer: float | Tensor,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    compiled: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE + distillation loss through Liger's fused linear JSD: a drop-in for
    :func:`~potstill.divergences.chunked_kd_loss` on CUDA, for ``forward_kl``, ``reverse_kl`` and
    ``generalized_jsd`` with a live teacher (hidden states + head). See :func:`fused_jsd_kd_loss`.

    Raises ``RuntimeError`` (one line) without liger-kernel or off CUDA, ``ValueError`` for what
    Liger cannot compute (both name the fix).
    """
    check_liger_inputs(student_head, teacher, divergence, divergence_kwargs)
    require_liger(student_hidden.device)
    from liger_kernel.chunked_loss.functional import liger_fused_linear_jsd

    return fused_jsd_kd_loss(
        liger_fused_linear_jsd,
        student_hidden,
        student_head,
        labels,
        teacher,
        divergence=divergence,
        divergence_kwargs=divergence_kwargs,
        alpha=alpha,
        temperature=temperature,
        scale_t2=scale_t2,
        normalizer=normalizer,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        compiled=compiled,
    )
