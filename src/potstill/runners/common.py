"""What the classification flavours of ``condense``, ``select`` and ``eval-data`` share, so all three judge
alike: the seeded pool / held-out split of a ``dataset`` (:func:`load_pool`), the learner of a ``learner``
section (MiniLM ``TextClassifier`` cut by ``SplitLearner.from_classifier``; ``trainable_layers: 0`` is a
linear probe on mean-pooled features), the coreset space, the pool-trained teacher, per-class draws,
and the JSON-safe report (:func:`finite`)."""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from potstill.data.classification import Example, load_sms_spam, load_sst2, stratified_split
from potstill.dd.diversity import greedy_k_center, herding, kmeans_medoids, per_class
from potstill.dd.protocol import Features, SplitLearner, train_top
from potstill.errors import PotstillError
from potstill.models.classifier import TextClassifier, load_encoder

__all__ = [
    "BUDGET_CUT",
    "CORESETS",
    "build_learner",
    "coreset_space",
    "draw",
    "finite",
    "load_pool",
    "pooled",
    "train_pool_teacher",
]

BUDGET_CUT = "budget cut"
CORESETS = {"k_center": (greedy_k_center, True), "kmeans_medoids": (kmeans_medoids, True), "herding": (herding, False)}


def load_pool(recipe) -> tuple[list[Example], list[Example]]:
    """``(pool, held_out)``: a seeded ``data.pool_size`` subset of the training split and ``data.eval_size``
    held-out examples (SST-2: its dev split; SMS spam: a stratified split)."""
    d, rng = recipe.data, random.Random(recipe.seed)
    if recipe.dataset == "sst2":
        train, held = load_sst2("train"), load_sst2("dev")
    else:
        train, held = stratified_split(load_sms_spam(), d.eval_fraction, seed=recipe.seed)
    pool = rng.sample(train, d.pool_size) if d.pool_size < len(train) else list(train)
    held = list(held)
    rng.shuffle(held)
    return pool, held[: d.eval_size]


def pooled(feats: Features) -> Features:
    """Mean-pooled features as ``[N, 1, H]`` with an all-ones mask: what a top with no encoder layer
    computes first, at 1/S of the memory (as in benchmarks/dd_sst2.py)."""
    m = feats.mask.float()[..., None]
    p = (feats.hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return Features(p[:, None, :].contiguous(), torch.ones(len(feats), 1, dtype=torch.long), feats.labels)


def finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def build_learner(recipe, num_labels: int):
    """``(learner, feats_of)``: the recipe's learner (``learner`` section) and its feature function
    (mean-pooled when ``trainable_layers`` is 0). Refuses more trainable layers than the encoder has."""
    lr_cfg = recipe.learner
    encoder, tokenizer = load_encoder(lr_cfg.encoder)
    model = TextClassifier(encoder, tokenizer, num_labels=num_labels, seed=recipe.seed)
    n_layers = encoder.config.num_hidden_layers
    if lr_cfg.trainable_layers > n_layers:
        raise PotstillError(
            f"recipe key 'learner.trainable_layers': {lr_cfg.trainable_layers} exceeds the "
            f"encoder's {n_layers} layers; lower it"
        )
    learner = SplitLearner.from_classifier(
        model, trainable_layers=lr_cfg.trainable_layers, max_length=lr_cfg.max_length
    )

    def feats_of(data) -> Features:
        f = learner.features(data)
        return pooled(f) if lr_cfg.trainable_layers == 0 else f

    return learner, feats_of


def coreset_space(pool_f) -> torch.Tensor:
    """The coresets' space: the L2-normalized mean-pooled prefix features of the pool."""
    return F.normalize(pooled(pool_f).hidden[:, 0], dim=-1)


def train_pool_teacher(recipe, learner: SplitLearner, pool_f):
    """The soft-label teacher: the learner trained on the whole pool (``teacher`` section, seed ``recipe.seed``)."""
    teacher = learner.new_top(10_000)
    tc = recipe.teacher
    train_top(
        teacher, pool_f, steps=tc.steps, lr=tc.lr or recipe.learner.lr, batch_size=tc.batch_size, seed=recipe.seed
    )
    return teacher


def draw(kind: str, counts: dict[int, int], labels: torch.Tensor, emb: torch.Tensor, seed: int) -> torch.Tensor:
    """Pool indices of one baseline subset with exactly ``counts[y]`` examples of each label ``y``."""
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        rows = [(labels == y).nonzero().flatten() for y in counts]
        return torch.cat([r[torch.randperm(len(r), generator=g)[:k]] for r, k in zip(rows, counts.values())])
    fn, seeded = CORESETS[kind]
    rows = torch.cat([(labels == y).nonzero().flatten() for y in counts])
    return rows[per_class(fn, emb[rows], labels[rows], counts, **({"seed": seed} if seeded else {}))]
