"""Bayesian KD for an LLM student (SGLD over LoRA parameters, per response token) vs the trained KD student's
point estimate, on the demo setup, over seeds.

Per seed (the data order, the LoRA init and the SGLD noise):

1. the demo's 6-of-30-layer student (SmolLM2-135M-Instruct cut) trained with LoRA (r 8) for ``--steps`` steps of
   ``--batch-size`` on Hinton KD at ``alpha = tau^2 / (tau^2 + lambda)`` (forward KL, T = 1), the loss whose
   minimiser is BKD's posterior mode (``kd_alpha_of``): this is the plain-KD student;
2. ``method.bayesian``'s chain (:mod:`potstill.runners.bayesian_lm`): a fresh LoRA adapter on it, SGLD on the
   token-level BKD potential for ``burn_in + samples * thin`` steps;
3. both scored teacher-forced on the held-out responses (:func:`potstill.kd.bayesian_lm.lm_posterior_predict`):
   next-token accuracy against the reference token, ECE (15 bins), Brier, perplexity, and the coverage of the
   predicted token's 95 % interval by its confidence bin's accuracy (0 width for the point estimate).

A gap counts only past the sum of the two arms' stds over seeds. Each finished seed is kept in
``<out>.partial.json`` (a killed run resumes). Usage: ``python benchmarks/survey_bayesian_lm.py [--quick]
[--seeds 3] [--out PATH]``; writes ``benchmarks/results/survey_bayesian_lm.json`` and prints one line.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Partial, seed_stats, summary_line, verdict, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "survey_bayesian_lm.json"
METRICS = {"accuracy": False, "ece": True, "brier": True, "perplexity": True, "coverage": False}  # lower better?


def setting(args) -> dict:
    s = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": 5e-4,
        "lora": {"r": 8, "lora_alpha": 16},
        "eval_size": 40,
        "prior_strength": 4.0,
        "temperature": 1.0,
        "sgld": {"lr": args.sgld_lr, "burn_in": args.burn_in, "samples": args.samples, "thin": args.thin},
        "seeds": list(range(args.seeds)),
    }
    if args.quick:
        s |= {"steps": 2, "eval_size": 4, "seeds": [0], "sgld": s["sgld"] | {"burn_in": 1, "samples": 2, "thin": 1}}
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke setting: one seed, 2 steps, 3 SGLD steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sgld-lr", type=float, default=2e-7)
    ap.add_argument("--burn-in", type=int, default=20)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--thin", type=int, default=3)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    import torch

    from potstill.kd.bayesian import kd_alpha_of
    from potstill.recipes.distill import Recipe
    from potstill.runners.bayesian_lm import bayesian_lm_run
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run

    torch.set_num_threads(2)
    s = setting(args)
    alpha = kd_alpha_of(s["prior_strength"], s["temperature"])
    partial = Partial(args.out, s)
    t_start = time.perf_counter()
    data = {"eval_size": s["eval_size"]}
    if args.quick:
        data["source"] = {"kind": "demo", "num_prompts": 24, "max_new_tokens": 8}
    base = {
        "data": data,
        "train": {
            "max_steps": s["steps"],
            "batch_size": s["batch_size"],
            "learning_rate": s["learning_rate"],
            "lora": s["lora"],
        },
        "runs": [
            {
                "name": "kd_lora",
                "alpha": alpha,
                "divergence": {"name": "forward_kl"},
                "method": {
                    "kind": "kd",
                    "bayesian": {
                        "prior_strength": s["prior_strength"],
                        "temperature": s["temperature"],
                        "sgld": s["sgld"],
                    },
                },
            }
        ],
        "device": "cpu",
    }
    prep = None
    with tempfile.TemporaryDirectory(prefix="survey_bayesian_lm_") as tmp:
        for seed in s["seeds"]:
            key = str(seed)
            if key in partial:
                continue
            recipe = Recipe.model_validate(base | {"train": base["train"] | {"seed": seed}})
            prep = prep or Prepared(recipe)
            run = recipe.runs[0]
            work = Path(tmp) / f"seed{seed}"
            t0 = time.perf_counter()
            model, _ = train_run(
                recipe,
                run,
                copy.deepcopy(prep.student0).train(),
                prep.teacher,
                prep.tokenizer,
                prep.train_examples,
                work,
                prep.device,
                prep.vocab_size,
            )
            train_s = time.perf_counter() - t0
            summary = bayesian_lm_run(
                recipe,
                run,
                model.eval(),
                prep.teacher,
                prep.tokenizer,
                prep.train_examples,
                prep.eval_examples,
                prep.vocab_size,
                work,
            )
            partial.put(key, summary | {"train_seconds": train_s})
            del model
    rows = [partial[str(seed)] for seed in s["seeds"]]
    arms = {
        arm: {k: seed_stats([r[arm][k] for r in rows]) for k in [*METRICS, "mean_width"]}
        for arm in ("point", "posterior")
    }
    verdicts = {k: verdict(arms["posterior"][k], arms["point"][k], lower_better=low) for k, low in METRICS.items()}
    wall = time.perf_counter() - t_start
    out = {
        "claim": "Bayesian KD's posterior predictive (SGLD over a LoRA adapter, token-level BKD potential) vs the "
        "trained KD student's point estimate, token calibration on held-out responses",
        "setting": s
        | {
            "quick": args.quick,
            "kd_alpha": alpha,
            "teacher": "smollm2-135m-instruct",
            "student": "from_teacher, 6 of 30 layers, LoRA",
            "data": "demo prompts answered by the teacher (cached)",
            "eval": "teacher-forced on the held-out reference responses",
            "device": "cpu (2 cores)",
            "wall_seconds_this_process": round(wall, 1),
        },
        "arms": arms,
        "posterior_vs_point": verdicts,
        "per_seed": {
            str(seed): {k: r[k] for k in ("sgld_steps", "sgld_seconds", "train_seconds", "potential_first_last")}
            for seed, r in zip(s["seeds"], rows, strict=True)
        },
        "verdict_rule": "a gap is reported only when it exceeds the sum of the two arms' stds over seeds",
    }
    write_json_atomic(args.out, out)
    partial.finish()
    items: dict = {}
    for k in ("ece", "brier", "coverage"):
        items[f"point_{k}"] = arms["point"][k]["mean"]
        items[f"posterior_{k}"] = arms["posterior"][k]["mean"]
    items["ece_ratio"] = arms["posterior"]["ece"]["mean"] / arms["point"]["ece"]["mean"]
    items["ece"] = verdicts["ece"].replace(" ", "_")
    items["seeds"] = len(s["seeds"])
    print(summary_line("survey_bayesian_lm", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
