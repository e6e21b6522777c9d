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
hidden dimension and the real tokens of the batch. :func:`potstill.runners.classify.run` compares a
fine-tuned teacher, the KD student and a student trained without the teacher (same init,
steps and seed) on accuracy, F1, calibration, parameters and latency.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.classification import Example
from ..divergences import forward_kl
from ..errors import PotstillError
from ..eval.cls_metrics import classification_metrics
from ..models.classifier import (
    ClassifierOutput,
    TextClassifier,
    by_length,
    classifier_pad_id,
    collate_ids,
    encode_examples,
    model_device,
)
from ..models.student import select_layers
from ..schedule import reshuffled_batches, warmup_adamw
from .guards import check_finite

__all__ = [
    "TrainLog",
    "default_layer_map",
    "evaluate_classifier",
    "latency",
    "masked_hidden_mse",
    "predict_proba",
    "soft_label_kd",
    "student_from_layers",
    "student_narrow",
    "train_classifier",
]


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
    input_ids, mask = collate_ids(ids, pad_id, device)
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


def _check_train_args(
    model: TextClassifier, n: int, teacher, alpha, temperature, hidden_weight, steps, batch_size, soft_labels
) -> tuple[bool, bool, bool]:
    """``(use_kd, use_hidden, need_teacher)`` of a :func:`train_classifier` call, its arguments checked."""
    if not 0.0 <= alpha <= 1.0:
        raise PotstillError(f"alpha={alpha} must be in [0, 1] (1: hard labels only)")
    if temperature <= 0 or hidden_weight < 0 or steps < 1 or batch_size < 1:
        raise PotstillError(
            f"need temperature > 0, hidden_weight >= 0, steps >= 1, batch_size >= 1; got "
            f"{temperature}, {hidden_weight}, {steps}, {batch_size}"
        )
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
    return use_kd, use_hidden, need_teacher


def _layer_pairs(model: TextClassifier, teacher, layer_map) -> list[tuple[int, int]]:
    """The hidden-state pairs ``(student, teacher)`` of the MSE term, checked against both models' depths."""
    pairs = [tuple(p) for p in (layer_map if layer_map is not None else default_layer_map(model, teacher))]
    for s, t in pairs:
        if not (0 <= s <= model.num_layers and 0 <= t <= teacher.num_layers):
            raise PotstillError(
                f"layer_map pair ({s}, {t}) is out of range; student hidden states are "
                f"0..{model.num_layers}, teacher 0..{teacher.num_layers} (0 = embeddings)"
            )
    return pairs


def _cache_teacher(
    teacher: TextClassifier, ids, pad: int, num_labels: int, pairs, use_hidden: bool, log: TrainLog
) -> tuple[Tensor, dict[int, list[Tensor]]]:
    """One teacher pass over the examples: logits ``[N, C]`` and the mapped hidden states (``[len_i, Dt]`` each)."""
    n = len(ids)
    cached = torch.zeros(n, num_labels)
    t_hidden: dict[int, list[Tensor]] = {t: [None] * n for _, t in pairs}
    for idx in by_length(ids, 64):
        out = _teacher_forward(teacher, [ids[i] for i in idx], pad, model_device(teacher), use_hidden)
        log.teacher_calls += 1
        cached[idx] = out.logits.float().cpu()
        for t in t_hidden:
            for row, i in enumerate(idx):
                t_hidden[t][i] = out.hidden_states[t][row, : len(ids[i])].float().cpu()
    return cached, t_hidden


@dataclass
class _KDTerms:
    """What one training batch's loss needs besides the student (see :func:`train_classifier`)."""

    teacher: TextClassifier | None
    labels: Tensor
    alpha: float
    temperature: float
    hidden_weight: float
    pairs: list
    t_logits: Tensor | None
    t_hidden: dict
    live_teacher: bool
    projection: nn.Module | None


def _batch_loss(model: TextClassifier, k: _KDTerms, ids, idx: list[int], pad: int, device, log: TrainLog):
    """``(loss, ce, kd, hidden)`` of one batch (rows ``idx`` of the tokenized examples)."""
    use_kd, use_hidden = k.alpha < 1.0, k.hidden_weight > 0.0
    batch_ids = [ids[i] for i in idx]
    input_ids, mask = collate_ids(batch_ids, pad, device)
    out = model(input_ids, mask, output_hidden_states=use_hidden)
    live = None
    if k.live_teacher:
        live = _teacher_forward(k.teacher, batch_ids, pad, model_device(k.teacher), use_hidden)
        log.teacher_calls += 1
    zero = out.logits.new_zeros(())
    ce = F.cross_entropy(out.logits, k.labels[idx].to(device)) if k.alpha > 0 else zero
    kd = zero
    if use_kd:
        tl = k.t_logits[idx] if k.t_logits is not None else live.logits
        kd = soft_label_kd(out.logits, tl.to(device), temperature=k.temperature).mean()
    hid = zero
    if use_hidden:
        for s, t in k.pairs:
            if live is not None:
                th = live.hidden_states[t]
            else:
                th = nn.utils.rnn.pad_sequence([k.t_hidden[t][i] for i in idx], batch_first=True).to(device)
            hid = hid + masked_hidden_mse(out.hidden_states[s], th, mask, k.projection)
        hid = hid / len(k.pairs)
    return k.alpha * ce + (1 - k.alpha) * kd + k.hidden_weight * hid, ce, kd, hid


def _labels(examples: Sequence[Example], num_labels: int) -> Tensor:
    """The examples' labels ``[N]``, each checked to be a class of the model."""
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    if labels.min() < 0 or labels.max() >= num_labels:
        raise PotstillError(f"labels must be in 0..{num_labels - 1}; got {labels.min()}..{labels.max()}")
    return labels


def _projection(d_student: int, d_teacher: int, seed: int, device) -> nn.Module:
    """TinyBERT's learned ``W_h`` (``Ds -> Dt``), seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(d_student, d_teacher).to(device)


def _kd_terms(
    model, teacher, ids, pad, labels, log, alpha, temperature, hidden_weight, pairs, soft_labels, cache_teacher
) -> _KDTerms:
    """The teacher side of the loss: soft targets (``soft_labels`` or the teacher's cached logits), cached
    hidden states, or a live teacher run on every batch; the teacher is put in eval mode."""
    n, use_kd, use_hidden = len(ids), alpha < 1.0, hidden_weight > 0.0
    need_teacher = use_hidden or (use_kd and soft_labels is None)
    t_logits = _soft_targets(soft_labels, n, model.num_labels) if use_kd and soft_labels is not None else None
    t_hidden: dict[int, list[Tensor]] = {}
    if need_teacher:
        teacher.eval()
    if need_teacher and cache_teacher:
        cached, t_hidden = _cache_teacher(teacher, ids, pad, model.num_labels, pairs, use_hidden, log)
        if t_logits is None and use_kd:
            t_logits = cached
    live = need_teacher and not cache_teacher
    return _KDTerms(teacher, labels, alpha, temperature, hidden_weight, pairs, t_logits, t_hidden, live, log.projection)


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
    n = len(train_examples)
    use_kd, use_hidden, need_teacher = _check_train_args(
        model, n, teacher, alpha, temperature, hidden_weight, steps, batch_size, soft_labels
    )
    device = model_device(model)
    pad = classifier_pad_id(model)
    ids = encode_examples(model.tokenizer, train_examples, max_length)
    labels = _labels(train_examples, model.num_labels)
    pairs = _layer_pairs(model, teacher, layer_map) if use_hidden else []
    log = TrainLog()
    if use_hidden and model.hidden_size != teacher.hidden_size:
        log.projection = _projection(model.hidden_size, teacher.hidden_size, seed, device)

    was_training = teacher.training if need_teacher else False
    terms = _kd_terms(
        model, teacher, ids, pad, labels, log, alpha, temperature, hidden_weight, pairs, soft_labels, cache_teacher
    )

    params = list(model.parameters()) + (list(log.projection.parameters()) if log.projection else [])
    opt, sched = warmup_adamw(params, lr, weight_decay, steps, warmup_fraction)
    start = time.perf_counter()
    batches = reshuffled_batches(n, batch_size, seed)
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(steps):
            idx = next(batches)
            loss, ce, kd, hid = _batch_loss(model, terms, ids, idx, pad, device, log)
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
    ids = encode_examples(model.tokenizer, examples, max_length)
    probs = torch.zeros(len(ids), model.num_labels)
    was = model.training
    model.eval()
    for idx in by_length(ids, batch_size):
        input_ids, mask = collate_ids([ids[i] for i in idx], classifier_pad_id(model), model_device(model))
        with torch.no_grad():
            probs[idx] = torch.softmax(model(input_ids, mask).logits.float(), -1).cpu()
    model.train(was)
    return probs


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
    input_ids, mask = collate_ids(
        encode_examples(model.tokenizer, batch, max_length), classifier_pad_id(model), model_device(model)
    )
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
