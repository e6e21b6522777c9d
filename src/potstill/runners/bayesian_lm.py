"""A distill run's ``method.bayesian`` (:mod:`potstill.kd.bayesian_lm`): after the run has trained, a fresh LoRA
adapter on its student, the SGLD chain over it, and the posterior predictive's token calibration on the held-out
examples beside the trained student's own. Written to ``runs/<name>/bayesian.json`` (atomically; a resumed
recipe reads it back instead of sampling again unless its settings changed, and the seeded chain gives the same
file when it must rerun)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from potstill.data import pad_id
from potstill.io import atomic_write_json
from potstill.kd.bayesian import kd_alpha_of
from potstill.kd.bayesian_lm import lm_posterior_predict, sample_lm_posterior, sampled_parameters
from potstill.models import align_vocab
from potstill.models.head import output_head
from potstill.recipes.distill import Recipe
from potstill.recipes.methods import RunConfig

log = logging.getLogger("potstill")

BAYESIAN_FILE = "bayesian.json"
REPORTED = ("accuracy", "ece", "brier", "perplexity", "coverage", "mean_width")
"""The posterior predictive's figures added to the run's row of metrics.json, as ``bkd_<name>``."""


def bayesian_lm_run(
    recipe: Recipe, run: RunConfig, model, teacher, tokenizer, train, held, vocab: int | None, run_dir: Path
):
    """The chain and both predictions (module docstring) -> the summary written to ``bayesian.json``.
    ``vocab``: the compared vocabulary (None: the tokenizer's token space, as in training)."""
    path = Path(run_dir) / BAYESIAN_FILE
    settings = run.bayesian.model_dump(mode="json") | {
        "seed": recipe.train.seed,
        "lora": recipe.train.lora.model_dump(),
    }
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            log.info("run %s: reusing its posterior samples' report %s", run.name, path)
            return saved
        log.info("run %s: method.bayesian changed since %s was written; sampling again", run.name, path)
    from peft import get_peft_model

    from potstill.runners.train import lora_peft_config

    b, s = run.bayesian, run.bayesian.sgld
    student = get_peft_model(copy.deepcopy(model), lora_peft_config(recipe))  # B = 0: the trained student exactly
    pad = pad_id(tokenizer)
    if vocab is None:
        rows = min(output_head(model).vocab, output_head(teacher).vocab)
        vocab = align_vocab(tokenizer, tokenizer, output_head(teacher).vocab, rows)
    start = {n: p.detach().to("cpu", copy=True) for n, p in sampled_parameters(student).items()}
    common = {"vocab": vocab, "pad_id": pad, "level": b.level, "batch_size": b.eval_batch_size}
    point = lm_posterior_predict(student, [start], held, **common)
    log.info("run %s: SGLD over %d LoRA tensors, %d steps", run.name, len(start), s.burn_in + s.samples * s.thin)
    chain = sample_lm_posterior(
        student,
        teacher,
        train,
        vocab=vocab,
        pad_id=pad,
        prior_strength=b.prior_strength,
        temperature=b.temperature,
        **s.model_dump(exclude={"batch_size"}),  # lr, burn_in, samples, thin, gamma, decay_offset, noise_scale
        batch_size=s.batch_size or recipe.train.batch_size,
        seed=recipe.train.seed,
    )
    posterior = lm_posterior_predict(student, chain.snapshots, held, **common)
    summary = {
        "settings": settings,
        "kd_alpha_of_mode": kd_alpha_of(b.prior_strength, b.temperature),
        "train_response_tokens": chain.tokens,
        "sgld_steps": chain.steps,
        "sgld_seconds": chain.seconds,
        "potential_first_last": [chain.potential[0], chain.potential[-1]],
        "point": point,
        "posterior": posterior,
    }
    atomic_write_json(path, summary)
    return summary


def bayesian_row(summary: dict) -> dict:
    """The ``bkd_*`` entries a Bayesian run adds to its metrics row."""
    return {f"bkd_{k}": summary["posterior"][k] for k in REPORTED}


def bayesian_note(name: str, summary: dict) -> str:
    """One report line: the posterior predictive against the trained student's point estimate."""
    p, q = summary["posterior"], summary["point"]
    return (
        f"{name}: Bayesian KD posterior ({p['samples']} SGLD samples over a LoRA adapter, "
        f"{summary['sgld_steps']} steps): token ECE {p['ece']:.4f} vs {q['ece']:.4f} for the trained student, "
        f"Brier {p['brier']:.4f} vs {q['brier']:.4f}, {p['level']:.0%} interval coverage {p['coverage']:.3f} "
        f"(mean width {p['mean_width']:.4f}) vs {q['coverage']:.3f}; runs/{name}/{BAYESIAN_FILE}"
    )
