"""``potstill condense RECIPE.yaml``: learn a small synthetic training set, save it, judge it.

The recipe picks a dataset (``sst2`` | ``sms_spam``), a budget (``per_class`` synthetic
examples per class) and a method (``trajectory``: Cazenavette et al. 2022; ``gradient``: Zhao
et al. 2021; both from :mod:`potstill.dd.condense`). The learner is the one of
``benchmarks/dd_sst2.py``: potstill's :class:`~potstill.kd.classifier.TextClassifier` (a
pretrained encoder, mean pooling, a linear head) cut by
:meth:`potstill.dd.protocol.SplitLearner.from_classifier` into a frozen prefix and a trainable
top (``learner.trainable_layers``, default 0: a fresh linear head on the frozen encoder).

:func:`run_condense`:

1. draws a seeded pool of ``data.pool_size`` training examples and ``data.eval_size`` held-out
   ones (SST-2: its dev split; SMS spam: a stratified 20 % split);
2. takes a random per-class subset of the pool (``per_class`` of each label, seeded): the
   condensed set starts from it, and it is the ``random`` baseline arm;
3. condenses (trajectory matching trains ``method.experts`` expert trajectories on the pool first);
4. writes into ``output_dir``, each file atomically: ``condensed.safetensors`` + ``condensed.json``
   (:func:`~potstill.dd.condense.save_condensed`), ``condensed.jsonl`` (the nearest-token text
   projection: one ``{"sentence", "label", "soft_label"}`` row per example; read back with
   :func:`load_condensed_jsonl`), ``recipe.yaml`` (resolved) and ``condense_report.json``;
5. evaluates under one protocol (:func:`~potstill.dd.protocol.evaluate_set`: same learner,
   steps, lr, batch and seeds for every arm) the condensed embeddings (hard labels, and their
   learned soft labels), the text projection (hard labels) and the random subset.

The report (also returned) holds per-arm accuracy ``{mean, std, values}`` over
``learner.seeds`` learners, the matching-loss history summary and the construction seconds;
its top-level scalars are the ones the CLI prints.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..data.classification import (
    Example,
    load_sms_spam,
    load_sst2,
    per_class_sample,
    stratified_split,
)
from ..errors import PotstillError
from ..io import atomic_write_json, atomic_write_text
from ..kd.classifier import TextClassifier, load_encoder
from .condense import (
    RealData,
    gradient_matching,
    init_condensed,
    save_condensed,
    text_candidates,
    train_experts,
    trajectory_matching,
)
from .protocol import Features, SplitLearner, evaluate_set, mean_std

__all__ = [
    "CondenseData",
    "CondenseLearner",
    "CondenseRecipe",
    "GradientMethod",
    "TrajectoryMethod",
    "load_condense_recipe",
    "load_condensed_jsonl",
    "run_condense",
    "write_condensed_jsonl",
]

ARMS = ("condensed_emb", "condensed_emb_learned", "condensed_text", "random")


# ------------------------------------------------------------------------------- recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CondenseData(_Strict):
    pool_size: int = Field(
        2000,
        ge=4,
        description="Seeded random subset of the training split condensed from (and the random arm drawn from).",
    )
    eval_size: int = Field(872, ge=1, description="Held-out examples every arm is evaluated on (seeded subset).")
    eval_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="SMS spam only: stratified held-out share (SST-2 is evaluated on its dev split).",
    )


class CondenseLearner(_Strict):
    encoder: str = Field(
        "all-minilm-l6-v2",
        description="Encoder of the learner: a short name, a local "
        "directory or a hub id (potstill.kd.classifier.load_encoder).",
    )
    max_length: int = Field(48, ge=4, description="Tokens per example (real and synthetic).")
    trainable_layers: int = Field(
        0, ge=0, description="Top encoder layers the learner trains (0: a linear head on the frozen encoder)."
    )
    steps: int = Field(100, ge=1, description="Training steps of each evaluated learner (every arm).")
    lr: float = Field(1e-2, gt=0.0, description="Learning rate of each evaluated learner (AdamW).")
    batch_size: int = Field(16, ge=1, description="Batch size of each evaluated learner.")
    seeds: int = Field(3, ge=1, description="Learners per arm (seeds 0..seeds-1); mean and std are reported.")


class _MethodCommon(_Strict):
    iterations: int = Field(40, ge=1, description="Outer iterations (one update of the synthetic set each).")
    lr_embed: float = Field(5e-2, gt=0.0, description="Adam lr of the synthetic embeddings.")
    lr_label: float = Field(1e-2, gt=0.0, description="Adam lr of the soft-label logits.")
    learn_labels: bool = Field(True, description="Learn the soft labels too.")
    reg_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the latent regularizer (distance to the "
        "nearest token embedding; keeps the text projection close).",
    )
    reg_kind: Literal["cosine", "l2", "sq"] = Field("cosine", description="Distance of the latent regularizer.")
    params: list[str] | None = Field(
        None,
        description="Matched parameter subset of the learner's top: names or "
        "dotted prefixes (e.g. [head]); null: all of them.",
    )


class TrajectoryMethod(_MethodCommon):
    kind: Literal["trajectory"] = "trajectory"
    syn_steps: int = Field(20, ge=1, description="Differentiable student steps on the synthetic set per iteration.")
    expert_span: int = Field(2, ge=1, description="Expert snapshots the student must cover (M).")
    syn_lr: float = Field(0.5, gt=0.0, description="Initial student learning rate.")
    learn_lr: bool = Field(True, description="Learn the student learning rate.")
    lr_lr: float = Field(1e-2, gt=0.0, description="Adam lr of the log student learning rate.")
    experts: int = Field(5, ge=1, description="Expert trajectories trained on the pool.")
    expert_steps: int = Field(100, ge=1, description="SGD steps of each expert.")
    save_every: int = Field(10, ge=1, description="Expert snapshot interval (steps).")
    expert_lr: float = Field(0.5, gt=0.0, description="Expert SGD learning rate.")
    expert_batch: int = Field(32, ge=1, description="Expert batch size.")

    @model_validator(mode="after")
    def _enough_snapshots(self) -> TrajectoryMethod:
        if self.save_every > self.expert_steps:
            raise ValueError(f"save_every={self.save_every} exceeds expert_steps={self.expert_steps}")
        if self.expert_steps // self.save_every < self.expert_span:
            raise ValueError(
                f"expert_span={self.expert_span} needs at least {self.expert_span + 1} snapshots, "
                f"experts keep {self.expert_steps // self.save_every + 1}; lower expert_span or save_every"
            )
        return self


class GradientMethod(_MethodCommon):
    kind: Literal["gradient"] = "gradient"
    inner_steps: int = Field(2, ge=1, description="Synthetic-set updates per learner init.")
    net_steps: int = Field(1, ge=1, description="Learner SGD steps on the synthetic set between updates.")
    real_batch: int = Field(128, ge=1, description="Real examples per class per gradient.")
    lr_net: float = Field(1e-2, gt=0.0, description="Learner SGD lr between updates.")
    n_inits: int | None = Field(
        None, ge=1, description="Cycle through this many fixed learner inits (null: a fresh one per iteration)."
    )


class CondenseRecipe(_Strict):
    dataset: Literal["sst2", "sms_spam"] = Field(
        ..., description="sst2 (negative=0/positive=1) or sms_spam (ham=0/spam=1), read from $POTSTILL_DATA."
    )
    output_dir: str = Field(
        "runs/condense", description="Where the condensed set, condensed.jsonl and condense_report.json go."
    )
    per_class: int = Field(10, ge=1, description="Synthetic examples per class.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the pool, eval subset, initial subset and condensation."
    )
    data: CondenseData = Field(default_factory=CondenseData, description="Pool and evaluation sizes.")
    learner: CondenseLearner = Field(
        default_factory=CondenseLearner, description="The learner (condensation and evaluation protocol)."
    )
    method: Annotated[TrajectoryMethod | GradientMethod, Field(discriminator="kind")] = Field(
        default_factory=TrajectoryMethod, description="Condensation objective: kind trajectory or gradient."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_method_kind(cls, data: Any) -> Any:
        method = data.get("method") if isinstance(data, dict) else None
        if isinstance(method, dict) and "kind" not in method:
            data = {**data, "method": {"kind": "trajectory", **method}}
        return data

    @model_validator(mode="after")
    def _pool_fits(self) -> CondenseRecipe:
        if self.data.pool_size < 2 * self.per_class:
            raise ValueError(f"data.pool_size={self.data.pool_size} is below 2 * per_class={2 * self.per_class}")
        return self


def load_condense_recipe(source: str | Path | dict, overrides: Sequence[str] = ()):
    """A validated :class:`CondenseRecipe` from a YAML file (``yaml.safe_load``) or a dict, with
    ``key.path=value`` overrides (``method.iterations=5``); any problem raises
    :class:`PotstillError` naming the key. ``kind: causal_lm`` gives a
    :class:`~potstill.dd.condense_lm_recipe.CondenseLMRecipe` (soft prompts for an LLM student)."""
    from ..config import apply_plain_overrides, format_validation_error, read_recipe_file

    data = (
        copy.deepcopy(source)
        if isinstance(source, dict)
        else read_recipe_file(source, "dataset, per_class, method, learner, ...")
    )
    apply_plain_overrides(data, overrides, "method.iterations=5")
    if data.get("kind") == "causal_lm":
        from .condense_lm_recipe import load_condense_lm_recipe

        return load_condense_lm_recipe(data, base_dir=None if isinstance(source, dict) else Path(source).parent)
    try:
        return CondenseRecipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "condense")) from None


# ------------------------------------------------------------------------------- text projection file


def write_condensed_jsonl(path: str | Path, examples: Sequence[Example], soft_labels: torch.Tensor) -> Path:
    """One ``{"sentence", "label", "soft_label": [p_0, ..., p_C-1]}`` line per example, written atomically."""
    if len(examples) != len(soft_labels):
        raise PotstillError(f"{len(examples)} examples but {len(soft_labels)} soft-label rows; pass one per example")
    lines = [
        json.dumps(
            {"sentence": e.text, "label": int(e.label), "soft_label": [float(v) for v in row]}, ensure_ascii=False
        )
        for e, row in zip(examples, soft_labels.tolist())
    ]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def load_condensed_jsonl(path: str | Path) -> tuple[list[Example], torch.Tensor]:
    """``(examples, soft_labels [N, C])`` from a file written by :func:`write_condensed_jsonl`."""
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"'{p}' does not exist; run `potstill condense` to write it")
    examples, soft = [], []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                examples.append(Example(str(rec["sentence"]), int(rec["label"])))
                soft.append([float(v) for v in rec["soft_label"]])
            except (ValueError, KeyError, TypeError) as e:
                raise PotstillError(
                    f"{p}:{n}: not a condensed row {{'sentence', 'label', 'soft_label'}} ({e})"
                ) from None
    if not examples:
        raise PotstillError(f"'{p}' holds no examples")
    return examples, torch.tensor(soft, dtype=torch.float32)


# ------------------------------------------------------------------------------- run


def _load_data(recipe: CondenseRecipe) -> tuple[list[Example], list[Example]]:
    d, rng = recipe.data, random.Random(recipe.seed)
    if recipe.dataset == "sst2":
        train, held = load_sst2("train"), load_sst2("dev")
    else:
        train, held = stratified_split(load_sms_spam(), d.eval_fraction, seed=recipe.seed)
    pool = rng.sample(train, d.pool_size) if d.pool_size < len(train) else list(train)
    held = list(held)
    rng.shuffle(held)
    return pool, held[: d.eval_size]


def _pooled(feats: Features) -> Features:
    """Mean-pooled features as ``[N, 1, H]`` with an all-ones mask: what a top with no encoder layer
    computes first, at 1/S of the memory (as in benchmarks/dd_sst2.py)."""
    m = feats.mask.float()[..., None]
    p = (feats.hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return Features(p[:, None, :].contiguous(), torch.ones(len(feats), 1, dtype=torch.long), feats.labels)


def _summary(values: list[float]) -> dict:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def _finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_condense(recipe) -> dict:
    """Condense, save and evaluate as the recipe says (see the module docstring); returns the report
    written to ``output_dir/condense_report.json``. A ``causal_lm`` recipe runs
    :func:`potstill.dd.condense_lm_recipe.run_condense_lm`."""
    if not isinstance(recipe, CondenseRecipe):
        from .condense_lm_recipe import run_condense_lm

        return run_condense_lm(recipe)
    t_start = time.perf_counter()
    out = Path(recipe.output_dir)
    lr_cfg, meth = recipe.learner, recipe.method
    pool, held = _load_data(recipe)
    labels_seen = sorted({e.label for e in pool})
    num_classes = max(max(labels_seen) + 1, 2)
    if len(labels_seen) < 2:
        raise PotstillError("the pool holds a single label; raise data.pool_size")

    encoder, tokenizer = load_encoder(lr_cfg.encoder)
    model = TextClassifier(encoder, tokenizer, num_labels=num_classes, seed=recipe.seed)
    n_layers = encoder.config.num_hidden_layers
    if lr_cfg.trainable_layers > n_layers:
        raise PotstillError(
            f"recipe key 'learner.trainable_layers': {lr_cfg.trainable_layers} exceeds the "
            f"encoder's {n_layers} layers; lower it"
        )
    learner = SplitLearner.from_classifier(
        model, trainable_layers=lr_cfg.trainable_layers, max_length=lr_cfg.max_length
    )
    probe = lr_cfg.trainable_layers == 0
    E = learner.embedding_matrix

    def feats_of(data) -> Features:
        f = learner.features(data)
        return _pooled(f) if probe else f

    t0 = time.perf_counter()
    pool_f, eval_f = feats_of(pool), feats_of(held)
    features_s = time.perf_counter() - t0

    # the random per-class subset: the baseline arm and the condensed set's start point
    random_set = per_class_sample(pool, recipe.per_class, seed=recipe.seed)
    syn = init_condensed(
        pool, recipe.per_class, tokenizer, E, max_length=lr_cfg.max_length, seed=recipe.seed, num_classes=num_classes
    )
    candidates = text_candidates(tokenizer, E.shape[0])
    real = RealData(torch.zeros(len(pool_f), 1, dtype=torch.long), pool_f.mask, pool_f.labels, features=pool_f.hidden)

    def init_fn(seed: int) -> dict:
        return {n: p.detach().clone() for n, p in learner.new_top(seed).named_parameters()}

    common = {
        "prefix": learner.prefix,
        "candidates": candidates,
        "reg_weight": meth.reg_weight,
        "reg_kind": meth.reg_kind,
        "lr_embed": meth.lr_embed,
        "lr_label": meth.lr_label,
        "learn_labels": meth.learn_labels,
        "seed": recipe.seed,
    }
    t0 = time.perf_counter()
    experts_s = 0.0
    if isinstance(meth, TrajectoryMethod):
        experts = train_experts(
            learner.new_top(0),
            real,
            E,
            params=meth.params,
            init_fn=init_fn,
            n_experts=meth.experts,
            steps=meth.expert_steps,
            save_every=meth.save_every,
            lr=meth.expert_lr,
            batch_size=meth.expert_batch,
            seed=recipe.seed,
            prefix=learner.prefix,
        )
        experts_s = time.perf_counter() - t0
        cs = trajectory_matching(
            learner.new_top(0),
            experts,
            syn,
            E,
            iterations=meth.iterations,
            syn_steps=meth.syn_steps,
            expert_span=meth.expert_span,
            syn_lr=meth.syn_lr,
            learn_lr=meth.learn_lr,
            lr_lr=meth.lr_lr,
            **common,
        )
    else:
        cs = gradient_matching(
            learner.new_top(0),
            real,
            syn,
            E,
            params=meth.params,
            init_fn=init_fn,
            iterations=meth.iterations,
            inner_steps=meth.inner_steps,
            net_steps=meth.net_steps,
            real_batch=meth.real_batch,
            lr_net=meth.lr_net,
            n_inits=meth.n_inits,
            **common,
        )
    construction_s = time.perf_counter() - t0
    cs.meta.update(
        {
            "dataset": recipe.dataset,
            "encoder": lr_cfg.encoder,
            "max_length": lr_cfg.max_length,
            "trainable_layers": lr_cfg.trainable_layers,
        }
    )

    text = cs.to_text(tokenizer, E, candidates=candidates)
    soft = cs.soft_labels()
    save_condensed(cs, out)
    write_condensed_jsonl(out / "condensed.jsonl", text, soft)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))

    protocol = {
        "learner": learner,
        "eval_examples": eval_f,
        "steps": lr_cfg.steps,
        "lr": lr_cfg.lr,
        "batch_size": lr_cfg.batch_size,
    }
    cs_f, text_f, random_f = feats_of(cs), feats_of(text), feats_of(random_set)
    runs: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for s in range(lr_cfg.seeds):
        runs["condensed_emb"].append(evaluate_set(cs_f, seed=s, **protocol)["accuracy"])
        runs["condensed_emb_learned"].append(
            evaluate_set(cs_f, seed=s, labels="soft", soft_labels=soft, **protocol)["accuracy"]
        )
        runs["condensed_text"].append(evaluate_set(text_f, seed=s, **protocol)["accuracy"])
        runs["random"].append(evaluate_set(random_f, seed=s, **protocol)["accuracy"])
    accuracy = {arm: _summary(v) for arm, v in runs.items()}

    match = cs.history.get("match", [])
    reg = cs.history.get("reg", [])
    report = {
        "dataset": recipe.dataset,
        "method": meth.kind,
        "per_class": recipe.per_class,
        "n_condensed": len(cs),
        "n_pool": len(pool),
        "n_eval": len(held),
        "learner": learner.name,
        **{f"accuracy_{arm}": accuracy[arm]["mean"] for arm in ARMS},
        "gain_vs_random": accuracy["condensed_emb"]["mean"] - accuracy["random"]["mean"],
        "match_first": match[0] if match else None,
        "match_last": match[-1] if match else None,
        "construction_s": construction_s,
        "total_s": None,
        "accuracy": accuracy,
        "match": {
            "first": match[0] if match else None,
            "last": match[-1] if match else None,
            "min": min(match) if match else None,
            "iterations": len(match),
            "history": [round(v, 6) for v in match],
        },
        "reg": {"first": reg[0] if reg else None, "last": reg[-1] if reg else None},
        "timing_s": {"features": features_s, "experts": experts_s, "construction": construction_s},
        "protocol": {
            "steps": lr_cfg.steps,
            "lr": lr_cfg.lr,
            "batch_size": lr_cfg.batch_size,
            "seeds": list(range(lr_cfg.seeds)),
        },
        "examples": {"init": cs.meta.get("init_texts", [])[:4], "projected": [e.text for e in text[:4]]},
        "output_dir": str(out),
    }
    report["total_s"] = report["timing_s"]["total"] = time.perf_counter() - t_start
    report = _finite(report)
    atomic_write_json(out / "condense_report.json", report)
    return report
