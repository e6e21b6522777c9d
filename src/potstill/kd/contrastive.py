"""DistiLLM-2's contrastive distillation (Ko et al. 2025, "DistiLLM-2: A Contrastive Approach
Boosts the Distillation of LLMs", ICML 2025).

Every optimizer step pairs each micro-batch of the data (the teacher's responses) with
responses the student samples for the same prompts, and trains on both in one forward:

    L = (2 - beta) * sum_{data tokens} D_data(p, q) / N_data
        +     beta * sum_{student tokens} D_student(p, q) / N_student

``D_data`` is the run's divergence; DistiLLM-2 sets it to the skew forward KL
``KL(p || a p + (1 - a) q)``, which raises the likelihood of the teacher's responses.
``D_student`` is ``student_divergence``, by default the skew reverse KL
``KL(q || a q + (1 - a) p)`` that lowers the student's own responses where the teacher
disagrees. ``N_data`` and ``N_student`` count each side's response tokens across the
micro-batches of the step and the processes, so gradient accumulation gives the gradients
of one big batch on each side. ``beta_end`` ramps ``beta`` linearly over the first half of
training (the paper: 1 -> 1.5). A CE term (``alpha``) applies to the data side only.

``adaptive_skew`` is the paper's curriculum on the skew coefficient. Per sequence, with
``p_bar = exp(mean_t log p(y_t))`` and ``q_bar = exp(mean_t log q(y_t))`` over its response
tokens (temperature 1, no gradient) and the gap ``g = p_bar - q_bar`` on the data side
(``q_bar - p_bar`` on the student side)::

    a_i = clip(1 - c / g_i, 0.01, a_0)   (a_0 where g_i <= 0)

with ``a_0`` the divergence's own alpha and ``c = (1 - a_0) * mean(g)`` of the side's first
micro-batch, then frozen. The mixture's sentence-level gap to the target side,
``(1 - a_i) g_i``, is then held at ``c``: sequences the student is far from keep the full
skew ``a_0``, near ones get less (closer to the plain KL).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..divergences import DIVERGENCES, chunked_kd_loss
from ..errors import PotstillError
from ..signals import DenseSignal, target_index, target_rows
from .adaptive import target_logprobs
from .logit import checked_params
from .onpolicy import ROLLOUT, OnPolicyConfig, OnPolicyKDTrainer

_STUDENT = "_potstill_student_batch"  # the student's samples paired with a data micro-batch
_N_DATA, _N_STUDENT = "_potstill_n_data", "_potstill_n_student"
_SKEWS = ("skew_forward_kl", "skew_reverse_kl")
ALPHA_MIN = 0.01


@dataclass
class ContrastiveConfig(OnPolicyConfig):
    """``OnPolicyConfig`` plus DistiLLM-2's pairing of data and student samples (``lmbda`` unused)."""

    student_divergence: str = field(
        default="skew_reverse_kl", metadata={"help": "Divergence on the student's samples."}
    )
    student_divergence_kwargs: dict | None = field(default=None, metadata={"help": "Its parameters (alpha...)."})
    beta: float = field(default=1.0, metadata={"help": "Loss = (2 - beta) data term + beta student term."})
    beta_end: float | None = field(default=None, metadata={"help": "beta ramps to this over the first half."})
    adaptive_skew: bool = field(default=False, metadata={"help": "Per-sequence skew alpha (DistiLLM-2 curriculum)."})

    def __post_init__(self):
        # checked first: OnPolicyConfig's own messages would name fixes (lmbda, adaptive) that do not apply here
        if self.alpha >= 1.0:
            raise PotstillError("contrastive steps are scored by the teacher; set alpha < 1")
        if self.adaptive:
            raise PotstillError("contrastive trains every step on both sides; set adaptive false")
        if self.token_weighting != "none":
            raise PotstillError("contrastive does not apply token_weighting yet; set token_weighting 'none'")
        super().__post_init__()
        if self.student_divergence not in DIVERGENCES:
            raise PotstillError(
                f"unknown student_divergence '{self.student_divergence}'; use one of {sorted(DIVERGENCES)}"
            )
        checked_params(self.student_divergence, self.student_divergence_kwargs)
        for name in ("beta", "beta_end"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 2.0:
                raise PotstillError(f"{name}={v} is outside [0, 2]; the loss is (2 - beta) data + beta student")
        if self.adaptive_skew and (self.divergence not in _SKEWS or self.student_divergence not in _SKEWS):
            raise PotstillError(
                f"adaptive_skew needs skew divergences on both sides, got {self.divergence} and "
                f"{self.student_divergence}; use {' or '.join(_SKEWS)} or set adaptive_skew false"
            )


def sequence_skew(gap: torch.Tensor, anchor: float, cap: float) -> torch.Tensor:
    """Per-sequence skew ``clip(1 - anchor / gap, 0.01, cap)``, ``cap`` where ``gap <= 0``: ``[S] -> [S]``."""
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    a = (1.0 - anchor / safe).clamp(min=ALPHA_MIN, max=cap)
    return torch.where(gap > 0, a, torch.full_like(gap, cap))


class ContrastiveKDTrainer(OnPolicyKDTrainer):
    """DistiLLM-2: ``OnPolicyKDTrainer`` whose every step trains on the data and on the student's samples.

    The data side may come from any signal source; the student side needs the live teacher.
    After training, ``skew_history`` holds ``(step, mean data alpha, mean student alpha)`` of
    each logged interval when ``adaptive_skew`` is on; ``anchors`` the frozen ``c`` per side.
    """

    config_class = ContrastiveConfig
    samples_every_step = True
    method = "contrastive distillation (DistiLLM-2)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_beta = self.args.beta
        self.anchors: dict[str, float | None] = {"data": None, "student": None}
        self.skew_history: list[tuple[int, float, float]] = []
        self._skew_sums = {"data": 0.0, "student": 0.0, "n_data": 0, "n_student": 0}
        self._side_stats = {"data_kd": 0.0, "data_n": 0.0, "student_kd": 0.0, "student_n": 0.0}

    # ---------------------------------------------------------------------- checkpoints
    def potstill_state(self) -> dict:
        """The on-policy state plus DistiLLM-2's own: the frozen skew anchors (they set every later step's
        skews), the skew and per-side sums of the interval being logged, and the skew history."""
        return {
            **super().potstill_state(),
            "anchors": self.anchors,
            "skew_history": self.skew_history,
            "skew_sums": self._skew_sums,
            "side_stats": self._side_stats,
            "last_beta": self._last_beta,
        }

    def load_potstill_state(self, state: dict) -> None:
        super().load_potstill_state(state)
        self.anchors = dict(state["anchors"])
        self.skew_history = [tuple(row) for row in state["skew_history"]]
        self._skew_sums, self._side_stats = dict(state["skew_sums"]), dict(state["side_stats"])
        self._last_beta = state["last_beta"]

    # ---------------------------------------------------------------------- steps
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super(OnPolicyKDTrainer, self).get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        cfg: ContrastiveConfig = self.args
        student, fresh = [], False
        for b in batches:
            replay = cfg.replay_size > 0 and self._buffer and self._rng.random() < cfg.replay_reuse
            fresh = fresh or not replay
            student.append(self._replay_batch(len(b["input_ids"])) if replay else self._student_batch(b))
        self.rollout_stats["modes"].append("student" if fresh else "replay")  # one entry per step
        n_data = self._get_num_items_in_batch(batches, device)
        n_student = self._get_num_items_in_batch(student, device)
        paired = []
        for b, s in zip(batches, student):
            b = dict(b)
            b[_STUDENT], b[_N_DATA], b[_N_STUDENT] = s, n_data, n_student
            paired.append(b)
        return paired, n_data + n_student

    def _beta(self) -> float:
        cfg: ContrastiveConfig = self.args
        if cfg.beta_end is None:
            return cfg.beta
        return cfg.beta + (cfg.beta_end - cfg.beta) * min(1.0, 2.0 * self._progress())

    # ----------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if _STUDENT not in inputs:  # e.g. a teacher-forced validation pass on plain data
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from ..models import output_head

        cfg: ContrastiveConfig = self.args
        student = {k: v for k, v in inputs[_STUDENT].items() if k != ROLLOUT}
        data = {k: v for k, v in inputs.items() if not k.startswith("_potstill")}
        hidden_d, hidden_s = self._paired_hidden(model, data, student)
        self._count_slots(model, data, student)
        head = output_head(model)
        beta = self._last_beta = self._beta()
        alpha_ce = self._batch_alpha(data)
        sides = (
            (
                "data",
                hidden_d,
                data,
                self._batch_signal(data) if alpha_ce < 1.0 else None,
                cfg.divergence,
                cfg.divergence_kwargs,
                alpha_ce,
                inputs[_N_DATA],
                2.0 - beta,
            ),
            (
                "student",
                hidden_s,
                student,
                self._scorer.signal(student),
                cfg.student_divergence,
                cfg.student_divergence_kwargs,
                0.0,
                inputs[_N_STUDENT],
                beta,
            ),
        )
        loss = None
        for name, hidden, batch, signal, div, kwargs, a_ce, n, weight in sides:
            part = self._side_loss(name, head, hidden, batch, signal, div, dict(kwargs or {}), a_ce, n)
            part = part * weight
            loss = part if loss is None else loss + part
        if num_items_in_batch is not None and cfg.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages; each side is divided by its global count
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    def _paired_hidden(self, model, data: dict, student: dict):
        """One forward over both sides (one DDP forward per backward), right-padded to a common length."""
        ids_d, ids_s = data["input_ids"], student["input_ids"]
        t = max(ids_d.shape[1], ids_s.shape[1])
        pad = self.data_collator.pad_token_id if hasattr(self.data_collator, "pad_token_id") else 0

        def widen(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

        both = {
            "input_ids": torch.cat([widen(ids_d, pad), widen(ids_s, pad)]),
            "attention_mask": torch.cat([widen(data["attention_mask"], 0), widen(student["attention_mask"], 0)]),
        }
        hidden = self._student_hidden(model, both)
        b = ids_d.shape[0]
        return hidden[:b, : ids_d.shape[1]], hidden[b:, : ids_s.shape[1]]

    def _side_loss(self, name, head, hidden, batch, signal, divergence, kwargs, alpha_ce, n_items):
        labels = batch["labels"]
        index = target_index(labels)
        rows = target_rows(hidden, index)
        targets = labels[:, 1:].reshape(-1).index_select(0, index)
        if signal is not None and signal.num_rows != rows.shape[0]:
            raise PotstillError(
                f"teacher signal has {signal.num_rows} rows for {rows.shape[0]} target tokens on the "
                f"{name} side; the signal does not match this batch (rebuild the cache for this data)"
            )
        normalizer = n_items if int(n_items) > 0 else 1
        common = dict(
            alpha=alpha_ce,
            temperature=self._temperature(),
            scale_t2=self.args.scale_t2,
            normalizer=normalizer,
            chunk_size=self.args.chunk_size,
            vocab_size=self.vocab_size,
        )
        per_row = None
        cap = float(kwargs.get("alpha", 0.1))
        if self.args.adaptive_skew and signal is not None and rows.shape[0]:
            # one skew per sequence, given to each of its rows
            seq = torch.div(index, labels.shape[1] - 1, rounding_mode="floor")
            alphas = self._sequence_alphas(name, head, rows, targets, signal, seq, cap)
            per_row = {"alpha": alphas[seq]}
        elif self.args.adaptive_skew and signal is not None:  # no rows here, but the anchor's reduce needs everyone
            self._set_anchor(name, torch.zeros(2, device=rows.device), cap)
        loss, stats = chunked_kd_loss(
            rows,
            head,
            targets,
            signal,
            divergence=divergence,
            divergence_kwargs=kwargs,
            row_divergence_kwargs=per_row,
            **common,
        )
        self._count(name, stats)
        return loss

    @torch.no_grad()
    def _sequence_alphas(self, name, head, rows, targets, signal, seq, cap: float) -> torch.Tensor:
        if not isinstance(signal, DenseSignal):
            raise PotstillError(
                "adaptive_skew needs the teacher's full distribution (a live teacher or a dense "
                "cache); a top-k cache may not hold the response's tokens; set adaptive_skew false"
            )
        vocab = self.vocab_size if self.vocab_size is not None else head.vocab
        if targets.numel() and int(targets.max()) >= vocab:
            raise PotstillError(
                f"label id {int(targets.max())} is outside the compared vocabulary ({vocab} rows); "
                "the samples or labels use tokens the teacher does not have"
            )
        chunk = self.args.chunk_size
        n = rows.shape[0]
        lq = target_logprobs(lambda a, b: head(rows[a:b])[..., :vocab], n, targets, chunk)
        lp = target_logprobs(lambda a, b: signal.chunk_logits(a, b, vocab), n, targets, chunk)
        s = int(seq.max()) + 1
        cnt = torch.bincount(seq, minlength=s).clamp(min=1).float()
        mean_p = torch.zeros(s, device=rows.device).index_add_(0, seq, lp) / cnt
        mean_q = torch.zeros(s, device=rows.device).index_add_(0, seq, lq) / cnt
        present = torch.bincount(seq, minlength=s) > 0
        gap = mean_p.exp() - mean_q.exp() if name == "data" else mean_q.exp() - mean_p.exp()
        self._set_anchor(name, torch.stack([gap[present].sum(), present.sum().to(gap.dtype)]).float(), cap)
        alphas = sequence_skew(gap, self.anchors[name], cap)
        self._skew_sums[name] += float(alphas[present].sum())
        self._skew_sums[f"n_{name}"] += int(present.sum())
        return alphas

    def _set_anchor(self, name: str, local: torch.Tensor, cap: float) -> None:
        """The anchor: the mean gap over the sequences of the first micro-batch that has any, on all processes.

        ``local`` is this process's ``[sum of gaps, number of sequences]`` (zeros when it has no rows). Every
        process takes part in the reduce, also one with no rows in this micro-batch: skipping it would
        leave the others waiting in a collective that never completes. While no process has a sequence,
        the anchor stays unset and the next micro-batch sets it."""
        if self.anchors[name] is not None:
            return
        total = local
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(local, reduction="sum")
        if float(total[1]) == 0:
            return
        mean = float(total[0] / total[1])
        self.anchors[name] = (1.0 - cap) * mean
        if mean <= 0:
            warnings.warn(
                f"adaptive_skew: the student is not behind the teacher on the first {name} batch "
                f"(mean gap {mean:.3g}); every sequence keeps the full skew {cap}",
                stacklevel=2,
            )

    def _count(self, name: str, stats: dict) -> None:
        if name == "data":  # ce_per_token / kd_per_token: the data side (CE on the student's own samples is moot)
            for k in ("ce_sum", "kd_sum", "n_tokens"):
                self._stats[k] += float(stats[k])
        self._side_stats[f"{name}_kd"] += float(stats["kd_sum"])
        self._side_stats[f"{name}_n"] += float(stats["n_tokens"])

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            st = self._side_stats
            for side in ("data", "student"):
                if st[f"{side}_n"] > 0:
                    logs[f"kd_per_token_{side}"] = round(st[f"{side}_kd"] / st[f"{side}_n"], 6)
            self._side_stats = {k: 0.0 for k in st}
            logs["beta"] = round(self._last_beta, 6)  # the one the interval's last step trained with
            if self.args.adaptive_skew:
                sk = self._skew_sums
                mean = [sk[s] / sk[f"n_{s}"] if sk[f"n_{s}"] else float("nan") for s in ("data", "student")]
                logs["skew_alpha_data"], logs["skew_alpha_student"] = (round(m, 6) for m in mean)
                self.skew_history.append((int(self.state.global_step), mean[0], mean[1]))
                self._skew_sums = {"data": 0.0, "student": 0.0, "n_data": 0, "n_student": 0}
        super().log(logs, *args, **kwargs)
