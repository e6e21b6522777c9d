"""Universal Logit Distillation (ULD): a divergence across vocabularies.

Boizard et al. 2024 (arXiv:2402.12030): a Wasserstein-1 closed form on sorted probabilities that
needs no vocabulary map at all, so teacher and student may use different tokenizers. Pure
functions over the last dim, no reduction, no masking; :class:`~potstill.kd.cross_tokenizer.CrossTokenizerKDTrainer`
applies them on aligned rows. Not in ``DIVERGENCES``: that map holds same-vocabulary divergences.
"""

from __future__ import annotations

import torch
from torch import Tensor


def uld_teacher_target(teacher_logits: Tensor, student_vocab: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The part of the teacher that ULD needs: ``[n, V_t] -> (top [n, k], tail [n])``.

    ``top`` holds the teacher's ``k = min(V_s, V_t)`` largest probabilities of ``softmax(z / T)`` in
    descending order, ``tail`` the mass beyond them (paired with the student's zero padding). Only
    ``[n, min(V_s, V_t)]`` has to be kept for the loss, whatever the teacher's vocabulary size.
    """
    p = torch.softmax(
        teacher_logits.float() / temperature if teacher_logits.dtype != torch.float64 else teacher_logits / temperature,
        dim=-1,
    )
    ranked = torch.sort(p, dim=-1, descending=True).values
    k = min(int(student_vocab), p.shape[-1])
    return ranked[:, :k], ranked[:, k:].sum(-1)


def uld_from_target(student_logits: Tensor, top: Tensor, tail: Tensor, temperature: float) -> Tensor:
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    q = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    q_ranked = torch.sort(q, dim=-1, descending=True).values
    k = top.shape[-1]
    # Past k one side is zero padding: |q_i - 0| on the student's tail, the teacher's tail is a constant.
    return (q_ranked[:, :k] - top.to(dtype)).abs().sum(-1) + q_ranked[:, k:].sum(-1) + tail.to(dtype)


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation loss per row, ``[n, V_s], [n, V_t] -> [n]``.

    Boizard et al. 2024 ("Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
    Loss for LLMs", arXiv:2402.12030; the ULD term of ``L = L_CE + lambda * L_ULD``): with
    ``q = softmax(student / T)`` and ``p = softmax(teacher / T)``, each sorted in decreasing order
    and the shorter one zero-padded to ``max(V_s, V_t)``, ``ULD = sum_i |q_(i) - p_(i)|``, the
    closed form of the Wasserstein-1 distance they derive for a uniform transport cost.
    It is invariant to any permutation of either vocabulary, 0 when the sorted distributions
    coincide, and at most 2. The paper uses one temperature for both sides and adds the loss to
    CE with a weight lambda (here ``(1 - alpha) / alpha``); no T^2. Differentiable in
    ``student_logits`` (through the sort).
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"uld_loss needs [n, V_s] and [n, V_t] logits, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    top, tail = uld_teacher_target(teacher_logits, student_logits.shape[-1], temperature)
    return uld_from_target(student_logits, top, tail, temperature)


__all__ = ["uld_loss", "uld_teacher_target"]
