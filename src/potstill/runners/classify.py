"""``potstill classify``: fine-tune (or reload) the teacher, train the KD and no-teacher students, evaluate
all three on accuracy, F1, calibration, parameters and latency, and write the report."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from potstill.data.classification import Example, load_sms_spam, load_sst2, stratified_split
from potstill.errors import PotstillError
from potstill.eval.metrics import count_parameters
from potstill.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from potstill.kd.bayesian import calibration_report, kd_alpha_of, posterior_predict, sample_classifier_posterior
from potstill.kd.classifier import (
    default_layer_map,
    evaluate_classifier,
    latency,
    predict_proba,
    student_from_layers,
    student_narrow,
    train_classifier,
)
from potstill.models.classifier import TextClassifier, load_encoder, model_device
from potstill.recipes.classify import BayesianMethod, ClassifierRecipe, LayerSubsetStudent

__all__ = ["run", "run_classifier_recipe"]


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
    for name, r in m["models"].items():
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
            *_bayesian_lines(m),
            (
                "Latency: median wall time of one forward of a fixed batch, divided by its size, on this machine "
                f"({m['device']}); speedup = teacher time / model time. Latency and train seconds are wall-clock: "
                "other load on the machine inflates them (the teacher's is 0 when its weights were cached)."
            ),
            "",
        ]
    )


def _bayesian_lines(m: dict) -> list[str]:
    b = m.get("bayesian")
    if b is None:
        return []
    r = m["models"]["bayesian_student"]
    return [
        (
            f"The Bayesian KD student (Fang et al. 2024; prior strength {b['prior_strength']}, T={b['temperature']}, "
            f"{b['samples']} SGLD samples after {b['burn_in']} burn-in steps, every {b['thin']}) predicts with the "
            f"posterior mean: accuracy {r['accuracy']:.4f}, ECE {r['ece']:.4f} ({r['ece_bins']} bins), Brier "
            f"{r['brier']:.4f}; its {b['level']:.0%} credible intervals (mean width {r['mean_width']:.4f}) cover the "
            f"accuracy of the example's confidence bin for {r['coverage']:.1%} of the held-out examples. Its "
            f"posterior mode (the equivalent KD loss, alpha={b['kd_alpha']:.4f}) scored accuracy "
            f"{b['mode']['accuracy']:.4f}, ECE {b['mode']['ece']:.4f}, Brier {b['mode']['brier']:.4f}. Per-example "
            "means and intervals: posterior_predictions.jsonl. Its latency is one forward per sample."
        ),
        "",
    ]


def _bayesian(recipe: ClassifierRecipe, init: TextClassifier, teacher, train, held, common: dict, out: Path):
    """Bayesian KD (:mod:`potstill.kd.bayesian`): the warm start (posterior mode), the SGLD chain, the posterior
    predictive on ``held``. Returns ``(last sample's model, report row, train seconds, summary)``; writes the predictions."""
    b, tr = recipe.method, recipe.train
    model = copy.deepcopy(init)
    teacher_probs = predict_proba(teacher, train, batch_size=recipe.eval.batch_size, max_length=tr.max_length)
    alpha = kd_alpha_of(b.prior_strength, b.temperature)
    warm = None
    if b.warm_start:
        warm = train_classifier(
            model, train, soft_labels=teacher_probs, alpha=alpha, temperature=b.temperature, hidden_weight=0.0, **common
        )
    mode = evaluate_classifier(model, held, batch_size=recipe.eval.batch_size, max_length=tr.max_length)
    s = b.sgld
    log = sample_classifier_posterior(
        model,
        train,
        teacher_probs,
        held,
        prior_strength=b.prior_strength,
        temperature=b.temperature,
        **s.model_dump(exclude={"batch_size"}),  # lr, burn_in, samples, thin, gamma, decay_offset, noise_scale
        batch_size=s.batch_size or tr.batch_size,
        seed=tr.seed,
        max_length=tr.max_length,
        eval_batch_size=recipe.eval.batch_size,
    )
    pred = posterior_predict(log.sample_probs, b.level)
    row = calibration_report(pred, [e.label for e in held])
    lines = [
        json.dumps({"label": e.label, "mean": m, "lower": lo, "upper": hi})
        for e, m, lo, hi in zip(held, pred.mean.tolist(), pred.lower.tolist(), pred.upper.tolist(), strict=True)
    ]
    atomic_write_text(out / "posterior_predictions.jsonl", "\n".join(lines) + "\n")
    summary = {
        **b.model_dump(mode="json", exclude={"sgld"}),
        **s.model_dump(mode="json"),
        "kd_alpha": alpha,
        "mode": mode,
        "sgld_steps": log.steps,
        "sgld_seconds": log.seconds,
        "final_potential": log.potential[-1],
    }
    return model, row, (warm.seconds if warm else 0.0) + log.seconds, summary


def _evaluate_all(recipe: ClassifierRecipe, trained: dict, rows: dict, held, seconds: dict, logs: dict, samples: int):
    """One report row per model: its held-out metrics (``rows[name]`` where already computed), size, latency
    (a Bayesian student runs one forward per posterior sample), train seconds and ratios to the teacher."""
    ev, tr = recipe.eval, recipe.train
    models = {}
    for name, model in trained.items():
        row = rows.get(name) or evaluate_classifier(model, held, batch_size=ev.batch_size, max_length=tr.max_length)
        params = count_parameters(model)
        row.update(
            layers=model.num_layers,
            hidden_size=model.hidden_size,
            params=params,
            params_no_embeddings=params - count_parameters(model.encoder.embeddings),
            latency_s_per_example=latency(
                model, held, ev.latency_batch_size, max_length=tr.max_length, repeats=ev.latency_repeats
            )
            * (samples if name == "bayesian_student" else 1),
            train_seconds=seconds[name],
            final_loss=logs[name].loss[-1] if name in logs else None,
        )
        models[name] = row
    t = models["teacher"]
    for row in models.values():
        row["latency_ms_per_example"] = 1000 * row["latency_s_per_example"]
        row["params_ratio"] = row["params"] / t["params"]
        row["speedup"] = t["latency_s_per_example"] / row["latency_s_per_example"]
    return models


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
    trained = {"teacher": teacher, "kd_student": kd_student, "no_teacher": baseline}
    seconds = {"teacher": tinfo["train_seconds"], **{k: v.seconds for k, v in logs.items()}}
    rows, bayes = {}, None
    if isinstance(recipe.method, BayesianMethod):
        trained["bayesian_student"], rows["bayesian_student"], seconds["bayesian_student"], bayes = _bayesian(
            recipe, init, teacher, train, held, common, out
        )
    models = _evaluate_all(recipe, trained, rows, held, seconds, logs, bayes["samples"] if bayes else 1)
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
            "device": str(model_device(teacher)),
            "models": {k: _finite(v) for k, v in models.items()},
            "kd_at_least_as_accurate": models["kd_student"]["accuracy"] >= models["no_teacher"]["accuracy"],
            **({"bayesian": _finite(bayes)} if bayes is not None else {}),
        }
    )
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", _report(metrics))
    return metrics


def run(recipe: ClassifierRecipe) -> dict:
    """``potstill classify``: :func:`run_classifier_recipe` into the recipe's ``output_dir``."""
    return run_classifier_recipe(recipe)
