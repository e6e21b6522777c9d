"""Student-aware multi-teacher weighting (DiverseDistill-style, Fang et al. 2025 survey) against mean and one teacher.

Setup (the demo): teacher SmolLM2-135M-Instruct, the demo prompts answered by it, a 6-of-30-layer cut of it as the
student; the second teacher is the teacher's own 15-of-30-layer cut (same tokenizer, a weaker voice), as in
``benchmarks/heterogeneous.py``. Arms, each at equal optimizer steps, forward KL at T = 1, alpha = 0:

* ``single``: KD from the teacher alone (the baseline);
* ``mean``: MultiTeacher mode mean (1/2, 1/2);
* ``student_aware``: MultiTeacher mode student_aware (tau 1, favor understood, no EMA): per example, weights
  softmax_k(-mean KL(p_k || q_student) / tau), recomputed every step.

Measured on the held-out examples against the (first) teacher: forward KL per response token and top-1 agreement,
mean and std over 3 seeds (the seed sets the data order), and the ratio of each arm's mean to ``single``'s; for
``student_aware`` also the teachers' mean weights. A gap is called measurable only when it exceeds the spread.

``student_aware`` needs ``KDTrainer`` to pass the student to the signal (``_batch_signal(inputs, student=...)``);
without that hook the arm is reported as "skipped: needs logit.py hook".

Usage: ``python benchmarks/survey_diverse.py [--quick] [--steps N] [--seeds 0 1 2] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Partial, held_out_metrics, seed_stats, summary_line, verdict, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "survey_diverse.json"
ARMS = ("single", "mean", "student_aware")
SKIPPED = "skipped: needs logit.py hook"


def hook_present() -> bool:
    """Whether KDTrainer hands the student's rows to the teacher signal (the logit.py edit)."""
    from potstill.kd import KDTrainer

    return "student" in inspect.signature(KDTrainer._batch_signal).parameters


def _source(arm: str, teacher, second, tau: float):
    from potstill.signals import MultiTeacher, OnlineTeacher

    if arm == "single":
        return OnlineTeacher(teacher)
    return MultiTeacher([OnlineTeacher(teacher), OnlineTeacher(second)], mode=arm, tau=tau)


def _train(prep, recipe, arm: str, seed: int, second, tau: float, work: Path):
    """One student trained by one arm; returns (model, seconds, the source)."""
    from datasets import Dataset

    from potstill.kd import KDTrainer
    from potstill.recipes.divergences import ForwardKL
    from potstill.recipes.methods import RunConfig
    from potstill.runners.train import TRAIN_COLUMNS, kd_config

    run = RunConfig(name=f"{arm}_{seed}", alpha=0.0, divergence=ForwardKL())
    student = copy.deepcopy(prep.student0).train()
    cfg = kd_config(recipe, run, str(work / run.name), prep.device, student)
    cfg.seed = cfg.data_seed = seed
    cfg.disable_tqdm = True
    ds = Dataset.from_list([{k: ex[k] for k in TRAIN_COLUMNS if k in ex} for ex in prep.train_examples])
    src = _source(arm, prep.teacher, second, tau)
    trainer = KDTrainer(
        model=student,
        signal_source=src,
        args=cfg,
        train_dataset=ds,
        processing_class=prep.tokenizer,
        vocab_size=prep.vocab_size,
    )
    t0 = time.perf_counter()
    trainer.train()
    return trainer.model.eval(), time.perf_counter() - t0, src


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke setting: 2 steps, 1 seed, few examples")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per student (all arms alike)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tau", type=float, default=1.0, help="student_aware's softmax temperature (nats)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    import torch

    import potstill
    from potstill.models import student_from_teacher
    from potstill.recipes.distill import Recipe
    from potstill.runners.prepare import Prepared

    t_start = time.perf_counter()
    steps, seeds = (2, args.seeds[:1]) if args.quick else (args.steps, args.seeds)
    overrides = {"train": {"max_steps": steps, "batch_size": args.batch_size}}
    if args.quick:
        overrides["data"] = {"source": {"kind": "demo", "num_prompts": 24, "max_new_tokens": 8}, "eval_size": 8}
    recipe = Recipe.model_validate(overrides)
    partial = Partial(args.out, {"overrides": overrides, "seeds": seeds, "tau": args.tau})
    prep = Prepared(recipe)
    second = student_from_teacher(prep.teacher, 15).to(prep.device).eval()
    hooked = hook_present()
    arms = [a for a in ARMS if a != "student_aware" or hooked]

    def metrics(key: str, model) -> dict:
        res = held_out_metrics(prep, {key: model}, batch_size=recipe.eval.batch_size)
        return {k: res[key][k] for k in ("forward_kl", "top1_agreement")} | {
            "teacher_self": {k: res["teacher"][k] for k in ("forward_kl", "top1_agreement")}
        }

    with tempfile.TemporaryDirectory(prefix="survey_diverse_") as tmp:
        for seed in seeds:
            for arm in arms:
                key = f"{arm}/{seed}"
                if key in partial:
                    continue
                model, secs, src = _train(prep, recipe, arm, seed, second, args.tau, Path(tmp))
                row = metrics(key, model) | {"train_seconds": secs}
                if arm == "student_aware":
                    row["mean_weights"] = src.mean_weights
                partial.put(key, row)
                del model
    res = partial.done
    runs: dict[str, dict | str] = {}
    for arm in arms:
        keys = [f"{arm}/{s}" for s in seeds]
        runs[arm] = {
            "forward_kl": seed_stats([res[k]["forward_kl"] for k in keys]),
            "top1_agreement": seed_stats([res[k]["top1_agreement"] for k in keys]),
            "train_seconds": seed_stats([res[k]["train_seconds"] for k in keys]),
        }
    base = runs["single"]
    for arm in arms:
        r = runs[arm]
        r["forward_kl_vs_single"] = _ratio(r["forward_kl"]["mean"], base["forward_kl"]["mean"])
        r["agreement_vs_single"] = _ratio(r["top1_agreement"]["mean"], base["top1_agreement"]["mean"])
        r["train_time_vs_single"] = _ratio(r["train_seconds"]["mean"], base["train_seconds"]["mean"])
        if arm != "single":
            r["forward_kl_verdict"] = verdict(r["forward_kl"], base["forward_kl"], lower_better=True)
            r["agreement_verdict"] = verdict(r["top1_agreement"], base["top1_agreement"], lower_better=False)
    if hooked:
        runs["student_aware"]["mean_teacher_weights"] = [
            [round(w, 4) for w in ws] if ws else None
            for ws in (res[f"student_aware/{s}"]["mean_weights"] for s in seeds)
        ]  # per seed: [teacher, 15-layer cut]
    else:
        runs["student_aware"] = SKIPPED
    out = {
        "setting": {
            "quick": args.quick,
            "teacher": recipe.teacher.model,
            "student": "6-of-30-layer cut of the teacher (the demo's)",
            "second_teacher": "15-of-30-layer cut of the teacher (same tokenizer)",
            "train_examples": len(prep.train_examples),
            "eval_examples": len(prep.eval_examples),
            "steps": steps,
            "batch_size": args.batch_size,
            "learning_rate": recipe.train.learning_rate,
            "seeds": seeds,
            "divergence": "forward_kl, T = 1, alpha = 0",
            "student_aware": {"tau": args.tau, "favor": "understood", "ema": 0.0},
            "metrics": "held-out, teacher-forced, against the first teacher: forward KL per response token, "
            "top-1 agreement",
            "logit_hook": hooked,
            "potstill_src": str(Path(potstill.__file__).resolve().parent),
            "torch_threads": torch.get_num_threads(),
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        },
        "teacher_self_check": res[f"single/{seeds[0]}"]["teacher_self"],
        "verdict_rule": "a gap is reported only when it exceeds the sum of the two arms' stds over seeds",
        "runs": runs,
    }
    write_json_atomic(args.out, out)
    partial.finish()
    items: dict = {"single_kl": base["forward_kl"]["mean"]}
    for arm in ("mean", "student_aware"):
        r = runs[arm]
        if isinstance(r, str):
            items[arm] = r.replace(" ", "_")
            continue
        items[f"{arm}_kl_x"] = r["forward_kl_vs_single"]
        items[f"{arm}_agree_x"] = r["agreement_vs_single"]
    items["seeds"] = len(seeds)
    items["wall_s"] = out["setting"]["wall_seconds"]
    print(summary_line("survey_diverse", items))


if __name__ == "__main__":
    main()
