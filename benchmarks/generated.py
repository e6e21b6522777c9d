"""Learning from generated text: sequence-level, on-policy and rationale distillation.

Three parts, each measured in one run of this script (``--part all``):

* **demo** (the demo's teacher, student, data and equal optimizer steps): off-policy KD
  (forward KL on the teacher's responses), sequence-level KD (Kim & Rush 2016: SFT on the
  teacher's greedy responses), GKD (Agarwal et al. 2024: lambda = 0.5 of the steps on
  student samples, generalized JSD beta = 0.5), DistiLLM (Ko et al. 2024: skew forward
  KL alpha = 0.1, replay buffer, adaptive student-sample probability) and DistiLLM-2 (Ko et
  al. 2025: every step skew KL on the teacher's responses + skew reverse KL on the student's
  samples; once plain, once with its beta ramp and per-sequence skew) and MiniLLM (Gu et al.
  2024: reverse KL by policy gradient on teacher-mixed samples, mix 0.2). Held-out forward KL
  to the teacher, top-1 agreement, ROUGE-L; the student's generation tokens/s and the share
  of training time spent generating.
* **arith** (the project's multi-step arithmetic task, exact rationales): with the same
  training problems, students trained answer-only vs with rationales (Distilling
  step-by-step's multi-task, and chain-of-thought targets) at 25 %, 50 % and 100 % of the
  problems, equal steps; held-out exact match of the final number.
* **gsm8k** (``$POTSTILL_DATA/gsm8k``): rationale distillation (chain-of-thought targets from
  the human rationales) end to end into the demo's student on a training subset; exact match
  on the first 50 test problems, however small.

Usage: ``python benchmarks/generated.py [--part demo|arith|gsm8k|all] [--demo-runs a,b] [--quick] [--out PATH]``.
Writes JSON (a part run alone is merged into the existing file), prints one line.
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
from _common import held_out_metrics, summary_line, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "generated.json"
FRACTIONS = (0.25, 0.5, 1.0)
MODES = ("answer_only", "multitask", "cot")


def demo_runs():
    from potstill.recipes.divergences import ForwardKL, GeneralizedJSD, ReverseKL, SkewForwardKL
    from potstill.recipes.methods import RunConfig
    from potstill.recipes.options import ContrastiveOptions, MiniLLMOptions, OnPolicyOptions

    return [
        RunConfig(name="off_policy_kd", alpha=0.0, divergence=ForwardKL()),
        RunConfig(name="seq_kd", alpha=1.0),
        RunConfig(
            name="gkd",
            alpha=0.0,
            divergence=GeneralizedJSD(beta=0.5),
            on_policy=OnPolicyOptions(lmbda=0.5, temperature=1.0, max_new_tokens=32),
        ),
        RunConfig(
            name="distillm",
            alpha=0.0,
            divergence=SkewForwardKL(alpha=0.1),
            on_policy=OnPolicyOptions(
                lmbda=0.2,
                adaptive=True,
                adaptive_every=5,
                adaptive_step=0.2,
                adaptive_max=0.8,
                replay_size=64,
                replay_reuse=0.5,
                max_new_tokens=32,
            ),
        ),
        RunConfig(
            name="distillm2",
            alpha=0.0,
            divergence=SkewForwardKL(alpha=0.1),
            on_policy=OnPolicyOptions(max_new_tokens=32, contrastive=ContrastiveOptions()),
        ),
        RunConfig(
            name="distillm2_curriculum",
            alpha=0.0,
            divergence=SkewForwardKL(alpha=0.1),
            on_policy=OnPolicyOptions(
                max_new_tokens=32, contrastive=ContrastiveOptions(beta_end=1.5, adaptive_skew=True)
            ),
        ),
        RunConfig(
            name="minillm",
            alpha=0.0,
            divergence=ReverseKL(),
            on_policy=OnPolicyOptions(max_new_tokens=32, minillm=MiniLLMOptions(mix=0.2)),
        ),
    ]


def part_demo(quick: bool, work: Path, only: list[str] | None = None) -> dict:
    from potstill.recipes.distill import Recipe
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run
    from potstill.signals import TeacherMemo

    keep = None if only is None else {"off_policy_kd", *only}  # the baseline is always measured in the same run
    overrides = {"runs": [r.model_dump() for r in demo_runs() if keep is None or r.name in keep]}
    if quick:
        overrides |= {
            "data": {"source": {"kind": "demo", "num_prompts": 24, "max_new_tokens": 8}, "eval_size": 8},
            "train": {"max_steps": 4, "batch_size": 4},
        }
        for r in overrides["runs"]:
            if r.get("on_policy"):
                r["on_policy"].update(max_new_tokens=8, adaptive_every=2)
    recipe = Recipe.model_validate(overrides)
    prep = Prepared(recipe)
    memo = TeacherMemo()
    models, info = {}, {}
    for run in recipe.runs:
        out = work / "demo" / run.name
        student = copy.deepcopy(prep.student0).train()
        models[run.name], _ = train_run(
            recipe,
            run,
            student,
            prep.teacher,
            prep.tokenizer,
            prep.train_examples,
            out,
            prep.device,
            prep.vocab_size,
            memo=memo,
        )
        info[run.name] = json.loads((out / "train_info.json").read_text())
    res = held_out_metrics(prep, models, batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens)
    runs = {}
    for name in models:
        m, i = res[name], info[name]
        row = {k: m[k] for k in ("forward_kl", "top1_agreement", "rouge_l", "perplexity", "distinct_2")}
        row["train_seconds"] = i["train_seconds"]
        op = i.get("on_policy")
        if op:
            row["student_steps"] = sum(x != "data" for x in op["modes"])
            row["replayed_steps"] = sum(x == "replay" for x in op["modes"])
            row["gen_tokens"] = op["gen_tokens"]
            row["gen_tokens_per_s"] = op["gen_tokens"] / op["gen_seconds"] if op["gen_seconds"] > 0 else None
            row["gen_share_of_train_time"] = op["gen_seconds"] / i["train_seconds"]
            row["lmbda_history"] = op["lmbda_history"]
            if "minillm_stats" in op:
                row["minillm_stats"] = op["minillm_stats"]
            if "skew_history" in op:
                row["skew_history"], row["skew_anchors"] = op["skew_history"], op["skew_anchors"]
        runs[name] = row
    base = runs["off_policy_kd"]["forward_kl"]
    for row in runs.values():
        row["forward_kl_vs_off_policy"] = row["forward_kl"] / base
    return {
        "setup": {
            "teacher": recipe.teacher.model,
            "student": "from_teacher, 6 of 30 layers",
            "train_examples": len(prep.train_examples),
            "eval_examples": len(prep.eval_examples),
            "steps": recipe.train.max_steps,
            "batch_size": recipe.train.batch_size,
            "runs": [r.model_dump(mode="json") for r in recipe.runs],
        },
        "teacher": {k: res["teacher"][k] for k in ("rouge_l", "perplexity")},
        "runs": runs,
    }


def exact_match_of(model, tokenizer, examples, max_new_tokens: int) -> tuple[float, list[str]]:
    from potstill.data.rationale import exact_match
    from potstill.generate import generate

    gen = generate(
        model,
        tokenizer,
        [ex["prompt_ids"] for ex in examples],
        max_new_tokens=max_new_tokens,
        batch_size=16,
        progress=False,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.token_ids]
    return exact_match(texts, [ex["answer"] for ex in examples]), texts


def rationale_recipe(source: dict, steps: int, batch: int, eval_size: int, layers: int = 6, lr: float = 5e-4):
    from potstill.recipes.distill import Recipe

    return Recipe.model_validate(
        {
            "student": {"kind": "from_teacher", "layers": layers},
            "data": {"source": source, "eval_size": eval_size, "max_length": 256},
            "train": {"max_steps": steps, "batch_size": batch, "learning_rate": lr, "logging_steps": 10},
            "runs": [{"name": "sft", "alpha": 1.0}],
            "eval": {"include_untrained": False},
        }
    )


def train_rationale(recipe, work: Path, max_new_tokens: int) -> dict:
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run

    prep = Prepared(recipe)
    run = recipe.runs[0]
    model, curve = train_run(
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
    em, texts = exact_match_of(model, prep.tokenizer, prep.eval_examples, max_new_tokens)
    return {
        "exact_match": em,
        "train_pairs": len(prep.train_examples),
        "final_loss": curve[-1][1] if curve else None,
        "samples": [{"prompt": ex["reference"], "output": t} for ex, t in zip(prep.eval_examples[:3], texts[:3])],
    }


def part_arith(
    quick: bool,
    work: Path,
    level: int,
    steps: int,
    layers: int = 6,
    lr: float = 5e-4,
    modes: tuple[str, ...] = MODES,
    batch: int = 16,
) -> dict:
    n, eval_size = (60, 12) if quick else (700, 100)
    batch = 4 if quick else batch
    steps = 4 if quick else steps
    out: dict = {
        "setup": {
            "num_problems": n,
            "eval_problems": eval_size,
            "level": level,
            "steps": steps,
            "batch_size": batch,
            "learning_rate": lr,
            "student": f"from_teacher, {layers} of 30 layers (smollm2-135m-instruct)",
            "training": "alpha=1 on the exact rationales (equal steps and batch in every arm)",
        },
        "exact_match": {m: {} for m in modes},
    }
    for frac in FRACTIONS:
        for mode in modes:
            src = {"kind": "arithmetic", "num_problems": n, "level": level, "mode": mode, "fraction": frac}
            r = train_rationale(
                rationale_recipe(src, steps, batch, eval_size, layers, lr),
                work / f"a-{mode}-{frac}",
                64 if mode == "cot" else 12,
            )
            out["exact_match"][mode][str(frac)] = r["exact_match"]
            out.setdefault("details", {})[f"{mode}@{frac}"] = r
            print(f"arith {mode} {frac}: exact match {r['exact_match']:.3f}", flush=True)
    em = out["exact_match"]
    out["rationale_beats_answer_only"] = {
        mode: all(em[mode][str(f)] > em["answer_only"][str(f)] for f in FRACTIONS)
        for mode in ("multitask", "cot")
        if mode in em
    }
    return out


def part_gsm8k(quick: bool, work: Path) -> dict:
    limit, eval_size, steps, batch = (16, 4, 2, 2) if quick else (2000, 50, 60, 8)
    out = {
        "setup": {
            "train_problems": limit,
            "test_problems": eval_size,
            "steps": steps,
            "batch_size": batch,
            "student": "from_teacher, 6 of 30 layers (smollm2-135m-instruct)",
        },
        "exact_match": {},
    }
    for mode in ("cot",):
        src = {"kind": "gsm8k", "limit": limit, "mode": mode}
        r = train_rationale(rationale_recipe(src, steps, batch, eval_size), work / f"g-{mode}", 160)
        out["exact_match"][mode] = r["exact_match"]
        out.setdefault("details", {})[mode] = r
        print(f"gsm8k {mode}: exact match {r['exact_match']:.3f}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=["demo", "arith", "gsm8k", "all"])
    p.add_argument("--quick", action="store_true", help="tiny run, smoke test only")
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --quick: a temp file)")
    p.add_argument("--level", type=int, default=3, help="operations per arithmetic problem")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of each arithmetic student")
    p.add_argument("--layers", type=int, default=6, help="teacher layers the arithmetic student keeps (30: uncut)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the arithmetic students")
    p.add_argument("--batch", type=int, default=16, help="batch size of the arithmetic students")
    p.add_argument("--modes", default=",".join(MODES), help="arithmetic arms, comma-separated")
    p.add_argument(
        "--demo-runs",
        default=None,
        help="only these demo arms (comma-separated; off_policy_kd always runs as the baseline); "
        "their results go under demo_<names> instead of replacing demo",
    )
    args = p.parse_args(argv)

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    out = (
        Path(args.out)
        if args.out
        else (Path(tempfile.gettempdir()) / "generated_quick.json" if args.quick else DEFAULT_OUT)
    )
    results = json.loads(out.read_text()) if out.is_file() and args.part != "all" else {}
    results["torch_threads"] = torch.get_num_threads()
    results["quick"] = args.quick
    with tempfile.TemporaryDirectory(prefix="potstill-bench-generated-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.part in ("demo", "all"):
            only = None if args.demo_runs is None else [n for n in args.demo_runs.split(",") if n]
            key = "demo" if only is None else "demo_" + "_".join(n for n in only if n != "off_policy_kd")
            results[key] = part_demo(args.quick, work, only)
        if args.part in ("arith", "all"):
            results["arith"] = part_arith(
                args.quick, work, args.level, args.steps, args.layers, args.lr, tuple(args.modes.split(",")), args.batch
            )
        if args.part in ("gsm8k", "all"):
            results["gsm8k"] = part_gsm8k(args.quick, work)
        results[f"seconds_{args.part}"] = time.perf_counter() - t0
    write_json_atomic(out, results)
    items: dict = {}
    for key in [k for k in results if k == "demo" or k.startswith("demo_")]:
        d = results[key]["runs"]
        items |= {f"fkl_vs_offpolicy_{k}": v["forward_kl_vs_off_policy"] for k, v in d.items() if k != "off_policy_kd"}
        if "gkd" in d:
            items["gkd_gen_share"] = d["gkd"].get("gen_share_of_train_time")
    if "arith" in results:
        items["rationale_beats_answer_only"] = results["arith"]["rationale_beats_answer_only"]
    if "gsm8k" in results:
        items["gsm8k_em"] = results["gsm8k"]["exact_match"]
    items["json"] = str(out)
    print(summary_line("generated", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
