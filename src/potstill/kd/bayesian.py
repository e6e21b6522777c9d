"""Bayesian knowledge distillation (BKD): a teacher-informed Dirichlet prior, SGLD posterior sampling and
posterior-predictive credible intervals for a classifier student.

Fang, Chen, Zhong & Ma, "Bayesian Knowledge Distillation: A Bayesian Perspective of Distillation with
Uncertainty Quantification", ICML 2024. Per training example ``i`` with label ``y_i``, teacher logits ``z_T`` and
student logits ``z_S = h(x_i, theta)``, at distillation temperature ``tau``:

* teacher soft label ``p_i = softmax(z_T / tau)`` and student probabilities ``q_i = softmax(z_S / tau)``;
* teacher-informed prior: ``q_i ~ Dirichlet(alpha_i)``, ``alpha_i = 1 + lambda * p_i`` (``lambda`` = prior
  strength), so ``log pi(q_i) = lambda * sum_c p_ic log q_ic - log B(alpha_i)``;
* likelihood: ``y_i ~ Categorical(softmax(z_S))``;
* negative log posterior (the potential of SGLD), over ``N`` examples estimated from a batch ``B``::

      U(theta) = N / |B| * sum_{i in B} [ -log softmax(z_S)_{y_i} - log Dir(q_i; 1 + lambda p_i) ]

Its minimiser (the posterior mode) is the KD minimiser: ``-log Dir`` is ``lambda * CE(p_i, q_i)`` plus a
constant and ``CE(p, q) = KL(p || q) + H(p)``, so ``U / (N (1 + lambda/tau^2))`` is, up to a constant, the
Hinton KD loss ``a * CE(y, z_S) + (1 - a) * tau^2 * KL(p || q)`` with ``a = tau^2 / (tau^2 + lambda)``
(:func:`kd_alpha_of`). At ``tau = 1`` with free logits the mode is ``q* = (e_y + lambda p) / (1 + lambda)``.

Choices where the construction leaves room (the paper's text was not at hand; the construction above was
implemented from its abstract and Algorithm 1): the prior on ``theta`` is the product over training examples
of the Dirichlet density evaluated at ``q_i(theta)`` (no change-of-variables Jacobian, which is what makes the
mode equal the KD solution), with no further weight prior; the ``+1`` in ``alpha`` makes the log-density's
exponent exactly ``lambda p``; the model runs in eval mode (no dropout) while sampling, so the only noise is
SGLD's; the chain starts from the KD (posterior-mode) solution when a warm start is used.

SGLD (Welling & Teh 2011, eq. 4): ``theta <- theta - eps_t / 2 * grad U(theta) + N(0, s * eps_t)`` with
``eps_t = lr * (b / (b + t))^gamma`` (their ``a (b + t)^-gamma``, normalized so ``eps_0 = lr``) and ``s`` the
noise scale (1: the posterior; 0: noiseless gradient descent on ``U``). After ``burn_in`` steps every
``thin``-th state is a sample; :func:`posterior_predict` averages the samples' class probabilities and takes
their percentiles as an equal-tailed credible interval.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.classification import Example
from ..errors import PotstillError
from ..eval.cls_metrics import ECE_BINS, classification_metrics, interval_coverage
from ..models.classifier import TextClassifier, classifier_pad_id, collate_ids, encode_examples, model_device
from ..schedule import reshuffled_batches
from .guards import check_finite

__all__ = [
    "SGLD",
    "BayesianLog",
    "PosteriorPrediction",
    "bkd_negative_log_posterior",
    "calibration_report",
    "dirichlet_log_prior",
    "kd_alpha_of",
    "posterior_predict",
    "run_chain",
    "sample_classifier_posterior",
    "teacher_concentration",
]


# ------------------------------------------------------------------------------ the posterior


def teacher_concentration(teacher_logits: Tensor, *, prior_strength: float, temperature: float = 1.0) -> Tensor:
    """Dirichlet concentration ``1 + lambda * softmax(z_T / tau)``: ``[B, C] -> [B, C]`` (BKD's teacher-informed
    prior). Teacher logits may be log-probabilities (``-inf`` for a zero soft label gives concentration 1)."""
    if prior_strength < 0 or temperature <= 0:
        raise PotstillError(f"need prior_strength >= 0 and temperature > 0; got {prior_strength}, {temperature}")
    z = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))  # float64 stays float64
    return 1.0 + prior_strength * torch.softmax(z / temperature, dim=-1)


def dirichlet_log_prior(student_log_probs: Tensor, concentration: Tensor) -> Tensor:
    """``log Dir(q; a) = sum_c (a_c - 1) log q_c - sum_c lgamma(a_c) + lgamma(sum_c a_c)`` per row:
    ``[B, C] (log q), [B, C] (a) -> [B]``. Terms with ``a_c = 1`` contribute 0 even where ``q_c = 0``."""
    a = concentration.to(student_log_probs.dtype)
    w = a - 1.0
    body = torch.where(w == 0, torch.zeros_like(student_log_probs), w * student_log_probs).sum(-1)
    return body - torch.lgamma(a).sum(-1) + torch.lgamma(a.sum(-1))


def bkd_negative_log_posterior(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    *,
    prior_strength: float,
    temperature: float = 1.0,
    dataset_size: int | None = None,
) -> Tensor:
    """SGLD's potential ``U(theta)`` (module docstring): ``[B, C], [B], [B, C] -> []``.

    The categorical log-likelihood uses ``softmax(z_S)``; the Dirichlet prior is on ``softmax(z_S / tau)``.
    With ``dataset_size = N`` the batch sum is scaled by ``N / B`` (an unbiased estimate of the full-data
    potential, Welling & Teh 2011 eq. 4); ``None`` leaves the batch sum (the batch is the whole data set).
    """
    if student_logits.shape != teacher_logits.shape or labels.shape != student_logits.shape[:1]:
        raise PotstillError(
            f"student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)} and "
            f"labels {tuple(labels.shape)} must be [B, C], [B, C], [B]"
        )
    z = student_logits.float() if student_logits.dtype in (torch.float16, torch.bfloat16) else student_logits
    nll = F.cross_entropy(z, labels, reduction="none")
    a = teacher_concentration(teacher_logits, prior_strength=prior_strength, temperature=temperature)
    log_prior = dirichlet_log_prior(torch.log_softmax(z / temperature, dim=-1), a.to(z.dtype))
    total = (nll - log_prior).sum()
    if dataset_size is not None:
        total = total * (dataset_size / student_logits.shape[0])
    return total


def kd_alpha_of(prior_strength: float, temperature: float) -> float:
    """The Hinton-KD hard-label weight ``a = tau^2 / (tau^2 + lambda)`` whose loss
    ``a CE + (1 - a) tau^2 KL`` has BKD's posterior mode as its minimiser (module docstring)."""
    return temperature**2 / (temperature**2 + prior_strength)


# ---------------------------------------------------------------------------------------- SGLD


class SGLD(torch.optim.Optimizer):
    """Stochastic gradient Langevin dynamics (Welling & Teh 2011, eq. 4) over the parameters' ``.grad = grad U``.

    ``step()``: ``p <- p - eps_t / 2 * p.grad + sqrt(noise_scale * eps_t) * xi``, ``xi ~ N(0, I)``, with
    ``eps_t = lr * (decay_offset / (decay_offset + t))^gamma`` (``t`` = steps taken before this one; ``gamma = 0``:
    constant). No momentum, clipping or weight decay: each would change the stationary distribution.
    :meth:`is_sample` says whether the state after the last step is a posterior sample (after ``burn_in`` steps,
    every ``thin``-th). The noise comes from a generator seeded with ``seed`` per device, so a run is repeatable.
    """

    def __init__(
        self,
        params,
        lr: float,
        *,
        noise_scale: float = 1.0,
        gamma: float = 0.0,
        decay_offset: float = 100.0,
        burn_in: int = 0,
        thin: int = 1,
        seed: int = 0,
    ):
        if lr <= 0 or noise_scale < 0 or gamma < 0 or decay_offset <= 0 or burn_in < 0 or thin < 1:
            raise PotstillError(
                f"SGLD needs lr > 0, noise_scale >= 0, gamma >= 0, decay_offset > 0, burn_in >= 0, thin >= 1; got "
                f"{lr}, {noise_scale}, {gamma}, {decay_offset}, {burn_in}, {thin}"
            )
        super().__init__(params, {"lr": lr, "noise_scale": noise_scale, "gamma": gamma, "decay_offset": decay_offset})
        self.burn_in, self.thin, self.seed = burn_in, thin, seed
        self.steps_taken = 0
        self._generators: dict[str, torch.Generator] = {}

    def step_size(self, group: dict | None = None) -> float:
        """``eps_t`` of the next step (of the first parameter group by default)."""
        g = group if group is not None else self.param_groups[0]
        return g["lr"] * (g["decay_offset"] / (g["decay_offset"] + self.steps_taken)) ** g["gamma"]

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps = self.step_size(group)
            std = math.sqrt(group["noise_scale"] * eps)
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad, alpha=-eps / 2)
                if std > 0:
                    p.add_(
                        torch.randn(p.shape, generator=self._generator(p.device), device=p.device, dtype=p.dtype),
                        alpha=std,
                    )
        self.steps_taken += 1
        return loss

    def is_sample(self) -> bool:
        """Whether the current state (after :attr:`steps_taken` steps) is kept: past burn-in, on the thinning grid."""
        k = self.steps_taken - self.burn_in
        return k > 0 and k % self.thin == 0


def run_chain(
    params: list[torch.nn.Parameter],
    potential: Callable[[list[int]], Tensor],
    batches: Iterator[list[int]],
    *,
    steps: int,
    on_sample: Callable[[], None],
    log: Any,
    hint: str,
    **sgld: Any,
) -> SGLD:
    """``steps`` SGLD steps (:class:`SGLD` over ``params`` with the ``sgld`` settings) on ``potential(batch)``,
    the batch indices drawn from ``batches``; ``on_sample()`` at every kept state. Appends each step's size and
    potential to ``log.step_size`` / ``log.potential``; a non-finite potential or gradient stops the chain with
    ``hint`` (before the step). Returns the optimizer (its ``steps_taken``)."""
    opt = SGLD(params, **sgld)
    for step in range(steps):
        u = potential(next(batches))
        u.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        check_finite(step + 1, u, norm, hint=hint, distributed=False)
        log.step_size.append(opt.step_size())
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.potential.append(float(u.detach()))
        if opt.is_sample():
            on_sample()
    return opt


# --------------------------------------------------------------------------- posterior predictive


@dataclass
class PosteriorPrediction:
    """Per example: posterior-predictive ``mean [N, C]`` (average of the samples' class probabilities) and the
    equal-tailed ``level`` credible interval ``lower, upper [N, C]`` of each class probability."""

    mean: Tensor
    lower: Tensor
    upper: Tensor
    level: float


def posterior_predict(sample_probs: Tensor, level: float = 0.95) -> PosteriorPrediction:
    """Posterior mean and credible interval from ``sample_probs [S, N, C]`` (class probabilities of ``S``
    posterior samples on ``N`` examples). Interval: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    over the samples (linear interpolation; 2.5 / 97.5 percentiles at level 0.95)."""
    if sample_probs.dim() != 3 or sample_probs.shape[0] < 1:
        raise PotstillError(f"sample_probs must be [S, N, C] with S >= 1; got {tuple(sample_probs.shape)}")
    if not 0.0 < level < 1.0:
        raise PotstillError(f"level={level} must be in (0, 1), e.g. 0.95")
    p = sample_probs.double()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(p, q, dim=0)
    return PosteriorPrediction(p.mean(0), lo, hi, level)


def calibration_report(pred: PosteriorPrediction, labels: Sequence[int] | Tensor) -> dict:
    """:func:`classification_metrics` of the predictive mean (accuracy, F1, ECE over 15 equal-width bins, Brier)
    plus :func:`interval_coverage` (share of examples whose interval on the predicted class covers its
    confidence bin's accuracy) and the interval's mean width, and the ``level``."""
    out = classification_metrics(pred.mean, labels)
    out.update(interval_coverage(pred.mean, pred.lower, pred.upper, labels, n_bins=ECE_BINS))
    out.update(level=pred.level, ece_bins=ECE_BINS)
    return out


# ------------------------------------------------------------------------------ classifier student


@dataclass
class BayesianLog:
    """``sample_probs [S, M, C]`` on the evaluation examples, per-step potential ``U`` and step size, wall
    ``seconds`` and ``steps`` of the chain."""

    sample_probs: Tensor
    potential: list[float] = field(default_factory=list)
    step_size: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def _probs(model: TextClassifier, ids: list[list[int]], batch_size: int) -> Tensor:
    out = torch.zeros(len(ids), model.num_labels)
    pad, device = classifier_pad_id(model), model_device(model)
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            input_ids, mask = collate_ids(ids[s : s + batch_size], pad, device)
            out[s : s + batch_size] = torch.softmax(model(input_ids, mask).logits.float(), -1).cpu()
    return out


def sample_classifier_posterior(
    model: TextClassifier,
    train_examples: Sequence[Example],
    teacher_probs: Tensor,
    eval_examples: Sequence[Example],
    *,
    prior_strength: float,
    temperature: float = 1.0,
    lr: float,
    burn_in: int,
    samples: int,
    thin: int = 1,
    gamma: float = 0.0,
    decay_offset: float = 100.0,
    noise_scale: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
    eval_batch_size: int = 64,
) -> BayesianLog:
    """Run SGLD on the BKD posterior of ``model`` (in place) for ``burn_in + samples * thin`` steps and record
    the class probabilities ``[M, C]`` on ``eval_examples`` at each of the ``samples`` kept states.

    ``teacher_probs [N, C]``: the teacher's probabilities (temperature 1) on ``train_examples``; their logs are
    the teacher logits of the prior. Batches of ``batch_size`` from seeded reshuffles; ``U`` is scaled by
    ``N / batch_size``. The model is left at the last sample's weights, in eval mode.
    """
    n = len(train_examples)
    if n == 0 or not eval_examples or samples < 1:
        raise PotstillError("need training examples, evaluation examples and samples >= 1")
    tp = torch.as_tensor(teacher_probs, dtype=torch.float32)
    if tp.shape != (n, model.num_labels):
        raise PotstillError(f"teacher_probs has shape {tuple(tp.shape)}, expected ({n}, {model.num_labels})")
    device, pad = model_device(model), classifier_pad_id(model)
    ids = encode_examples(model.tokenizer, train_examples, max_length)
    eval_ids = encode_examples(model.tokenizer, eval_examples, max_length)
    labels = torch.tensor([e.label for e in train_examples], dtype=torch.long)
    t_logits = torch.log(tp)  # log-probabilities are logits of the same distribution
    log, kept = BayesianLog(torch.empty(0)), []
    model.eval()  # no dropout: SGLD's noise is the only randomness of the chain

    def potential(idx: list[int]) -> Tensor:
        input_ids, mask = collate_ids([ids[i] for i in idx], pad, device)
        return bkd_negative_log_posterior(
            model(input_ids, mask).logits,
            labels[idx].to(device),
            t_logits[idx].to(device),
            prior_strength=prior_strength,
            temperature=temperature,
            dataset_size=n,
        )

    start = time.perf_counter()
    opt = run_chain(
        [p for p in model.parameters() if p.requires_grad],
        potential,
        reshuffled_batches(n, batch_size, seed),
        steps=burn_in + samples * thin,
        on_sample=lambda: kept.append(_probs(model, eval_ids, eval_batch_size)),
        log=log,
        hint="lower method.sgld.lr",
        lr=lr,
        noise_scale=noise_scale,
        gamma=gamma,
        decay_offset=decay_offset,
        burn_in=burn_in,
        thin=thin,
        seed=seed,
    )
    log.sample_probs, log.steps = torch.stack(kept), opt.steps_taken
    log.seconds = time.perf_counter() - start
    return log
