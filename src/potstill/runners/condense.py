"""``potstill condense RECIPE.yaml``: learn a small synthetic training set, save it, judge it.

The recipe picks a dataset (``sst2`` | ``sms_spam``), a budget (``per_class`` synthetic
examples per class) and a method (``trajectory``: Cazenavette et al. 2022; ``gradient``: Zhao
et al. 2021; both from :mod:`potstill.dd.condense`). The learner is the one of
``benchmarks/dd_sst2.py``: potstill's :class:`~potstill.models.classifier.TextClassifier` (a
pretrained encoder, mean pooling, a linear head) cut by
:meth:`potstill.dd.protocol.SplitLearner.from_classifier` into a frozen prefix and a trainable
top (``learner.trainable_layers``, default 0: a fresh linear head on the frozen encoder).

:func:`run_condense` (``kind: classification``; ``causal_lm``: :func:`run_condense_lm`, soft prompts
for an LLM student, see :mod:`potstill.dd.condense_lm`):

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
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from potstill.data.classification import Example, per_class_sample, read_jsonl_rows
from potstill.dd.condense import (
    RealData,
    fresh_init,
    gradient_matching,
    init_condensed,
    save_condensed,
    text_candidates,
    train_experts,
    trajectory_matching,
)
from potstill.dd.condense_lm import check_pair, condense_lm, evaluate_lm_set, init_soft_prompts, random_soft_prompts
from potstill.dd.protocol import evaluate_set, mean_std
from potstill.errors import PotstillError
from potstill.generate import pad_id as pad_id_of
from potstill.io import atomic_write_json, atomic_write_text
from potstill.recipes.condense import CondenseLMRecipe, CondenseRecipe, TrajectoryMethod
from potstill.runners.common import build_learner, finite, load_pool
from potstill.runners.prepare import Prepared

__all__ = [
    "ARMS",
    "load_condensed_jsonl",
    "pad_sequences",
    "run",
    "run_condense",
    "run_condense_lm",
    "write_condensed_jsonl",
]

ARMS = ("condensed_emb", "condensed_emb_learned", "condensed_text", "random")
LM_REPORT = "condense_report.json"
LM_TEXT = "condensed_text.jsonl"


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


def _condensed_row(rec: dict) -> tuple[Example, list[float]]:
    return Example(str(rec["sentence"]), int(rec["label"])), [float(v) for v in rec["soft_label"]]


def load_condensed_jsonl(path: str | Path) -> tuple[list[Example], torch.Tensor]:
    """``(examples, soft_labels [N, C])`` from a file written by :func:`write_condensed_jsonl`."""
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"'{p}' does not exist; run `potstill condense` to write it")
    rows = read_jsonl_rows(p, _condensed_row, "a condensed row {'sentence', 'label', 'soft_label'}")
    examples, soft = [e for e, _ in rows], [r for _, r in rows]
    if not examples:
        raise PotstillError(f"'{p}' holds no examples")
    return examples, torch.tensor(soft, dtype=torch.float32)


# ------------------------------------------------------------------------------- classification


def _summary(values: list[float]) -> dict:
    m, s = mean_std(values)
    return {"mean": m, "std": s, "values": values}


def _condense(recipe: CondenseRecipe, learner, pool, pool_f, syn, candidates):
    """``(condensed set, experts seconds)``: the recipe's method run from ``syn`` on the pool's features."""
    meth, E = recipe.method, learner.embedding_matrix
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
    if not isinstance(meth, TrajectoryMethod):
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
        return cs, 0.0
    t0 = time.perf_counter()
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
    return cs, experts_s


def _evaluate_arms(recipe: CondenseRecipe, learner, feats_of, eval_f, cs, text, soft, random_set) -> dict:
    """Accuracy ``{mean, std, values}`` of every arm over ``learner.seeds`` learners, under one protocol."""
    lr_cfg = recipe.learner
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
    return {arm: _summary(v) for arm, v in runs.items()}


def _condense_report(recipe: CondenseRecipe, learner, cs, text, pool, held, accuracy, timing: dict) -> dict:
    lr_cfg, meth = recipe.learner, recipe.method
    match = cs.history.get("match", [])
    reg = cs.history.get("reg", [])
    return {
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
        "construction_s": timing["construction"],
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
        "timing_s": timing,
        "protocol": {
            "steps": lr_cfg.steps,
            "lr": lr_cfg.lr,
            "batch_size": lr_cfg.batch_size,
            "seeds": list(range(lr_cfg.seeds)),
        },
        "examples": {"init": cs.meta.get("init_texts", [])[:4], "projected": [e.text for e in text[:4]]},
        "output_dir": str(Path(recipe.output_dir)),
    }


def run_condense(recipe) -> dict:
    """Condense, save and evaluate as the recipe says (see the module docstring); returns the report
    written to ``output_dir/condense_report.json``. A ``causal_lm`` recipe runs :func:`run_condense_lm`."""
    if not isinstance(recipe, CondenseRecipe):
        return run_condense_lm(recipe)
    t_start = time.perf_counter()
    out = Path(recipe.output_dir)
    lr_cfg = recipe.learner
    pool, held = load_pool(recipe)
    labels_seen = sorted({e.label for e in pool})
    num_classes = max(max(labels_seen) + 1, 2)
    if len(labels_seen) < 2:
        raise PotstillError("the pool holds a single label; raise data.pool_size")
    learner, feats_of = build_learner(recipe, num_classes)
    tokenizer, E = learner.tokenizer, learner.embedding_matrix

    t0 = time.perf_counter()
    pool_f, eval_f = feats_of(pool), feats_of(held)
    features_s = time.perf_counter() - t0

    # the random per-class subset: the baseline arm and the condensed set's start point
    random_set = per_class_sample(pool, recipe.per_class, seed=recipe.seed)
    syn = init_condensed(
        pool, recipe.per_class, tokenizer, E, max_length=lr_cfg.max_length, seed=recipe.seed, num_classes=num_classes
    )
    candidates = text_candidates(tokenizer, E.shape[0])
    t0 = time.perf_counter()
    cs, experts_s = _condense(recipe, learner, pool, pool_f, syn, candidates)
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

    accuracy = _evaluate_arms(recipe, learner, feats_of, eval_f, cs, text, soft, random_set)
    timing = {"features": features_s, "experts": experts_s, "construction": construction_s}
    report = _condense_report(recipe, learner, cs, text, pool, held, accuracy, timing)
    report["total_s"] = report["timing_s"]["total"] = time.perf_counter() - t_start
    report = finite(report)
    atomic_write_json(out / "condense_report.json", report)
    return report


# ------------------------------------------------------------------------------- causal LM


def pad_sequences(
    seqs: list[list[int]], pad_id: int, length: int | None = None, window: str = "start"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``, cut to ``length`` tokens when given (the first
    ones, or with ``window="end"`` the last ones)."""
    seqs = [(s[-length:] if window == "end" else s[:length]) if length else s for s in seqs]
    width = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _evaluate_lm(recipe: CondenseLMRecipe, prep, out_set, start, pad: int) -> dict:
    """Students trained on the set, on its start and on random real subsets of its size: held-out forward KL."""
    c, pool, held, device = recipe.condense, prep.pool_examples, prep.eval_examples, prep.device
    student, teacher = prep.student0, prep.teacher
    ev = recipe.evaluate
    eval_batches = [
        tuple(t.to(device) for t in pad_sequences([x["input_ids"] for x in held[j : j + 8]], pad))
        for j in range(0, len(held), 8)
    ]
    common = {"steps": ev.steps, "lr": ev.lr}
    arms = {
        "condensed": evaluate_lm_set(student, teacher, out_set, eval_batches, **common),
        "start": evaluate_lm_set(student, teacher, start, eval_batches, **common),
    }
    rnd = []
    for s in range(ev.seeds):
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + s))[: c.sequences]
        real = tuple(
            t.to(device) for t in pad_sequences([pool[int(i)]["input_ids"] for i in pick], pad, c.length, c.window)
        )
        rnd.append(evaluate_lm_set(student, teacher, real, eval_batches, seed=s, **common)["forward_kl"])
    base = statistics.fmean(rnd)
    evaluation = {
        "untrained_forward_kl": arms["condensed"]["forward_kl_init"],
        "condensed_forward_kl": arms["condensed"]["forward_kl"],
        "start_forward_kl": arms["start"]["forward_kl"],
        "random_real_forward_kl": {
            "mean": base,
            "std": statistics.stdev(rnd) if len(rnd) > 1 else 0.0,
            "values": rnd,
        },
        "gain_vs_random_pct": 100.0 * (base - arms["condensed"]["forward_kl"]) / base if base else None,
        "steps": ev.steps,
        "lr": ev.lr,
    }
    return evaluation


def _initial_set(recipe: CondenseLMRecipe, prep, order: list[int], pad: int, E, cand):
    """The soft prompts before condensing: a window of seeded pool examples, or random text tokens."""
    c, pool, teacher, device = recipe.condense, prep.pool_examples, prep.teacher, prep.device
    if c.init == "real":
        ids, mask = pad_sequences([pool[i]["input_ids"] for i in order[: c.sequences]], pad, c.length, c.window)
        return init_soft_prompts(
            ids.to(device),
            mask.to(device),
            E,
            special_ids=prep.tokenizer.all_special_ids,
            labels=c.labels,
            teacher=teacher,
        )
    return random_soft_prompts(c.sequences, c.length, E, candidates=cand, seed=c.seed, labels=c.labels, teacher=teacher)


def _check_lm_sizes(recipe: CondenseLMRecipe, pool: list, held: list) -> None:
    c = recipe.condense
    if c.sequences > len(pool):
        raise PotstillError(
            f"condense.sequences={c.sequences} is more than the pool's {len(pool)} examples; lower it or raise the data"
        )
    if recipe.evaluate is not None and not held:
        raise PotstillError("the held-out split is empty; raise data.eval_size or set evaluate: null")


def run_condense_lm(recipe: CondenseLMRecipe) -> dict:
    """Condense soft prompts for an LLM student, save, export as text, evaluate; returns the report."""
    t_start = time.perf_counter()
    c = recipe.condense
    prep = Prepared(recipe.distill_recipe())
    check_pair(prep.student0, prep.teacher)
    pool, held = prep.pool_examples, prep.eval_examples
    _check_lm_sizes(recipe, pool, held)
    pad = pad_id_of(prep.tokenizer)
    device = prep.device
    student, teacher = prep.student0, prep.teacher
    E = student.get_input_embeddings().weight.detach()
    cand = text_candidates(prep.tokenizer, E.shape[0]).to(E.device)
    g = torch.Generator().manual_seed(c.seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    batches = [
        tuple(t.to(device) for t in pad_sequences([pool[i]["input_ids"] for i in order[j : j + c.real_batch]], pad))
        for j in range(0, len(order), c.real_batch)
    ]
    syn = _initial_set(recipe, prep, order, pad, E, cand)
    start = copy.deepcopy(syn)
    if c.theta == "student":
        own = {n: p.detach().clone() for n, p in student.named_parameters()}
        init_fn, n_inits = (lambda seed: own), 1
    else:
        init_fn, n_inits = fresh_init(student), None
    t0 = time.perf_counter()
    out_set = condense_lm(
        student,
        teacher,
        batches,
        syn,
        outer_steps=c.outer_steps,
        inner_steps=c.inner_steps,
        net_steps=c.net_steps,
        lr_embed=c.lr_embed,
        lr_label=c.lr_label,
        lr_net=c.lr_net,
        init_fn=init_fn,
        n_inits=n_inits,
        reg_weight=c.reg_weight,
        candidates=cand,
        seed=c.seed,
    )
    construction_s = time.perf_counter() - t0
    texts = out_set.to_text(prep.tokenizer, E, candidates=cand)

    evaluation = None if recipe.evaluate is None else _evaluate_lm(recipe, prep, out_set, start, pad)

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_set.meta["construction_s"] = construction_s
    out_set.save(out)
    atomic_write_text(out / LM_TEXT, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    hist = out_set.history["match"]
    report = finite(
        {
            "kind": "causal_lm",
            "sequences": c.sequences,
            "length": c.length,
            "pool": len(pool),
            "construction_s": construction_s,
            "match_first": hist[0],
            "match_last": hist[-1],
            "evaluation": evaluation,
            "total_s": time.perf_counter() - t_start,
            "paths": {
                "set": str(out / "soft_prompts.safetensors"),
                "text": str(out / LM_TEXT),
                "report": str(out / LM_REPORT),
            },
            "recipe": recipe.model_dump(mode="json"),
        }
    )
    atomic_write_json(out / LM_REPORT, report)
    return report


def run(recipe) -> dict:
    """``potstill condense``: :func:`run_condense` (classification) or :func:`run_condense_lm` (causal_lm)."""
    return run_condense(recipe)
