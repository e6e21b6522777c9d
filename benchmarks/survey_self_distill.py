"""Self-distillation against plain KD and SFT on the demo setup, at equal optimizer steps, over 3 seeds.

The demo (recipes/demo.yaml): SmolLM2-135M-Instruct teaches a 6-layer student cut from its own layers on the
demo prompts, answered by the teacher (cached). Four arms, each trained from the same cut student:

* ``sft``: cross-entropy on the teacher's answers (alpha 1);
* ``kd``: plain forward-KL KD from the real teacher (alpha 0, as in the demo);
* ``self_frozen``: CE + forward KL to a frozen copy of the initial student (born-again, Furlanello et al. 2018);
* ``self_ema``: CE + forward KL to an EMA of the student (mean teacher, Tarvainen & Valpola 2017).

The self arms mix CE (alpha 0.5): a self teacher equals the student at step 0, so pure KD to it has no gradient.
Every student is evaluated on the held-out split against the *real* teacher (teacher-forced forward
KL(teacher || student) and top-1 agreement per response token, :func:`potstill.eval.evaluate_runs`, no
generation). Ratios are against plain KD measured in the same run; a gap counts only when it exceeds the sum
of the two arms' standard deviations over seeds.

Usage: ``python benchmarks/survey_self_distill.py [--quick] [--steps N] [--out PATH]``; writes
``benchmarks/results/survey_self_distill.json`` and prints one line.
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
from _common import Partial, held_out_metrics, seed_stats, summary_line, verdict, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "survey_self_distill.json"
ARMS = ("sft", "kd", "self_frozen", "self_ema")
SEEDS = (0, 1, 2)


def setting(quick: bool, steps: int | None, batch_size: int | None = None) -> dict:
    """The committed setting (the demo's 40 steps of 8 examples) or a tiny smoke one."""
    s = {
        "steps": 2 if quick else 40,
        "batch_size": 2 if quick else 8,
        "learning_rate": 5e-4,
        "eval_size": 8 if quick else 40,
        "max_length": 96,
        "self_alpha": 0.5,
        "ema_decay": 0.9,
        "seeds": list(SEEDS[:1] if quick else SEEDS),
    }
    if steps is not None:
        s["steps"] = steps
    if batch_size is not None:
        s["batch_size"] = batch_size
    return s


def arm_runs(s: dict):
    from potstill.recipes.divergences import ForwardKL
    from potstill.recipes.methods import RunConfig

    fkl = ForwardKL()
    return {
        "sft": RunConfig(name="sft", alpha=1.0),
        "kd": RunConfig(name="kd", alpha=0.0, divergence=fkl),
        "self_frozen": RunConfig(name="self_frozen", alpha=s["self_alpha"], divergence=fkl),
        "self_ema": RunConfig(name="self_ema", alpha=s["self_alpha"], divergence=fkl),
    }


def _metrics(prep, models: dict) -> dict:
    """Teacher-forced held-out figures of ``models`` against the real teacher (no generation)."""
    res = held_out_metrics(prep, models, batch_size=8, max_new_tokens=0)
    return {name: {k: res[name][k] for k in ("forward_kl", "top1_agreement", "perplexity")} for name in models}


def train_arms(s: dict, work: Path, partial: Partial) -> tuple[dict, dict]:
    """Every arm and seed trained from the same cut student and scored as it finishes (kept in ``partial``,
    so a killed run resumes at the next unit); ``(results by "arm/seed", prepared-setup info)``."""
    from potstill.recipes.distill import Recipe
    from potstill.recipes.models import SelfTeacher
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run
    from potstill.signals import TeacherMemo

    # demo data at the demo's own settings (200 prompts, 32 new tokens): the teacher's cached answers
    base = Recipe.model_validate(
        {
            "data": {"eval_size": s["eval_size"], "max_length": s["max_length"]},
            "train": {"max_steps": s["steps"], "batch_size": s["batch_size"], "learning_rate": s["learning_rate"]},
            "runs": [r.model_dump() for r in arm_runs(s).values()],
            "device": "cpu",
        }
    )
    prep = Prepared(base)
    memo = TeacherMemo()  # the real teacher's rows only: never handed to a self teacher
    teachers = {
        "sft": base.teacher,
        "kd": base.teacher,
        # the demo's student is cut from the teacher (student.kind from_teacher), which a self-teacher recipe
        # refuses for want of a teacher model; here the cut student is already built, so the recipe is copied
        # with the self teacher, unvalidated
        "self_frozen": SelfTeacher(mode="frozen"),
        "self_ema": SelfTeacher(mode="ema", decay=s["ema_decay"]),
    }
    if "student_init" not in partial:
        partial.put("student_init", _metrics(prep, {"student_init": prep.student0})["student_init"])
    for seed in s["seeds"]:
        for arm, run in arm_runs(s).items():
            key = f"{arm}/{seed}"
            if key in partial:
                continue
            recipe = base.model_copy(
                update={"teacher": teachers[arm], "train": base.train.model_copy(update={"seed": seed})}
            )
            self_arm = arm.startswith("self")
            t0 = time.perf_counter()
            model, _ = train_run(
                recipe,
                run,
                copy.deepcopy(prep.student0).train(),
                None if self_arm else prep.teacher,
                prep.tokenizer,
                prep.train_examples,
                work / f"{arm}_{seed}",
                prep.device,
                prep.vocab_size,
                memo=None if self_arm else memo,
            )
            seconds = time.perf_counter() - t0
            partial.put(key, _metrics(prep, {key: model.eval()})[key] | {"train_seconds": seconds})
            del model
    info = {
        "teacher": base.teacher.model,
        "student": f"from_teacher, {base.student.layers} layers",
        "data": "demo prompts answered by the teacher (cached), 200 prompts, 32 new tokens",
        "train_examples": len(prep.train_examples),
        "eval_examples": len(prep.eval_examples),
    }
    return dict(partial.done), info


def summarize(res: dict, s: dict) -> dict:
    arms = {}
    for arm in ARMS:
        rows = [res[f"{arm}/{seed}"] for seed in s["seeds"]]
        arms[arm] = {
            "forward_kl": seed_stats([r["forward_kl"] for r in rows]),
            "top1_agreement": seed_stats([r["top1_agreement"] for r in rows]),
            "perplexity": seed_stats([r["perplexity"] for r in rows]),
        }
    base = arms["kd"]
    for row in arms.values():
        row["forward_kl_vs_kd"] = row["forward_kl"]["mean"] / base["forward_kl"]["mean"]
        row["agreement_vs_kd"] = row["top1_agreement"]["mean"] / base["top1_agreement"]["mean"]
        row["vs_kd"] = {
            "forward_kl": verdict(row["forward_kl"], base["forward_kl"], lower_better=True),
            "top1_agreement": verdict(row["top1_agreement"], base["top1_agreement"], lower_better=False),
        }
        row["vs_sft"] = {
            "forward_kl": verdict(row["forward_kl"], arms["sft"]["forward_kl"], lower_better=True),
            "top1_agreement": verdict(row["top1_agreement"], arms["sft"]["top1_agreement"], lower_better=False),
        }
    return arms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke setting (one seed, 2 steps)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the setting's)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the setting's)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    s = setting(args.quick, args.steps, args.batch_size)
    partial = Partial(args.out, s)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="survey_self_distill_") as tmp:
        res, info = train_arms(s, Path(tmp), partial)
    arms = summarize(res, s)
    wall = time.perf_counter() - t_start
    out = {
        "claim": "self-distillation (frozen copy / EMA of the student as teacher) vs plain KD from the real "
        "teacher and SFT, at equal optimizer steps, scored against the real teacher on held-out data",
        "setting": s
        | info
        | {
            "quick": args.quick,
            "kd_alpha": 0.0,
            "divergence": "forward_kl, temperature 1",
            "eval": "teacher-forced on the held-out split, no generation",
            "device": "cpu (2 shared cores)",
            "wall_seconds": round(wall, 1),
        },
        "student_init": {k: res["student_init"][k] for k in ("forward_kl", "top1_agreement", "perplexity")},
        "arms": arms,
        "train_seconds": {k: v["train_seconds"] for k, v in res.items() if "train_seconds" in v},
        "verdict_rule": "a gap is reported only when it exceeds the sum of the two arms' stds over seeds",
    }
    write_json_atomic(args.out, out)
    partial.finish()
    items = {}
    for arm in ARMS:
        items[f"{arm}_fkl"] = arms[arm]["forward_kl"]["mean"]
        items[f"{arm}_fkl_vs_kd"] = arms[arm]["forward_kl_vs_kd"]
    items["self_ema_vs_sft_fkl"] = arms["self_ema"]["vs_sft"]["forward_kl"].replace(" ", "_")
    items["self_ema_vs_frozen_fkl_ratio"] = (
        arms["self_ema"]["forward_kl"]["mean"] / arms["self_frozen"]["forward_kl"]["mean"]
    )
    items["wall_s"] = round(wall, 1)
    print(summary_line("survey_self_distill", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
