"""The survey's remaining methods (issue 18), measured against plain KD in one file.

Each method has its own script (``benchmarks/survey_<part>.py``) that writes
``benchmarks/results/survey_<part>.json``; this script runs the parts it owns and merges every
part's JSON into ``benchmarks/results/survey_methods.json`` with one summary line.

Parts run here:

* **bild** (the demo's teacher, 6-layer student and data, equal optimizer steps): forward-KL KD
  vs the BiLD loss (top-8 logit differences, Li et al. 2024) over ``--seeds`` training seeds
  (data order). Held-out forward KL to the teacher and top-1 agreement, mean and standard
  deviation over seeds; the gap is called a difference only when it exceeds the larger spread.

Parts merged (run on their own; see each script's docstring): ``self_distill``, ``kpod``,
``diverse``, ``bayesian``, ``valuation``, ``cc_shap``, ``pubmedqa``, ``vlm``.

Usage: ``python benchmarks/survey_methods.py [--part bild|merge|all] [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import held_out_metrics, seed_stats, summary_line, verdict, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "survey_methods.json"
MERGED = ("self_distill", "kpod", "diverse", "bayesian", "bayesian_lm", "valuation", "cc_shap", "pubmedqa", "vlm")


def demo_arms(runs: list[dict], seeds: list[int], quick: bool, work: Path) -> dict:
    """Train every run of ``runs`` (RunConfig dicts) on the demo setup once per training seed; held-out
    forward KL and top-1 agreement per run and seed."""
    from potstill.recipes.distill import Recipe
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run
    from potstill.signals import TeacherMemo

    base = {"runs": runs}
    if quick:
        base |= {
            "data": {"source": {"kind": "demo", "num_prompts": 24, "max_new_tokens": 8}, "eval_size": 8},
            "train": {"max_steps": 3, "batch_size": 4},
            "eval": {"max_new_tokens": 4},
        }
    recipe0 = Recipe.model_validate(base)
    prep = Prepared(recipe0)
    per: dict[str, dict[str, list[float]]] = {r["name"]: {"forward_kl": [], "top1_agreement": []} for r in runs}
    seconds: dict[str, list[float]] = {r["name"]: [] for r in runs}
    for seed in seeds:
        recipe = Recipe.model_validate(base | {"train": {**base.get("train", {}), "seed": seed}})
        memo = TeacherMemo()
        models = {}
        for run in recipe.runs:
            out = work / f"seed{seed}" / run.name
            models[run.name], _ = train_run(
                recipe,
                run,
                copy.deepcopy(prep.student0).train(),
                prep.teacher,
                prep.tokenizer,
                prep.train_examples,
                out,
                prep.device,
                prep.vocab_size,
                memo=memo,
            )
            seconds[run.name].append(json.loads((out / "train_info.json").read_text())["train_seconds"])
        res = held_out_metrics(
            prep, models, batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens
        )
        for name in models:
            for k in per[name]:
                per[name][k].append(float(res[name][k]))
    return {
        "setup": {
            "teacher": recipe0.teacher.model,
            "student": "from_teacher, 6 of 30 layers",
            "train_examples": len(prep.train_examples),
            "eval_examples": len(prep.eval_examples),
            "steps": recipe0.train.max_steps,
            "batch_size": recipe0.train.batch_size,
            "seeds": seeds,
            "runs": runs,
        },
        "runs": {
            name: {k: seed_stats(v) for k, v in m.items()} | {"train_seconds": seed_stats(seconds[name])}
            for name, m in per.items()
        },
    }


def part_bild(seeds: list[int], quick: bool, work: Path) -> dict:
    runs = [
        {"name": "forward_kl", "alpha": 0.0, "divergence": {"name": "forward_kl"}},
        {"name": "bild", "alpha": 0.0, "divergence": {"name": "bild", "top_k": 8}},
    ]
    out = demo_arms(runs, seeds, quick, work)
    kd, bild = out["runs"]["forward_kl"], out["runs"]["bild"]
    out["verdict"] = {
        "forward_kl": verdict(bild["forward_kl"], kd["forward_kl"], lower_better=True),
        "top1_agreement": verdict(bild["top1_agreement"], kd["top1_agreement"], lower_better=False),
    }
    out["ratios"] = {
        "forward_kl_bild_vs_kd": bild["forward_kl"]["mean"] / kd["forward_kl"]["mean"],
        "agreement_bild_vs_kd": bild["top1_agreement"]["mean"] / kd["top1_agreement"]["mean"],
    }
    return out


def merge(result: dict) -> dict:
    for part in MERGED:
        path = RESULTS / f"survey_{part}.json"
        result.setdefault("parts", {})[part] = json.loads(path.read_text()) if path.is_file() else {"missing": True}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["bild", "merge", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    t0 = time.perf_counter()
    if args.part in ("bild", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            result["bild"] = part_bild(list(range(args.seeds)), args.quick, Path(tmp))
        result["bild"]["wall_seconds"] = time.perf_counter() - t0
    result = merge(result)
    result["quick"] = args.quick
    write_json_atomic(args.out, result)
    items = {}
    if "bild" in result:
        items |= {k: round(v, 3) for k, v in result["bild"]["ratios"].items()}
        items["bild_verdict_fkl"] = result["bild"]["verdict"]["forward_kl"]
    items["parts"] = sum(not p.get("missing") for p in result["parts"].values())
    print(summary_line("survey_methods", items))


if __name__ == "__main__":
    main()
