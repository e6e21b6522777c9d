"""Gradient influence of training examples on a target set (LESS, Xia et al. 2024).

LESS ("Selecting Influential Data for Targeted Instruction Tuning", its Adam influence) scores a
training example ``z`` by how well one optimizer step on it aligns with the gradient of
the loss on a few target examples:

* gradients are taken over a small parameter set only: the LoRA matrices of a warmed-up
  student (``peft``), or whichever parameters have ``requires_grad`` (or ``params=``);
* each example's loss is its mean token cross-entropy over response tokens;
* training examples use the **Adam update direction** (LESS's ``Gamma``)::

      Gamma(z) = m_hat / (sqrt(v_hat) + eps),
      m_hat = (beta1 m + (1 - beta1) g) / (1 - beta1^(t+1)),
      v_hat = (beta2 v + (1 - beta2) g^2) / (1 - beta2^(t+1)),

  with ``m, v, t`` the warmup optimizer's state (``exp_avg``, ``exp_avg_sq``, ``step``) and
  ``g`` the example's gradient: the step Adam would take on ``z`` next (weight decay,
  a separate term, is left out). Without optimizer state they use the plain SGD gradient;
* target examples always use the **SGD gradient** ``g`` (LESS: the validation gradient);
* both are mapped by one random projection ``R [P, d]`` (TRAK/JL; entries ``+-1/sqrt d``
  or ``N(0, 1/d)``) to ``d`` dims, and the score is the cosine
  ``cos(R Gamma(z), mean_j R g(z'_j))``: the gradient of the target set's mean loss
  (projection is linear, so projecting first is the same). With ``target_groups``
  (LESS's subtasks), the score is the max over groups. LESS sums the scores of several
  warmup checkpoints weighted by their learning rates: call once per checkpoint and add.

``R`` is never held whole: it is generated ``BLOCK_ROWS`` rows at a time from
``(seed, block index)`` on the gradients' device, so it costs O(P d) random numbers per
batch of ``proj_batch`` examples and O(BLOCK_ROWS d) memory. The same ``seed`` gives the
same ``R`` on the same device type (CPU and CUDA generators differ).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import PotstillError
from .forward_pass import check_examples, eval_mode

ProjectionKind = Literal["rademacher", "gaussian"]


# ============================================================================ projection


class RandomProjection:
    """``x [m, P] -> x @ R [m, d]`` (or ``[P] -> [d]``) with a seeded random ``R [P, d]``.

    ``R``'s rows ``[b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS)`` are drawn from a generator seeded
    by ``(seed, b)``, so ``R`` depends only on ``(num_params, dim, seed, kind)`` and the
    device type, never on how many vectors are projected at once. Rademacher: ``+-1/sqrt d``;
    Gaussian: ``N(0, 1/d)``; either way ``E[<Rx, Ry>] = <x, y>`` (Johnson-Lindenstrauss).
    """

    BLOCK_ROWS = 1024

    def __init__(self, num_params: int, dim: int, *, seed: int = 0, kind: ProjectionKind = "rademacher"):
        if num_params < 1:
            raise PotstillError(
                f"cannot project {num_params} gradient coordinates; give the model trainable parameters"
            )
        if dim < 1:
            raise PotstillError(f"proj_dim={dim} must be >= 1 (or None for no projection)")
        if kind not in ("rademacher", "gaussian"):
            raise PotstillError(f"projection '{kind}' is unknown; use 'rademacher' or 'gaussian'")
        self.num_params, self.dim, self.seed, self.kind = num_params, dim, seed, kind

    def _block_seed(self, b: int) -> int:
        d = hashlib.blake2b(f"potstill-proj:{self.seed}:{b}".encode(), digest_size=8).digest()
        return int.from_bytes(d, "little") & ((1 << 63) - 1)

    def block(self, b: int, device, dtype=torch.float32) -> Tensor:
        """Rows ``[b * BLOCK_ROWS, ...)`` of ``R``: ``[rows, d]``."""
        rows = min(self.BLOCK_ROWS, self.num_params - b * self.BLOCK_ROWS)
        device = torch.device(device)
        g = torch.Generator(device=device)
        g.manual_seed(self._block_seed(b))
        if self.kind == "rademacher":
            r = torch.randint(0, 2, (rows, self.dim), generator=g, device=device).to(dtype).mul_(2).sub_(1)
        else:
            r = torch.randn((rows, self.dim), generator=g, device=device, dtype=dtype)
        return r.mul_(1.0 / math.sqrt(self.dim))

    def __call__(self, x: Tensor) -> Tensor:
        single = x.dim() == 1
        x2 = x.unsqueeze(0) if single else x
        if x2.dim() != 2 or x2.shape[1] != self.num_params:
            raise PotstillError(
                f"cannot project a vector of shape {tuple(x.shape)} with a projection of {self.num_params} coordinates"
            )
        x2 = x2.float()
        out = torch.zeros(x2.shape[0], self.dim, device=x2.device, dtype=torch.float32)
        for b in range(math.ceil(self.num_params / self.BLOCK_ROWS)):
            s = b * self.BLOCK_ROWS
            r = self.block(b, x2.device)
            out.addmm_(x2[:, s : s + r.shape[0]], r)
        return out[0] if single else out


# ============================================================================ gradients


def trainable_parameters(model: torch.nn.Module, params=None) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the gradient's coordinates, in ``named_parameters`` order.

    ``params``: ``None`` (every parameter with ``requires_grad``: the LoRA matrices of a
    peft model), or a list of names. Raises when nothing is left.
    """
    named = list(model.named_parameters())
    if params is None:
        out = [(n, p) for n, p in named if p.requires_grad]
    else:
        want = set(params)
        out = [(n, p) for n, p in named if n in want]
        missing = want - {n for n, _ in out}
        if missing:
            raise PotstillError(
                f"the model has no parameter {min(missing)!r}; pass names from model.named_parameters()"
            )
    if not out:
        raise PotstillError(
            "no trainable parameters to take gradients of; wrap the student with LoRA "
            "(potstill.dd.influence.lora_model) or pass params=[names]"
        )
    return out


def lora_model(
    model: torch.nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seed: int = 0,
):
    """The student wrapped with peft LoRA adapters (LESS uses LoRA on the attention
    matrices; r=128, alpha=512 for 7B models). Only the adapters are trainable. peft
    starts ``B = 0``, so the gradient w.r.t. ``A`` is 0 until a warmup step: warm up first."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(
            model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules))
        )


def _example_loss(model: torch.nn.Module, example: dict) -> Tensor:
    """Mean cross-entropy of one example's response tokens (with grad), float32."""
    from ..models import final_hidden, output_head
    from ..signals import target_index, target_rows

    device = next(model.parameters()).device
    ids = torch.as_tensor(example["input_ids"], dtype=torch.long, device=device).unsqueeze(0)
    labels = torch.as_tensor(example["labels"], dtype=torch.long, device=device).unsqueeze(0)
    hidden = final_hidden(model, ids, torch.ones_like(ids))
    rows = target_rows(hidden, target_index(labels))
    logits = output_head(model)(rows).float()
    y = labels[:, 1:][labels[:, 1:] != -100]
    return torch.nn.functional.cross_entropy(logits, y)


def per_example_gradients(model: torch.nn.Module, examples: Sequence[dict], *, params=None) -> Iterator[Tensor]:
    """Yield each example's gradient ``[P]`` (float32, flattened in :func:`trainable_parameters`
    order) of its mean response-token loss, one backward per example (no padding, no
    cross-example mixing). The model runs in eval mode (no dropout); ``.grad`` is untouched;
    parameters named in ``params`` that are frozen take gradients for the duration only."""
    check_examples(examples)
    named = trainable_parameters(model, params)
    ps = [p for _, p in named]
    frozen = [p for p in ps if not p.requires_grad]  # named in params= but frozen: unfrozen meanwhile
    try:
        for p in frozen:
            p.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for ex in examples:
                grads = torch.autograd.grad(_example_loss(model, ex), ps, allow_unused=True)
                yield torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(ps, grads)]
                )
    finally:
        for p in frozen:
            p.requires_grad_(False)


@dataclass
class AdamState:
    """Adam's moments for the gradient coordinates, flattened like the gradients:
    ``exp_avg [P]``, ``exp_avg_sq [P]`` after ``step`` updates, with ``betas`` and ``eps``."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, model: torch.nn.Module, params=None) -> AdamState:
        """Read the state of a warmed-up ``torch.optim.Adam``/``AdamW`` for the parameters of
        :func:`trainable_parameters` (all must share betas/eps and step count)."""
        named = trainable_parameters(model, params)
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        m, v, steps, hyper = [], [], set(), set()
        for name, p in named:
            st = optimizer.state.get(p, {})
            if "exp_avg" not in st or "exp_avg_sq" not in st or id(p) not in groups:
                raise PotstillError(
                    f"the optimizer has no Adam state for {name!r}; warm the student up with "
                    "Adam/AdamW over these parameters first, or score with plain gradients (adam=None)"
                )
            m.append(st["exp_avg"].reshape(-1).float())
            v.append(st["exp_avg_sq"].reshape(-1).float())
            steps.add(int(st["step"]))
            g = groups[id(p)]
            hyper.add((tuple(float(b) for b in g["betas"]), float(g["eps"])))
        if len(steps) != 1 or len(hyper) != 1:
            raise PotstillError(
                "the LoRA parameters have different Adam step counts or betas/eps; warm them up "
                "together in one optimizer group"
            )
        ((betas, eps),) = hyper
        return cls(torch.cat(m), torch.cat(v), steps.pop(), betas, eps)

    def direction(self, grad: Tensor) -> Tensor:
        """LESS's ``Gamma``: the Adam update direction ``m_hat / (sqrt(v_hat) + eps)`` for gradient(s)
        ``grad [..., P]`` (the step Adam would take next, divided by the learning rate)."""
        b1, b2 = self.betas
        t = self.step + 1
        m = (b1 * self.exp_avg.to(grad.device) + (1 - b1) * grad) / (1 - b1**t)
        v = (b2 * self.exp_avg_sq.to(grad.device) + (1 - b2) * grad.pow(2)) / (1 - b2**t)
        return m / (v.sqrt() + self.eps)


def gradient_features(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    adam: AdamState | None = None,
    proj_dim: int | None = 8192,
    seed: int = 0,
    projection: ProjectionKind = "rademacher",
    params=None,
    proj_batch: int = 16,
) -> Tensor:
    """Per-example gradient features ``[N, d]`` (``[N, P]`` with ``proj_dim=None``), float32.

    The SGD gradient of each example's mean response loss, or with ``adam`` its Adam update
    direction (LESS's ``Gamma``), projected by :class:`RandomProjection` ``(P, proj_dim, seed,
    projection)``. ``proj_batch`` gradients ``[proj_batch, P]`` are held at once so each
    projection block is generated once per batch.
    """
    named = trainable_parameters(model, params)
    num = sum(p.numel() for _, p in named)
    if adam is not None and adam.exp_avg.numel() != num:
        raise PotstillError(
            f"the Adam state has {adam.exp_avg.numel()} coordinates but the gradients {num}; "
            "read it with AdamState.from_optimizer for the same model and params"
        )
    if proj_batch < 1:
        raise PotstillError(f"proj_batch={proj_batch} must be >= 1")
    proj = None if proj_dim is None else RandomProjection(num, proj_dim, seed=seed, kind=projection)
    out, buf = [], []

    def flush():
        g = torch.stack(buf)
        if adam is not None:
            g = adam.direction(g)
        out.append((g if proj is None else proj(g)).cpu())
        buf.clear()

    for g in per_example_gradients(model, examples, params=[n for n, _ in named]):
        buf.append(g)
        if len(buf) == proj_batch:
            flush()
    if buf:
        flush()
    return torch.cat(out)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def less_scores(
    model: torch.nn.Module,
    train_examples: Sequence[dict],
    target_examples: Sequence[dict],
    *,
    adam: AdamState | None = None,
    proj_dim: int | None = 8192,
    seed: int = 0,
    projection: ProjectionKind = "rademacher",
    target_groups: Sequence | None = None,
    params=None,
    proj_batch: int = 16,
) -> Tensor:
    """LESS influence of each training example on the target set, ``[N_train]`` in [-1, 1].

    ``cos(R Gamma(z), mean_{z' in group} R g(z'))``, max over ``target_groups`` (one label
    per target example; default one group): Adam directions for training examples when
    ``adam`` is given (LESS), else SGD gradients; SGD gradients for targets. Higher = a
    step on ``z`` lowers the target loss more. Select with
    ``potstill.dd.select.top_k(scores, fraction=0.05)`` (LESS keeps 5%).
    """
    check_examples(train_examples, "training examples")
    check_examples(target_examples, "target examples")
    kw = {"proj_dim": proj_dim, "seed": seed, "projection": projection, "params": params, "proj_batch": proj_batch}
    train = gradient_features(model, train_examples, adam=adam, **kw)
    target = gradient_features(model, target_examples, **kw)
    groups = [0] * len(target_examples) if target_groups is None else list(target_groups)
    if len(groups) != len(target_examples):
        raise PotstillError(
            f"target_groups has {len(groups)} labels for {len(target_examples)} target examples; "
            "give one per target example"
        )
    u = _unit(train)
    scores = []
    for grp in sorted(set(groups), key=str):
        rows = torch.tensor([i for i, x in enumerate(groups) if x == grp])
        scores.append(u @ _unit(target[rows].mean(0)))
    out = torch.stack(scores).amax(0).double()
    if not bool(torch.isfinite(out).all()):
        raise PotstillError("LESS scores are not finite (NaN/inf gradients); check the model's dtype and loss")
    return out
