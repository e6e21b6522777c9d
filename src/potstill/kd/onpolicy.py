"""Learning from the student's own text: GKD (on-policy) and DistiLLM (adaptive off-policy).

``OnPolicyKDTrainer`` is ``KDTrainer`` with one change: before each optimizer step it may
replace the step's micro-batches (their prompts kept) by responses the student samples
itself, which the live teacher then scores with any divergence of the library.

* **GKD** (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes"): with probability ``lmbda`` a step trains on fresh student
  samples, otherwise on the fixed data. ``lmbda = 0`` is exactly off-policy KD (no random
  number is drawn from torch, no generation); ``lmbda = 1`` is fully on-policy.
* **DistiLLM** (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
  Language Models"): student generations go to a replay buffer and are reused across steps
  (``replay_size``, ``replay_reuse``), the loss is a skew KL (``skew_forward_kl`` /
  ``skew_reverse_kl`` from :mod:`potstill.divergences`), and the probability of training on
  student outputs is adaptive: it starts at ``lmbda`` and rises by ``adaptive_step`` (up to
  ``adaptive_max``) each time the validation loss, measured every ``adaptive_every`` steps,
  is higher than at the previous measurement.

The decision is taken per optimizer step in :meth:`get_batch_samples`, before the token
count of the step is taken, so the loss stays normalized by the real number of response
tokens across gradient accumulation and processes. On student batches the labels are the
student's own samples, so their cross-entropy term is left out (the step is pure divergence).
Generation temperature (``gen_temperature``) is a sampling parameter, separate from the
distillation ``temperature``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..data.packing import segments
from ..errors import PotstillError
from ..signals import OnlineTeacher
from .logit import KDConfig, KDTrainer

ROLLOUT = "_potstill_rollout"  # marker key of a batch of student samples (never reaches the model)


@dataclass
class OnPolicyConfig(KDConfig):
    """``KDConfig`` plus the on-policy (GKD) and adaptive off-policy (DistiLLM) options."""

    lmbda: float = field(
        default=0.5, metadata={"help": "GKD's lambda: probability that a step trains on student samples."}
    )
    gen_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the student's generations."})
    gen_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the student's generations."})
    gen_max_new_tokens: int = field(default=32, metadata={"help": "Length cap of the student's generations."})
    replay_size: int = field(default=0, metadata={"help": "DistiLLM replay buffer capacity in examples (0: none)."})
    replay_reuse: float = field(
        default=0.0, metadata={"help": "On a student step, probability of reusing the buffer instead of generating."}
    )
    adaptive: bool = field(
        default=False, metadata={"help": "DistiLLM: raise lmbda when the validation loss increases."}
    )
    adaptive_step: float = field(default=0.1, metadata={"help": "Increase of lmbda per validation-loss increase."})
    adaptive_max: float = field(default=1.0, metadata={"help": "Upper bound of the adaptive lmbda."})
    adaptive_every: int = field(default=10, metadata={"help": "Steps between validation-loss measurements."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("lmbda", "gen_top_p", "replay_reuse", "adaptive_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise PotstillError(f"{name}={v} is outside [0, 1]; it is a probability")
        if not self.gen_temperature > 0:
            raise PotstillError(f"gen_temperature={self.gen_temperature} must be > 0")
        if self.gen_max_new_tokens < 1:
            raise PotstillError(f"gen_max_new_tokens={self.gen_max_new_tokens} must be >= 1")
        if self.replay_size < 0:
            raise PotstillError(f"replay_size={self.replay_size} must be >= 0")
        if self.replay_reuse > 0 and self.replay_size == 0:
            raise PotstillError("replay_reuse > 0 needs a replay buffer; set replay_size >= 1")
        if self.adaptive and (self.adaptive_every < 1 or self.adaptive_step <= 0):
            raise PotstillError("adaptive needs adaptive_every >= 1 and adaptive_step > 0")
        if (self.lmbda > 0 or self.adaptive) and self.alpha >= 1.0:
            raise PotstillError(
                "on-policy steps are scored by the teacher only; set alpha < 1 (or lmbda 0 and adaptive off)"
            )


class OnPolicyKDTrainer(KDTrainer):
    """``KDTrainer`` that trains a share of its steps on the student's own samples.

    ``validation_dataset`` (encoded examples, needed when ``adaptive``) drives DistiLLM's
    schedule. ``vllm_options`` (``config.VLLMOptions``) samples with a vLLM engine instead of transformers'
    ``generate`` (:mod:`potstill.vllm_engine`): the student's weights are synced into it before a sampling
    step whenever an optimizer step changed them. After training, ``rollout_stats`` holds the number of generated tokens, the
    generation seconds and the modes of every step; ``lmbda_history`` the adaptive schedule.
    """

    config_class: type = OnPolicyConfig  # subclasses name their own
    samples_every_step = False  # subclasses that train on the student's samples at every step (lmbda unused)
    method = "on-policy distillation"

    def __init__(self, *args, validation_dataset=None, vllm_options=None, **kwargs):
        if not isinstance(kwargs.get("args", args[2] if len(args) > 2 else None), self.config_class):
            raise PotstillError(f"{type(self).__name__} needs args={self.config_class.__name__}(...)")
        src = kwargs.get("signal_source")
        if (
            self.samples_every_step
            and kwargs.get("teacher_model") is None
            and src is not None
            and not isinstance(src, OnlineTeacher)
        ):
            raise PotstillError(
                f"{self.method} needs a live teacher to score the student's samples; pass "
                "teacher_model=... (or an OnlineTeacher) instead of a teacher-signal cache"
            )
        super().__init__(*args, **kwargs)
        cfg: OnPolicyConfig = self.args
        uses_student = self.samples_every_step or cfg.lmbda > 0 or cfg.adaptive
        self._scorer = None
        if uses_student:
            src = self.signal_source
            if isinstance(src, OnlineTeacher):
                self._scorer = OnlineTeacher(src.model)  # no memo: samples never repeat
            else:
                raise PotstillError(
                    "on-policy distillation needs a live teacher to score the student's samples; "
                    "train without a teacher-signal cache (or set lmbda 0 and adaptive off)"
                )
        if cfg.adaptive and validation_dataset is None:
            raise PotstillError("adaptive (DistiLLM) needs validation_dataset=... for its validation loss")
        self.validation_dataset = validation_dataset
        self.lmbda = 1.0 if self.samples_every_step else cfg.lmbda
        self.lmbda_history: list[tuple[int, float, float | None]] = [(0, self.lmbda, None)]
        self._rng = random.Random(cfg.seed + 7919)
        self._buffer: deque = deque(maxlen=max(cfg.replay_size, 1))
        self._last_val: float | None = None
        self._last_val_step = 0
        self.rollout_stats = {"gen_tokens": 0, "gen_seconds": 0.0, "modes": []}
        self._vllm = None
        if vllm_options is not None and uses_student:
            if self._sampling_processor() is not None:
                raise PotstillError(
                    f"{self.method} mixes the teacher into the student's sampling, which runs on "
                    "generation.backend hf only; set generation.backend hf"
                )
            from ..vllm_engine import VLLMEngine

            self._vllm = VLLMEngine.from_options(
                self.accelerator.unwrap_model(self.model),
                self.processing_class,
                vllm_options,
                device=self.args.device,
                seed=cfg.seed,
                sync=True,
            )

    # -------------------------------------------------------------------------- checkpoints
    def potstill_state(self) -> dict:
        """What a resumed run needs beyond the Trainer's own checkpoint (JSON): the mode-choice RNG, the replay
        buffer, the adaptive schedule and the rollout counts (the sampling seed counts the steps' modes)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "buffer": list(self._buffer),
            "lmbda": self.lmbda,
            "lmbda_history": self.lmbda_history,
            "last_val": self._last_val,
            "last_val_step": self._last_val_step,
            "rollout_stats": self.rollout_stats,
        }

    def load_potstill_state(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._buffer.clear()
        self._buffer.extend(state["buffer"])
        self.lmbda = state["lmbda"]
        self.lmbda_history = [tuple(row) for row in state["lmbda_history"]]
        self._last_val, self._last_val_step = state["last_val"], state["last_val_step"]
        self.rollout_stats = state["rollout_stats"]

    # -------------------------------------------------------------------------- steps
    def choose_mode(self) -> str:
        """``"data"`` (fixed data), ``"student"`` (fresh samples) or ``"replay"`` (from the buffer)."""
        if self.lmbda <= 0.0 or self._rng.random() >= self.lmbda:
            return "data"
        cfg: OnPolicyConfig = self.args
        if cfg.replay_size > 0 and self._buffer and self._rng.random() < cfg.replay_reuse:
            return "replay"
        return "student"

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, num_items
        if self.args.adaptive:
            self._maybe_adapt()
        mode = self.choose_mode()
        self.rollout_stats["modes"].append(mode)
        if mode == "data":
            return batches, num_items
        new = [self._student_batch(b) if mode == "student" else self._replay_batch(len(segments(b))) for b in batches]
        return new, self._get_num_items_in_batch(new, device)

    def _collate(self, feats: list[dict]) -> dict:
        out = self.data_collator([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in feats])
        out[ROLLOUT] = True
        return out

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._vllm is not None:
                self._vllm.close()

    def _hf_samples(self, model, tok, prompts: list[list[int]], seed: int, device):
        """The student's samples through transformers' ``generate`` (sharded models gathered for it)."""
        from ..distributed import gathered_for_generation
        from ..generate import generate

        cfg: OnPolicyConfig = self.args
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), contextlib.ExitStack() as held:
            for m in self._sampling_models(model):  # sharded ones gathered once for the whole generation
                held.enter_context(gathered_for_generation(m))
            return generate(
                model,
                tok,
                prompts,
                max_new_tokens=cfg.gen_max_new_tokens,
                batch_size=len(prompts),
                do_sample=True,
                temperature=cfg.gen_temperature,
                top_p=cfg.gen_top_p,
                seed=seed,
                sort_by_length=False,
                progress=False,
                processor=self._sampling_processor(),
            )

    @torch.no_grad()
    def _student_batch(self, batch: dict) -> dict:
        cfg: OnPolicyConfig = self.args
        labels, ids = batch["labels"], batch["input_ids"]
        prompts = []
        for row, start, stop in segments(batch, collated_order=True):  # one per example, in the data's order
            resp = (labels[row, start:stop] != -100).nonzero()
            end = start + int(resp[0]) if resp.numel() else stop
            prompts.append(ids[row, start:end].tolist())
        model = self.accelerator.unwrap_model(self.model)
        tok = self.processing_class
        eos = tok.eos_token_id if tok is not None else None
        device = next(model.parameters()).device
        seed = cfg.seed * 1_000_003 + self.state.global_step * 101 + len(self.rollout_stats["modes"])
        t0 = time.perf_counter()
        if self._vllm is not None:  # every process syncs and samples (the engine is per process or one server)
            self._vllm.sync_weights(model, version=self.state.global_step)
            gen = self._vllm.generate(
                prompts,
                max_new_tokens=cfg.gen_max_new_tokens,
                do_sample=True,
                temperature=cfg.gen_temperature,
                top_p=cfg.gen_top_p,
                seed=seed,
            )
        else:
            gen = self._hf_samples(model, tok, prompts, seed, device)
        self.rollout_stats["gen_seconds"] += time.perf_counter() - t0
        self.rollout_stats["gen_tokens"] += gen.num_tokens
        feats = []
        stops = gen.stops or [None] * len(prompts)
        for p, g, stop in zip(prompts, gen.token_ids, stops):
            resp = list(g)
            if len(resp) < cfg.gen_max_new_tokens and (stop is not None or eos is not None):
                # it stopped on an EOS: the student learns where to stop too, on the id it sampled
                resp.append(int(stop if stop is not None else eos))
            if not resp:
                continue
            feats.append(
                {"input_ids": p + resp, "attention_mask": [1] * (len(p) + len(resp)), "labels": [-100] * len(p) + resp}
            )
        if not feats:
            raise PotstillError(
                "the student generated no token for a whole batch and the tokenizer has no EOS; "
                "set tokenizer.eos_token or raise gen_max_new_tokens"
            )
        if cfg.replay_size > 0:
            self._buffer.extend(feats)
        return self._collate(feats)

    def _sampling_processor(self):
        """A factory ``(ids, mask) -> logits processor`` for the student's sampling, or None (subclasses)."""
        return None

    def _sampling_models(self, student) -> list:
        """The models that run a forward per sampled token: the student (subclasses add a teacher that mixes
        into the sampling)."""
        return [student]

    def _replay_batch(self, n: int) -> dict:
        pool = list(self._buffer)
        return self._collate([pool[self._rng.randrange(len(pool))] for _ in range(n)])

    # ----------------------------------------------------------------- loss routing
    def teacher_sources(self) -> list:
        return [*super().teacher_sources(), self._scorer]  # the scorer of the student's samples

    def _batch_signal(self, inputs: dict, student=None):
        if inputs.get(ROLLOUT):
            return self._scorer.signal(inputs)
        return super()._batch_signal(inputs, student=student)

    def _batch_alpha(self, inputs: dict) -> float:
        return 0.0 if inputs.get(ROLLOUT) else super()._batch_alpha(inputs)

    # ------------------------------------------------------------- DistiLLM schedule
    def validation_loss(self) -> float:
        """Mean per-token distillation loss (teacher-forced, the recipe's divergence and alpha) on the validation set."""
        model = self.model
        was = model.training
        model.eval()
        stats = dict(self._stats)
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                rows = list(self.validation_dataset)
                for lo in range(0, len(rows), self.args.per_device_train_batch_size):
                    chunk = rows[lo : lo + self.args.per_device_train_batch_size]
                    batch = self._prepare_inputs(self.data_collator(chunk))
                    k = int((batch["labels"][:, 1:] != -100).sum())
                    total += float(self.compute_loss(model, batch, num_items_in_batch=max(k, 1))) * k
                    n += k
        finally:
            self._stats = stats
            model.train(was)
        return total / max(n, 1)

    def _maybe_adapt(self) -> None:
        cfg: OnPolicyConfig = self.args
        step = self.state.global_step
        if step == 0 or step % cfg.adaptive_every or step == self._last_val_step:
            return
        self._last_val_step = step
        val = self.validation_loss()
        if self._last_val is not None and val > self._last_val:
            self.lmbda = min(self.lmbda + cfg.adaptive_step, cfg.adaptive_max)
        self._last_val = val
        self.lmbda_history.append((step, self.lmbda, val))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            modes = self.rollout_stats["modes"]
            logs["student_step_share"] = round(sum(m != "data" for m in modes) / max(len(modes), 1), 4)
            logs["lmbda"] = self.lmbda
        super().log(logs, *args, **kwargs)
