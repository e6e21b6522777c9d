"""Bayesian KD for a causal-LM student: the BKD posterior over LoRA parameters, sampled by SGLD, and its
posterior predictive's token calibration.

Fang, Chen, Zhong & Ma (ICML 2024) state BKD for a classifier (:mod:`potstill.kd.bayesian`). A language model is
a classifier per response token: at response position ``t`` the label is the reference token ``y_t``, the teacher
soft label is its next-token distribution ``p_t = softmax(z_T,t / tau)`` and the student's is ``q_t``. So the
potential of the chain is the classifier's, summed over the ``N`` response tokens of the training set and
estimated from a batch's ``n_B`` tokens::

    U(theta) = N / n_B * sum_{t in B} [ -log softmax(z_S,t)_{y_t} - log Dir(q_t; 1 + lambda p_t) ]

(:func:`potstill.kd.bayesian.bkd_negative_log_posterior` on the ``[n_B, V]`` rows). ``theta`` is a fresh LoRA
adapter on the trained student: its ``B`` matrices start at zero, so the chain starts exactly at the trained
student (the warm start), and only the adapter is sampled, which is what makes SGLD affordable on an LLM.

The posterior predictive of a token is the mean of the ``S`` kept samples' next-token distributions; its
prediction is the mean's argmax. Per token (:func:`lm_posterior_predict`): whether that prediction is the
reference token, its confidence, the multi-class Brier score of the mean (``sum_v m_v^2 - 2 m_y + 1``), the
reference token's NLL under the mean, and the equal-tailed ``level`` interval of the predicted token's probability
over the samples. Reported: accuracy, ECE (15 bins), Brier, perplexity, and the coverage of the intervals by the
confidence bin's accuracy (:func:`potstill.eval.cls_metrics.binned_coverage`). A single state (the trained
student, a point estimate) goes through the same code: its intervals have width 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import PotstillError
from ..eval.cls_metrics import ECE_BINS, binned_coverage
from ..eval.metrics import expected_calibration_error
from ..eval.run import teacher_forced_inputs
from ..models.head import final_hidden, output_head
from ..models.placement import input_device
from ..schedule import reshuffled_batches
from ..signals.online import target_index, target_rows
from .bayesian import bkd_negative_log_posterior, run_chain

__all__ = ["LMPosterior", "lm_posterior_predict", "response_tokens", "sample_lm_posterior", "sampled_parameters"]


@dataclass
class LMPosterior:
    """The kept states of the sampled parameters (``name -> tensor`` on CPU, one dict per sample), the per-step
    potential and step size, the chain's wall ``seconds``, ``steps`` and the training set's response ``tokens``."""

    snapshots: list[dict[str, Tensor]] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    step_size: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0


def sampled_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the chain samples: those that require gradients (a peft model's adapter)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise PotstillError("the student has no trainable parameters to sample; wrap it in a LoRA adapter first")
    return params


def response_tokens(examples: Sequence[dict]) -> int:
    """Response tokens the student predicts: every response token (position ``t`` predicts ``t + 1``)."""
    return sum(len(ex["response_ids"]) for ex in examples)


def _logit_rows(model, head, input_ids: Tensor, attention_mask: Tensor, index: Tensor) -> Tensor:
    dev = input_device(model)
    hidden = final_hidden(model, input_ids.to(dev), attention_mask.to(dev))
    return head(target_rows(hidden, index.to(hidden.device)).to(head.weight.device))


def _batch(examples: Sequence[dict], pad_id: int, vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    input_ids, mask, labels = teacher_forced_inputs(examples, pad_id)
    index = target_index(labels)
    targets = labels[:, 1:].reshape(-1)[index]
    if targets.numel() and int(targets.max()) >= vocab:
        raise PotstillError(f"reference token id {int(targets.max())} is outside the compared vocabulary ({vocab})")
    return input_ids, mask, index, targets


def sample_lm_posterior(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    examples: Sequence[dict],
    *,
    vocab: int,
    pad_id: int,
    prior_strength: float,
    temperature: float = 1.0,
    lr: float,
    burn_in: int,
    samples: int,
    thin: int = 1,
    gamma: float = 0.0,
    decay_offset: float = 100.0,
    noise_scale: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> LMPosterior:
    """Run SGLD on the token-level BKD posterior of ``student``'s trainable parameters (in place) for
    ``burn_in + samples * thin`` steps; keep a CPU copy of them at each of the ``samples`` kept states.

    ``examples``: dicts with ``prompt_ids`` and ``response_ids`` (the training set). The teacher's logits come from
    a live forward per batch, on the first ``vocab`` entries of both heads. The student runs in eval mode (no
    dropout: SGLD's noise is the chain's only randomness) and is left at the last sample's parameters.
    """
    if not examples or samples < 1:
        raise PotstillError("need training examples and samples >= 1")
    params = sampled_parameters(student)
    n_tokens = response_tokens(examples)
    s_head, t_head = output_head(student).with_vocab(vocab), output_head(teacher).with_vocab(vocab)
    log = LMPosterior(tokens=n_tokens)
    student.eval()
    teacher.eval()

    def potential(idx: list[int]) -> Tensor:
        input_ids, mask, index, targets = _batch([examples[i] for i in idx], pad_id, vocab)
        with torch.no_grad():
            t_logits = _logit_rows(teacher, t_head, input_ids, mask, index)
        s_logits = _logit_rows(student, s_head, input_ids, mask, index)
        return bkd_negative_log_posterior(
            s_logits,
            targets.to(s_logits.device),
            t_logits.to(s_logits.device),
            prior_strength=prior_strength,
            temperature=temperature,
            dataset_size=n_tokens,
        )

    start = time.perf_counter()
    opt = run_chain(
        list(params.values()),
        potential,
        reshuffled_batches(len(examples), batch_size, seed),
        steps=burn_in + samples * thin,
        on_sample=lambda: log.snapshots.append({n: p.detach().to("cpu", copy=True) for n, p in params.items()}),
        log=log,
        hint="lower method.bayesian.sgld.lr",
        lr=lr,
        noise_scale=noise_scale,
        gamma=gamma,
        decay_offset=decay_offset,
        burn_in=burn_in,
        thin=thin,
        seed=seed,
    )
    log.steps, log.seconds = opt.steps_taken, time.perf_counter() - start
    return log


@torch.no_grad()
def _load(params: dict[str, torch.nn.Parameter], state: dict[str, Tensor]) -> None:
    for n, p in params.items():
        p.copy_(state[n].to(p.device, p.dtype))


@torch.no_grad()
def lm_posterior_predict(
    student: torch.nn.Module,
    snapshots: Sequence[dict[str, Tensor]],
    examples: Sequence[dict],
    *,
    vocab: int,
    pad_id: int,
    level: float = 0.95,
    batch_size: int = 4,
) -> dict:
    """Token calibration of the posterior predictive over ``snapshots`` (states of
    :func:`sampled_parameters`) on ``examples``, teacher-forced on the reference responses (module docstring).

    Returns ``{accuracy, ece, brier, perplexity, coverage, mean_width, level, samples, tokens}``; the student is
    left at the last snapshot's parameters. Memory: ``samples x tokens of a batch x vocab`` probabilities.
    """
    if not snapshots:
        raise PotstillError("no posterior samples to predict with")
    if not 0.0 < level < 1.0:
        raise PotstillError(f"level={level} must be in (0, 1), e.g. 0.95")
    if not examples:
        raise PotstillError("no evaluation examples")
    params = sampled_parameters(student)
    head = output_head(student).with_vocab(vocab)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    saved = [(m, m.training) for m in student.modules()]
    student.eval()
    conf, correct, lo, hi, brier, nll = [], [], [], [], [], []
    try:
        for s in range(0, len(examples), batch_size):
            input_ids, mask, index, targets = _batch(examples[s : s + batch_size], pad_id, vocab)
            probs = []
            for state in snapshots:
                _load(params, state)
                probs.append(torch.softmax(_logit_rows(student, head, input_ids, mask, index).double(), -1).cpu())
            p = torch.stack(probs)  # [S, n, V]
            mean = p.mean(0)
            c, pred = mean.max(-1)
            rows = torch.arange(pred.numel())
            at_pred = p[:, rows, pred]  # [S, n]: each sample's probability of the predicted token
            bounds = torch.quantile(at_pred, q, dim=0)
            m_y = mean[rows, targets]
            conf.append(c)
            correct.append(pred == targets)
            lo.append(bounds[0])
            hi.append(bounds[1])
            brier.append(mean.pow(2).sum(-1) - 2 * m_y + 1)
            nll.append(-torch.log(m_y.clamp_min(1e-300)))
    finally:
        for m, mode in saved:
            m.training = mode
    conf_t, right = torch.cat(conf), torch.cat(correct)
    out = {
        "accuracy": float(right.double().mean()),
        "ece": expected_calibration_error(conf_t, right, n_bins=ECE_BINS),
        "brier": float(torch.cat(brier).mean()),
        "perplexity": math.exp(float(torch.cat(nll).mean())),
    }
    out.update(binned_coverage(conf_t, right, torch.cat(lo), torch.cat(hi), ECE_BINS))
    out.update(level=level, samples=len(snapshots), tokens=int(conf_t.numel()))
    return out
