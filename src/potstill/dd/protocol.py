"""The evaluation protocol for a distilled or selected training set: one fixed learner, fixed steps.

A set is judged by the held-out accuracy of a learner trained on it and nothing else
(Wang et al. 2018, "Dataset Distillation"; DiLM, Maekawa et al. 2024, Sec. 5, trains BERT
on each synthetic set for a fixed number of steps and reports mean +- std over learners).
Every arm gets the *same* learner, steps, optimizer, batch size and seeds; only the data differ.

The learner is a :class:`SplitLearner`: a frozen ``prefix`` (run once per set, without
gradients, so its outputs are cached as :class:`Features`) and a trainable ``top`` built
fresh for every seed. :meth:`SplitLearner.from_classifier` cuts potstill's MiniLM classifier
(:class:`potstill.kd.classifier.TextClassifier`: encoder + mean pooling + linear head) after
layer ``L - trainable_layers``: the top is the last ``trainable_layers`` encoder layers (a
fresh copy of the pretrained weights) + mean pooling + dropout + a fresh linear head. With
``trainable_layers = L`` it is plain fine-tuning (only the embeddings are cached); fewer
trainable layers is what makes hundreds of learners affordable on a CPU.

Inputs of every kind reach the learner through the same prefix: text (tokenized), a
:class:`~potstill.dd.condense.CondensedSet` in embedding space (``inputs_embeds``), or
already computed :class:`Features`. Targets are hard labels (cross-entropy) or soft labels
(cross-entropy to a probability vector per example, e.g. a teacher's predictions: KD with
``alpha = 0, T = 1``, Hinton et al. 2015). One-hot soft labels give the same training as hard.

:func:`evaluate_set` trains one learner and returns its metrics; :func:`compare_arms`
aggregates several sets per arm into mean +- std, the gain over the random-subset arm and
the construction time.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.classification import Example
from ..errors import PotstillError
from ..schedule import reshuffled_batches, warmup_adamw
from .condense import soft_cross_entropy
from .condensed_set import CondensedSet

SCHEDULES = ("linear", "cosine")  # the learning-rate schedules of :func:`train_top`

__all__ = [
    "SCHEDULES",
    "Features",
    "SplitLearner",
    "compare_arms",
    "evaluate_features",
    "evaluate_set",
    "mean_std",
    "predict_features",
    "train_top",
]


@dataclass
class Features:
    """Prefix outputs of ``N`` examples: ``hidden [N, S, H]``, ``mask [N, S]``, ``labels [N]`` (long)."""

    hidden: Tensor
    mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor | Sequence[int]) -> Features:
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask = self.mask[idx]
        width = max(1, int(mask.sum(1).max())) if len(idx) else 1
        return Features(self.hidden[idx, :width], mask[:, :width], self.labels[idx])


# ----------------------------------------------------------------------------- learner


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _attn_mask(config, h: Tensor, mask: Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=h, attention_mask=mask)


class _BertPrefix(nn.Module):
    """Embeddings + the first ``n`` layers of a BERT-family encoder (shared, frozen)."""

    def __init__(self, encoder: nn.Module, n: int):
        super().__init__()
        self.config = encoder.config
        self.embeddings = encoder.embeddings
        self.layers = nn.ModuleList(list(encoder.encoder.layer[:n]))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        h = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        am = _attn_mask(self.config, h, attention_mask)
        for layer in self.layers:
            h = _layer_out(layer(h, attention_mask=am))
        return h


class _BertTop(nn.Module):
    """The last encoder layers + mean pooling + dropout + linear head: ``[B, S, H], [B, S] -> [B, C]``."""

    def __init__(self, config, layers: Sequence[nn.Module], hidden: int, num_labels: int, dropout: float, seed: int):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(copy.deepcopy(list(layers)))
        self.dropout = nn.Dropout(dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(hidden, num_labels)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        h = inputs_embeds
        if len(self.layers):
            am = _attn_mask(self.config, h, attention_mask)
            for layer in self.layers:
                h = _layer_out(layer(h, attention_mask=am))
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


class _Composite(nn.Module):
    """``top(prefix(inputs_embeds))``: the whole learner on word embeddings, for condensation/teachers."""

    def __init__(self, prefix: nn.Module, top: nn.Module):
        super().__init__()
        self.prefix, self.top = prefix, top

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        return self.top(
            inputs_embeds=self.prefix(input_ids, attention_mask, inputs_embeds=inputs_embeds),
            attention_mask=attention_mask,
        )


class SplitLearner:
    """A fixed learner: frozen ``prefix`` + a fresh trainable top per seed.

    ``prefix``: module ``(input_ids=None, attention_mask, *, inputs_embeds=None) -> hidden [B, S, H]``
    (its parameters are frozen here). ``make_top(seed)``: a new module
    ``(inputs_embeds=hidden, attention_mask=mask) -> logits [B, C]``. ``tokenizer`` turns text into
    ids (truncated to ``max_length``); ``embedding_matrix [V, H]`` is the prefix's word-embedding
    table (the space a :class:`CondensedSet` lives in).
    """

    def __init__(
        self,
        prefix: nn.Module,
        make_top: Callable[[int], nn.Module],
        *,
        tokenizer=None,
        embedding_matrix: Tensor | None = None,
        max_length: int = 48,
        name: str = "learner",
    ):
        self.prefix = prefix.eval()
        for p in self.prefix.parameters():
            p.requires_grad_(False)
        self.make_top = make_top
        self.tokenizer = tokenizer
        self.embedding_matrix = embedding_matrix
        self.max_length = max_length
        self.name = name

    @classmethod
    def from_classifier(
        cls,
        model: nn.Module,
        *,
        trainable_layers: int = 1,
        max_length: int = 48,
        attn_implementation: str | None = "eager",
    ) -> SplitLearner:
        """Cut a :class:`~potstill.kd.classifier.TextClassifier` (BERT-family ``model.encoder``,
        ``model.head``, ``model.dropout``) after layer ``L - trainable_layers``.

        The top's layers start from the model's pretrained weights and its head is fresh
        (``nn.Linear`` default init, seeded). ``attn_implementation="eager"`` lets condensation
        differentiate twice through attention. The model's modules are shared with the prefix,
        not copied: do not train ``model`` afterwards.
        """
        enc = model.encoder
        layers = getattr(getattr(enc, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise PotstillError(f"{type(enc).__name__} has no encoder.layer list; use a BERT-family TextClassifier")
        n = len(layers)
        if not 0 <= trainable_layers <= n:
            raise PotstillError(f"trainable_layers={trainable_layers} must be in 0..{n}")
        if attn_implementation is not None:
            if hasattr(enc, "set_attn_implementation"):
                enc.set_attn_implementation(attn_implementation)
            else:
                enc.config._attn_implementation = attn_implementation
        pristine = [copy.deepcopy(layer).eval() for layer in layers[n - trainable_layers :]]
        hidden, labels, p = enc.config.hidden_size, model.head.out_features, model.dropout.p
        prefix = _BertPrefix(enc, n - trainable_layers)

        def make_top(seed: int) -> nn.Module:
            return _BertTop(enc.config, pristine, hidden, labels, p, seed)

        return cls(
            prefix,
            make_top,
            tokenizer=model.tokenizer,
            embedding_matrix=enc.embeddings.word_embeddings.weight.detach(),
            max_length=max_length,
            name=f"{type(model).__name__}[top {trainable_layers} of {n} layers + head]",
        )

    def new_top(self, seed: int) -> nn.Module:
        return self.make_top(seed)

    def composite(self, top: nn.Module) -> nn.Module:
        """``top`` on this prefix, as one module taking ``input_ids`` or ``inputs_embeds``."""
        return _Composite(self.prefix, top)

    @torch.no_grad()
    def features(
        self,
        data: Sequence[Example] | CondensedSet | tuple,
        *,
        labels: Sequence[int] | Tensor | None = None,
        batch_size: int = 64,
    ) -> Features:
        """Prefix outputs of text examples, a :class:`CondensedSet` (its embeddings, labels ``classes``)
        or ``(inputs_embeds [N, L, H], attention_mask [N, L], labels [N])``. Text is tokenized with
        ``max_length`` and run in length-sorted batches; rows come back in input order, padded."""
        if isinstance(data, CondensedSet):
            embeds, mask = data.inputs()
            return self._run(None, embeds, mask, data.classes.long(), batch_size)
        if isinstance(data, tuple):
            embeds, mask, lab = data
            return self._run(None, embeds, mask.long(), torch.as_tensor(lab, dtype=torch.long), batch_size)
        examples = list(data)
        if not examples:
            raise PotstillError("no examples to featurize; pass a non-empty set")
        if self.tokenizer is None:
            raise PotstillError("this learner has no tokenizer, so it cannot read text; pass inputs_embeds")
        enc = self.tokenizer(
            [e.text for e in examples], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        lab = (
            torch.tensor([e.label for e in examples], dtype=torch.long)
            if labels is None
            else torch.as_tensor(labels, dtype=torch.long)
        )
        return self._run(enc["input_ids"], None, enc["attention_mask"], lab, batch_size)

    def _run(
        self, ids: Tensor | None, embeds: Tensor | None, mask: Tensor, labels: Tensor, batch_size: int
    ) -> Features:
        n, width = mask.shape
        order = torch.argsort(mask.sum(1), stable=True)
        out = None
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            w = max(1, int(mask[idx].sum(1).max()))
            m = mask[idx, :w]
            h = self.prefix(
                ids[idx, :w] if ids is not None else None,
                m,
                inputs_embeds=embeds[idx, :w] if embeds is not None else None,
            )
            if out is None:
                out = h.new_zeros((n, width, h.shape[-1]))
            out[idx, :w] = h.float()
        return Features(out, mask.clone(), labels)


# ----------------------------------------------------------------------------- train / evaluate


def train_top(
    top: nn.Module,
    train: Features,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    targets: Tensor | None = None,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    max_grad_norm: float = 1.0,
    schedule: str = "linear",
) -> list[float]:
    """Train ``top`` in place for exactly ``steps`` AdamW steps on ``train``; returns the per-step loss.

    ``targets [N, C]`` (probabilities) -> soft-label cross-entropy; ``None`` -> cross-entropy
    with ``train.labels``. The training is :func:`potstill.kd.classifier.train_classifier`'s
    (:mod:`potstill.schedule`): seeded reshuffled batches (``min(batch_size, N)``), weight decay on
    matrices only, gradient norm clipped at ``max_grad_norm``, dropout on and seeded. ``schedule``:

    * ``"linear"``: :func:`~potstill.schedule.warmup_adamw`'s linear warmup over
      ``warm = max(1, int(steps * warmup_fraction))`` steps (0 when ``warmup_fraction`` is 0), then
      linear decay to 0;
    * ``"cosine"``: transformers' ``get_cosine_schedule_with_warmup`` over the same ``warm`` steps
      (the Hugging Face fine-tuning schedule DiLM's learner uses, Maekawa et al. 2024): linear warmup
      from 0 (the first step has lr 0), then half a cosine down to 0 at ``steps``.
    """
    n = len(train)
    if n == 0 or steps < 1 or batch_size < 1 or lr <= 0:
        raise PotstillError(
            f"need a non-empty set, steps >= 1, batch_size >= 1, lr > 0; got {n}, {steps}, {batch_size}, {lr}"
        )
    if schedule not in SCHEDULES:
        raise PotstillError(f"schedule='{schedule}' is not one of {', '.join(SCHEDULES)}")
    bs = min(batch_size, n)
    params = [p for p in top.parameters() if p.requires_grad]
    opt, sched = warmup_adamw(params, lr, weight_decay, steps, warmup_fraction, schedule)
    batches = reshuffled_batches(n, bs, seed)
    losses: list[float] = []
    top.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            idx = torch.tensor(next(batches))
            b = train.subset(idx)
            logits = top(inputs_embeds=b.hidden, attention_mask=b.mask).float()
            loss = F.cross_entropy(logits, b.labels) if targets is None else soft_cross_entropy(logits, targets[idx])
            if not torch.isfinite(loss):
                raise PotstillError(f"training loss became {float(loss)} at step {len(losses)}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    top.eval()
    return losses


@torch.no_grad()
def predict_features(top: nn.Module, feats: Features, batch_size: int = 256) -> Tensor:
    """Class probabilities ``[N, C]`` of ``top`` on cached features (eval mode)."""
    was = top.training
    top.eval()
    order = torch.argsort(feats.mask.sum(1), stable=True)
    probs = None
    for s in range(0, len(feats), batch_size):
        idx = order[s : s + batch_size]
        b = feats.subset(idx)
        p = torch.softmax(top(inputs_embeds=b.hidden, attention_mask=b.mask).float(), -1)
        if probs is None:
            probs = p.new_zeros((len(feats), p.shape[-1]))
        probs[idx] = p
    top.train(was)
    return probs


def evaluate_features(top: nn.Module, feats: Features) -> dict:
    """``{accuracy, f1, macro_f1, ece, n}`` of ``top`` on cached features."""
    from ..eval.cls_metrics import classification_metrics

    return classification_metrics(predict_features(top, feats), feats.labels)


def evaluate_set(
    train: Sequence[Example] | CondensedSet | Features,
    *,
    learner: SplitLearner,
    eval_examples: Sequence[Example] | Features,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    labels: str = "hard",
    soft_labels=None,
    return_model: bool = False,
    schedule: str = "linear",
    per_example: bool = False,
) -> dict:
    """Train a fresh learner (``learner.new_top(seed)``) on ``train`` and evaluate it on ``eval_examples``.

    ``train``: text examples, a :class:`CondensedSet` (fed as ``inputs_embeds``; hard label =
    ``classes``) or cached :class:`Features`. ``labels="hard"``: cross-entropy with the labels;
    ``"soft"``: cross-entropy to ``soft_labels [N, C]`` (probability rows, e.g. a teacher's; a
    :class:`CondensedSet` defaults to its own learned ``soft_labels()``). Pass ``eval_examples`` as
    :class:`Features` (``learner.features(dev)``) to reuse them across calls. ``schedule``: the
    learning-rate schedule of :func:`train_top` (``linear`` or ``cosine``).

    Returns ``{accuracy, f1, macro_f1, ece, n, n_train, steps, labels, seed, train_s, final_loss}``
    (plus ``model`` with ``return_model``, and with ``per_example`` the held-out examples' own scores,
    :func:`potstill.eval.cls_metrics.example_scores`, under ``per_example``).
    """
    if labels not in ("hard", "soft"):
        raise PotstillError(f"labels='{labels}' is not one of hard, soft")
    feats = train if isinstance(train, Features) else learner.features(train)
    targets = None
    if labels == "soft":
        if soft_labels is None and isinstance(train, CondensedSet):
            soft_labels = train.soft_labels()
        if soft_labels is None:
            raise PotstillError("labels='soft' needs soft_labels [N, C] (e.g. teacher probabilities)")
        targets = torch.as_tensor(soft_labels, dtype=torch.float32)
        if targets.dim() != 2 or targets.shape[0] != len(feats):
            raise PotstillError(f"soft_labels has shape {tuple(targets.shape)}, expected ({len(feats)}, C)")
        if (targets < 0).any() or not torch.allclose(targets.sum(-1), torch.ones(len(feats)), atol=1e-3):
            raise PotstillError("soft_labels rows must be probability vectors (non-negative, summing to 1)")
    ev = eval_examples if isinstance(eval_examples, Features) else learner.features(eval_examples)
    top = learner.new_top(seed)
    t0 = time.perf_counter()
    losses = train_top(
        top, feats, steps=steps, lr=lr, batch_size=batch_size, seed=seed, targets=targets, schedule=schedule
    )
    train_s = time.perf_counter() - t0
    from ..eval.cls_metrics import classification_metrics, example_scores

    probs = predict_features(top, ev)
    out = classification_metrics(probs, ev.labels)
    if per_example:
        out["per_example"] = example_scores(probs, ev.labels)
    out.update(n_train=len(feats), steps=steps, labels=labels, seed=seed, train_s=train_s, final_loss=losses[-1])
    if return_model:
        out["model"] = top
    return out


# ----------------------------------------------------------------------------- aggregate


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value; nan for none)."""
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare_arms(
    results: Mapping[str, Sequence[Mapping[str, Any] | float]],
    *,
    baseline: str | None = "random",
    metric: str = "accuracy",
    construction_s: Mapping[str, Sequence[float]] | None = None,
) -> dict:
    """Aggregate the per-set results of each arm.

    ``results[arm]``: one entry per set (a dict holding ``metric``, or the value itself).
    Returns ``{arm: {mean, std, n, values, delta_vs_baseline, delta_se, construction_s}}``:
    ``std`` is the sample standard deviation over sets; ``delta_vs_baseline = mean - mean(baseline)``
    and ``delta_se = sqrt(std^2/n + std_b^2/n_b)`` its standard error (unpaired: different arms' sets
    are independent draws), both None without a baseline arm; ``construction_s`` the mean
    seconds to build one set of the arm (None if not given).
    """
    vals = {}
    for arm, rows in results.items():
        v = [float(r[metric]) if isinstance(r, Mapping) else float(r) for r in rows]
        if not v:
            raise PotstillError(f"arm '{arm}' has no results; evaluate at least one set")
        vals[arm] = v
    if baseline is not None and baseline not in vals:
        baseline = None
    bm, bs = mean_std(vals[baseline]) if baseline else (None, None)
    out = {}
    for arm, v in vals.items():
        m, s = mean_std(v)
        row = {
            "mean": m,
            "std": s,
            "n": len(v),
            "values": v,
            "delta_vs_baseline": None,
            "delta_se": None,
            "construction_s": None,
        }
        if baseline is not None:
            row["delta_vs_baseline"] = m - bm
            row["delta_se"] = math.sqrt(s**2 / len(v) + bs**2 / len(vals[baseline]))
        if construction_s and construction_s.get(arm):
            row["construction_s"] = statistics.fmean(construction_s[arm])
        out[arm] = row
    return out
