"""MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024):
sequence-level reverse KL ``KL(q_theta || p)`` minimized by policy gradient on the student's samples.

Every step replaces the data's responses by samples for the same prompts, drawn from the
teacher-mixed distribution ``p_mix = mix * p + (1 - mix) * q_theta`` (the paper's teacher-mixed
sampling, ``mix = 0.2``). With ``r_t = log p(y_t | y_<t) - log q_theta(y_t | y_<t)`` and the
per-token importance weight ``w_t = q_theta(y_t) / p_mix(y_t)`` (the paper's single-token
approximation; it is at most ``1 / (1 - mix)``), the loss is::

    L = sum_t w_t * [ RKL_t(theta)  -  sg(R_{t+1}) * log q_theta(y_t | y_<t) ] / N

* ``RKL_t`` is the reverse KL of position ``t`` over the whole vocabulary: its gradient is
  the single-step part of the policy gradient, computed exactly instead of sampled.
* ``R_{t+1}`` is the return of the later tokens: the mean of ``r`` over ``t' > t`` with
  ``length_norm`` (the paper's length normalization), their sum without; 0 at the last token.
  Its term is the long-term part of the policy gradient (``long_term: false`` drops it).
* ``N`` is the number of sampled response tokens across the step's micro-batches and
  processes; ``w``, ``r`` and ``R`` are detached.

Each batch of samples is used for one update, so the policy ratio of the paper's PPO clipping
is 1 and the clip never acts; it is left out. So is the paper's language-modelling loss on a
pretraining corpus (``L_PT``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..divergences import chunked_kd_loss
from ..divergences.chunked import full_head, full_teacher
from ..errors import PotstillError
from ..models.head import cache_argument
from ..signals import apply_head, target_index, target_rows
from .adaptive import target_logprobs
from .onpolicy import ROLLOUT, OnPolicyConfig, OnPolicyKDTrainer


@dataclass
class MiniLLMConfig(OnPolicyConfig):
    """``OnPolicyConfig`` plus MiniLLM's options (``lmbda`` unused: every step is on samples)."""

    mix: float = field(default=0.2, metadata={"help": "Teacher share of the sampling distribution."})
    length_norm: bool = field(default=True, metadata={"help": "R_{t+1} as the mean, not the sum, of later rewards."})
    long_term: bool = field(default=True, metadata={"help": "Keep the policy-gradient term of later tokens."})

    def __post_init__(self):
        # checked before OnPolicyConfig's own checks, whose fixes (lmbda, adaptive) do not apply here
        if self.alpha != 0.0:
            raise PotstillError(
                f"MiniLLM trains on samples only, where CE has no target; set alpha 0 (got {self.alpha})"
            )
        if self.divergence != "reverse_kl":
            raise PotstillError(f"MiniLLM minimizes the reverse KL; set divergence reverse_kl (got {self.divergence})")
        if self.adaptive or self.replay_size:
            raise PotstillError(
                "MiniLLM's samples are on-policy (one update each); set adaptive false and replay_size 0"
            )
        if not 0.0 <= self.mix < 1.0:
            raise PotstillError(f"mix={self.mix} must be in [0, 1): the student keeps a share of the sampling")
        if self.token_weighting != "none":
            raise PotstillError("MiniLLM weighs tokens by its importance weights; set token_weighting 'none'")
        if self.gen_temperature != 1.0 or self.gen_top_p != 1.0:
            raise PotstillError(
                "MiniLLM's importance weights assume samples from the plain teacher-student mixture; "
                f"set gen_temperature 1 and gen_top_p 1 (got {self.gen_temperature}, {self.gen_top_p})"
            )
        if self.temperature != 1.0 or self.temperature_end is not None:
            raise PotstillError(
                "MiniLLM's rewards and reverse KL are at temperature 1; set temperature 1 and no temperature schedule"
            )
        super().__post_init__()


class TeacherMix:
    """A ``transformers`` logits processor that turns the student's next-token logits into
    ``log(mix * p + (1 - mix) * q)``: sampling from its softmax draws from the teacher-mixed
    distribution. The teacher follows the batch with its own KV cache (left padding: the
    position ids count the real tokens). Tokens past ``vocab`` get probability 0.
    """

    def __init__(self, teacher, mix: float, mask: torch.Tensor, vocab: int):
        self.teacher, self.mix, self.mask, self.vocab = teacher.eval(), float(mix), mask, int(vocab)
        self.cache = None
        self.seen = 0  # tokens of each row the teacher has read

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            new, mask = input_ids, self.mask
        else:
            new = input_ids[:, self.seen :]
            mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
        name = cache_argument(self.teacher)  # the name this transformers gives the key/value cache
        out = self.teacher(
            input_ids=new,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{name: self.cache},
        )  # the prefill needs the last position only
        self.cache, self.mask, self.seen = getattr(out, name), mask, input_ids.shape[1]
        v = self.vocab
        lp = out.logits[:, -1, :v].float().log_softmax(-1)
        lq = scores[:, :v].float().log_softmax(-1)
        if self.mix == 0.0:
            mixed = lq
        else:
            mixed = torch.logaddexp(lp + math.log(self.mix), lq + math.log1p(-self.mix))
        full = torch.full(scores.shape, float("-inf"), dtype=torch.float32, device=scores.device)
        full[:, :v] = mixed
        return full.to(scores.dtype)


def later_returns(r: torch.Tensor, seq: torch.Tensor, length_norm: bool) -> torch.Tensor:
    """``R_{t+1}`` per row: the sum (or mean) of ``r`` over the later rows of the same sequence.

    ``r [n]`` per-token rewards, ``seq [n]`` non-decreasing sequence ids (rows of a sequence
    contiguous, in order). Returns ``[n]``; 0 at each sequence's last row.
    """
    n = r.shape[0]
    if n == 0:
        return r
    c = r.double().cumsum(0)  # float64: one running sum over every row of the micro-batch
    idx = torch.arange(n, device=r.device)
    last = torch.zeros(int(seq.max()) + 1, dtype=torch.long, device=r.device).scatter_reduce(
        0, seq, idx, reduce="amax", include_self=False
    )[seq]
    out = c[last] - c
    if length_norm:
        after = (last - idx).double()
        out = torch.where(after > 0, out / after.clamp(min=1), torch.zeros_like(out))
    return out.to(r.dtype)


def _chunk_nll(h: torch.Tensor, weight, bias, targets: torch.Tensor, coef: torch.Tensor, scale, softcap):
    logits = apply_head(h, weight, bias, scale, softcap).float()
    return -(logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1) * coef).sum()


def weighted_nll(rows: torch.Tensor, head, targets: torch.Tensor, coef: torch.Tensor, vocab: int, chunk: int):
    """``sum_i coef_i * (-log q(targets_i))`` over rows, ``chunk`` rows at a time; each chunk's
    ``[chunk, V]`` logits are recomputed in backward (checkpointing), never held for all rows."""
    weight, bias = head.with_vocab(vocab).sliced()
    total = rows.new_zeros((), dtype=torch.float32)
    for lo in range(0, rows.shape[0], chunk):
        hi = min(lo + chunk, rows.shape[0])
        total = total + checkpoint(
            _chunk_nll,
            rows[lo:hi],
            weight,
            bias,
            targets[lo:hi],
            coef[lo:hi],
            head.logit_scale,
            head.softcap,
            use_reentrant=False,
        )
    return total


def _has_active_dropout(model) -> bool:
    return model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class MiniLLMKDTrainer(OnPolicyKDTrainer):
    """MiniLLM: every step on teacher-mixed samples, single-step reverse KL + long-term policy gradient.

    After training, ``minillm_stats`` holds the mean importance weight and mean reward per logged interval.
    """

    config_class = MiniLLMConfig
    samples_every_step = True
    method = "MiniLLM"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.minillm_stats: list[tuple[int, float, float]] = []
        self._acc = {"w": 0.0, "r": 0.0, "n": 0}

    def potstill_state(self) -> dict:
        """The on-policy state plus the importance-weight and reward statistics (logged interval and history)."""
        return {**super().potstill_state(), "minillm_stats": self.minillm_stats, "acc": self._acc}

    def load_potstill_state(self, state: dict) -> None:
        super().load_potstill_state(state)
        self.minillm_stats = [tuple(row) for row in state["minillm_stats"]]
        self._acc = dict(state["acc"])

    def choose_mode(self) -> str:
        return "student"

    def _sampling_processor(self):
        teacher = self._scorer.model
        vocab = self._vocab()
        return lambda ids, mask: TeacherMix(teacher, self.args.mix, mask, vocab)

    def _sampling_models(self, student) -> list:
        return [student, self._scorer.model]  # the teacher runs once per sampled token too (TeacherMix)

    def _vocab(self) -> int:
        from ..models import output_head

        if self.vocab_size is not None:
            return int(self.vocab_size)
        return min(output_head(self.accelerator.unwrap_model(self.model)).vocab, self._scorer.vocab_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not inputs.get(ROLLOUT):  # e.g. a validation pass on plain data
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from ..models import output_head

        cfg: MiniLLMConfig = self.args
        labels = inputs["labels"]
        index = target_index(labels)
        rows = target_rows(self._student_hidden(model, inputs), index)
        self._count_slots(model, inputs)
        targets = labels[:, 1:].reshape(-1).index_select(0, index)
        # Sharded heads (FSDP2 / ZeRO-3) whole, once per step: the log-probs below read them directly.
        signal = full_teacher(self._scorer.signal(inputs), 0.0)
        head = full_head(output_head(model))
        vocab = self._vocab()
        normalizer = num_items_in_batch if num_items_in_batch is not None else max(int(index.numel()), 1)
        with torch.no_grad():
            # w and r belong to the policy that sampled: eval mode, where dropout is off
            src = (
                rows.detach()
                if not _has_active_dropout(model)
                else target_rows(self._eval_hidden(model, inputs), index)
            )
            lq = target_logprobs(lambda a, b: head(src[a:b])[..., :vocab], rows.shape[0], targets, cfg.chunk_size)
            lp = target_logprobs(lambda a, b: signal.chunk_logits(a, b, vocab), rows.shape[0], targets, cfg.chunk_size)
            r = lp - lq
            # w = q / (mix p + (1 - mix) q), in log space
            w = (
                (lq - torch.logaddexp(lp + math.log(cfg.mix), lq + math.log1p(-cfg.mix))).exp()
                if cfg.mix > 0
                else torch.ones_like(lq)
            )
        loss, stats = chunked_kd_loss(
            rows,
            head,
            targets,
            signal,
            divergence="reverse_kl",
            alpha=0.0,
            temperature=self._temperature(),
            scale_t2=cfg.scale_t2,
            normalizer=normalizer,
            chunk_size=cfg.chunk_size,
            vocab_size=self.vocab_size,
            kd_weights=w,
        )
        if cfg.long_term and rows.shape[0]:
            seq = torch.div(index, labels.shape[1] - 1, rounding_mode="floor")
            coef = w * later_returns(r, seq, cfg.length_norm)
            norm = torch.as_tensor(normalizer, dtype=torch.float32, device=rows.device).clamp(min=1)
            loss = loss + weighted_nll(rows, head, targets, coef, vocab, cfg.chunk_size) / norm
        if num_items_in_batch is not None and cfg.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        for k in ("ce_sum", "kd_sum", "n_tokens"):
            self._stats[k] += float(stats[k])
        self._acc["w"] += float(w.sum())
        self._acc["r"] += float(r.sum())
        self._acc["n"] += int(r.numel())
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    @torch.no_grad()
    def _eval_hidden(self, model, inputs):
        was = model.training
        model.eval()
        try:
            return self._student_hidden(model, inputs)
        finally:
            model.train(was)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._acc["n"]:
            a = self._acc
            logs["importance_weight"] = round(a["w"] / a["n"], 6)
            logs["reward_per_token"] = round(a["r"] / a["n"], 6)
            self.minillm_stats.append((int(self.state.global_step), a["w"] / a["n"], a["r"] / a["n"]))
            self._acc = {"w": 0.0, "r": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)
