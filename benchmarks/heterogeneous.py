"""Beyond one teacher and one tokenizer: the ablation of issue 5, in one run.

Parts (``--part all`` runs every one):

* **kd** (the demo's teacher, 6-layer student and data, equal optimizer steps): plain
  forward-KL KD against each method of :mod:`potstill.kd.adaptive`, feature KD and
  multi-teacher KD: teacher-confidence and max-prob token weights, selective KD on the
  student's most uncertain half of the positions, temperature and CE/KD schedules, an
  easy-to-hard curriculum, hidden-state distillation (FitNets-style, identity projection
  since widths match), and a two-teacher mix. Held-out forward KL to the teacher, top-1
  agreement and ECE, each also as a ratio to plain KD. A second two-teacher arm takes
  ``gemma3-270m`` (another tokenizer) as the second teacher: it joins on the rows where the two
  tokenizations align, through the vocabulary map (its coverage is reported).
* **cross** (teacher ``gemma3-270m``, vocabulary 262,144 -> a 6-layer cut of SmolLM2-135M,
  vocabulary 49,152, the demo's prompts answered by the SmolLM2 teacher): SFT vs ULD vs
  vocabulary-mapping KD at equal steps; the student's perplexity of the held-out references
  and ROUGE-L, and the coverage of the vocabulary map.
* **classifier** (task-specific KD, SMS spam): the fine-tuned all-MiniLM-L6-v2 teacher, a
  2-layer student distilled from it (logits + hidden states) and the same student trained
  without the teacher; accuracy, F1, parameters and latency ratio to the teacher.

Usage: ``python benchmarks/heterogeneous.py [--part kd|cross|classifier|all] [--quick] [--out PATH]``.
Writes JSON (a part run alone is merged into the existing file) and prints one line.
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
DEFAULT_OUT = HERE / "results" / "heterogeneous.json"


def kd_runs(student_layers: list[int]):
    """The ablation arms; the feature pairs map student layers to the teacher layers they were cut from."""
    from potstill.recipes.divergences import ForwardKL
    from potstill.recipes.methods import RunConfig
    from potstill.recipes.options import FeatureOptions, MultiTeacherOptions, ScheduleOptions

    mid = len(student_layers) // 2
    pairs = [(mid, student_layers[mid - 1] + 1), (len(student_layers), -1)]
    fkl = ForwardKL()
    return [
        RunConfig(name="plain_kd", alpha=0.0, divergence=fkl),
        RunConfig(name="teacher_confidence", alpha=0.0, divergence=fkl, token_weighting="teacher_confidence"),
        RunConfig(name="teacher_maxprob", alpha=0.0, divergence=fkl, token_weighting="teacher_maxprob"),
        RunConfig(
            name="selective_student_entropy",
            alpha=0.0,
            divergence=fkl,
            token_weighting="student_entropy",
            token_weighting_ratio=0.5,
        ),
        RunConfig(
            name="temperature_schedule",
            alpha=0.0,
            divergence=fkl,
            temperature=2.0,
            schedule=ScheduleOptions(kind="cosine", temperature_end=1.0),
        ),
        RunConfig(name="alpha_schedule", alpha=0.5, divergence=fkl, schedule=ScheduleOptions(alpha_end=0.0)),
        RunConfig(name="curriculum", alpha=0.0, divergence=fkl, curriculum="easy_to_hard"),
        RunConfig(
            name="feature_kd", alpha=0.0, divergence=fkl, feature=FeatureOptions(layers=pairs, loss="mse", weight=1.0)
        ),
        RunConfig(
            name="multi_teacher_confidence",
            alpha=0.0,
            divergence=fkl,
            multi_teacher=MultiTeacherOptions(mode="confidence", confidence="entropy"),
        ),
        # the second teacher has another tokenizer (gemma3-270m): it joins on aligned rows via the vocab map
        RunConfig(
            name="multi_teacher_cross_tokenizer",
            alpha=0.0,
            divergence=fkl,
            multi_teacher=MultiTeacherOptions(mode="confidence", confidence="entropy"),
        ),
    ]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def part_kd(quick: bool, work: Path) -> dict:
    from potstill.models import select_layers
    from potstill.recipes.distill import Recipe
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run
    from potstill.signals import TeacherMemo

    layers = select_layers(30, 6)
    overrides = {
        "runs": [r.model_dump() for r in kd_runs(layers)],
        # the second teacher: the demo teacher's own 15-layer cut (same tokenizer), a weaker voice
        "extra_teachers": [{"model": "smollm2-135m-instruct"}],
    }
    if quick:
        overrides |= {
            "data": {"source": {"kind": "demo", "num_prompts": 24, "max_new_tokens": 8}, "eval_size": 8},
            "train": {"max_steps": 3, "batch_size": 4},
        }
    recipe = Recipe.model_validate(overrides)
    prep = Prepared(recipe)
    extra = prep.extra_teachers()
    from potstill.models import student_from_teacher

    extra = [student_from_teacher(extra[0].model, 15).to(prep.device).eval()]
    from potstill.models import load_model
    from potstill.runners.prepare import ExtraTeacher

    gemma, gemma_tok = load_model("gemma3-270m")
    extra_cross = [ExtraTeacher(gemma.to(prep.device).eval(), gemma_tok)]
    memo = TeacherMemo()
    models, info = {}, {}
    for run in recipe.runs:
        out = work / "kd" / run.name
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
            extra_teachers=extra_cross if "cross_tokenizer" in run.name else extra,
        )
        info[run.name] = json.loads((out / "train_info.json").read_text())
    res = held_out_metrics(prep, models, batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens)
    runs = {}
    base = res["plain_kd"]
    for name in models:
        m = res[name]
        row = {k: m[k] for k in ("forward_kl", "top1_agreement", "ece", "perplexity", "rouge_l")}
        row["train_seconds"] = info[name]["train_seconds"]
        row["forward_kl_vs_plain"] = _ratio(m["forward_kl"], base["forward_kl"])
        row["agreement_vs_plain"] = _ratio(m["top1_agreement"], base["top1_agreement"])
        row["ece_vs_plain"] = _ratio(m["ece"], base["ece"])
        row["train_time_vs_plain"] = _ratio(info[name]["train_seconds"], info["plain_kd"]["train_seconds"])
        if "cross_tokenizer_coverage" in info[name]:
            row["second_teacher_coverage"] = info[name]["cross_tokenizer_coverage"]["1"]
        runs[name] = row
    return {
        "setup": {
            "teacher": recipe.teacher.model,
            "student": f"from_teacher, layers {layers}",
            "second_teacher": {
                "multi_teacher_confidence": "15-of-30-layer cut of the teacher",
                "multi_teacher_cross_tokenizer": "gemma3-270m (vocab 262,144), projected on aligned rows",
            },
            "train_examples": len(prep.train_examples),
            "eval_examples": len(prep.eval_examples),
            "steps": recipe.train.max_steps,
            "batch_size": recipe.train.batch_size,
            "runs": [r.model_dump(mode="json") for r in recipe.runs],
        },
        "teacher": {k: res["teacher"][k] for k in ("ece", "perplexity", "rouge_l")},
        "runs": runs,
    }


def part_cross(quick: bool, work: Path, steps: int | None = None) -> dict:
    from potstill.eval import evaluate_runs, metrics_only
    from potstill.recipes.distill import load_recipe
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run

    overrides = [f"train.max_steps={steps}"] if steps else []
    if quick:
        overrides = ["train.max_steps=2", "train.batch_size=2", "data.eval_size=4", "eval.max_new_tokens=4"]
    recipe = load_recipe(HERE.parent / "recipes" / "cross_tokenizer.yaml", overrides)
    t0 = time.perf_counter()
    prep = Prepared(recipe)
    ctx = prep.cross_context()
    map_seconds = time.perf_counter() - t0
    models, info = {"student_init": prep.student0}, {}
    for run in recipe.runs:
        out = work / "cross" / run.name
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
            cross=ctx,
        )
        info[run.name] = json.loads((out / "train_info.json").read_text())
    res = metrics_only(
        evaluate_runs(
            models,
            None,
            prep.tokenizer,
            prep.eval_examples,
            batch_size=recipe.eval.batch_size,
            max_new_tokens=recipe.eval.max_new_tokens,
            progress=False,
        )
    )
    runs = {}
    for name in models:
        row = {k: res[name][k] for k in ("perplexity", "ece", "rouge_l")}
        if name in info:
            row["train_seconds"] = info[name]["train_seconds"]
            row["coverage"] = info[name].get("cross_tokenizer")
        row["perplexity_vs_sft"] = _ratio(res[name]["perplexity"], res["sft"]["perplexity"])
        runs[name] = row
    vmap = ctx.get("vocab_map")
    return {
        "setup": {
            "teacher": recipe.teacher.model,
            "student": "smollm2-135m-instruct, 6 of 30 layers",
            "data": "AlpacaEval instructions with GPT-4 answers",
            "train_examples": len(prep.train_examples),
            "eval_examples": len(prep.eval_examples),
            "steps": recipe.train.max_steps,
            "batch_size": recipe.train.batch_size,
            "runs": [r.model_dump(mode="json") for r in recipe.runs],
        },
        "vocab_map": {
            "teacher_tokens_by_kind": vmap.counts() if vmap is not None else None,
            "prepare_seconds": map_seconds,
        },
        "runs": runs,
    }


def part_classifier(quick: bool, work: Path) -> dict:
    """recipes/classify_sms_spam.yaml as it stands (teacher, KD student, no-teacher student)."""
    from potstill.recipes.classify import load_classifier_recipe
    from potstill.runners.classify import run_classifier_recipe

    overrides = ["train.steps=4", "teacher.steps=4", "data.train_size=64", "eval.size=32"] if quick else []
    recipe = load_classifier_recipe(HERE.parent / "recipes" / "classify_sms_spam.yaml", overrides)
    # the recipe's own output_dir keeps the fine-tuned teacher (keyed by its settings and data) across runs
    m = run_classifier_recipe(recipe, work / "classifier" if quick else None)
    keep = (
        "accuracy",
        "f1",
        "macro_f1",
        "ece",
        "params",
        "params_ratio",
        "latency_ms_per_example",
        "speedup",
        "train_seconds",
    )
    return {
        "setup": {k: m[k] for k in ("dataset", "n_train", "n_eval", "steps", "kd", "student_layers")},
        "models": {name: {k: row.get(k) for k in keep} for name, row in m["models"].items()},
        "kd_at_least_as_accurate": m["kd_at_least_as_accurate"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=["kd", "cross", "classifier", "all"])
    p.add_argument("--quick", action="store_true", help="tiny run, smoke test only")
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --quick: a temp file)")
    p.add_argument("--cross-steps", type=int, default=None, help="optimizer steps of the cross part (recipe: 40)")
    args = p.parse_args(argv)

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    out = (
        Path(args.out)
        if args.out
        else (Path(tempfile.gettempdir()) / "heterogeneous_quick.json" if args.quick else DEFAULT_OUT)
    )
    results = json.loads(out.read_text()) if out.is_file() and args.part != "all" else {}
    results["torch_threads"] = torch.get_num_threads()
    results["quick"] = args.quick
    parts = {"kd": part_kd, "cross": lambda q, w: part_cross(q, w, args.cross_steps), "classifier": part_classifier}
    with tempfile.TemporaryDirectory(prefix="potstill-bench-heterogeneous-") as tmp:
        work = Path(tmp)
        for name, fn in parts.items():
            if args.part in (name, "all"):
                t0 = time.perf_counter()
                results[name] = fn(args.quick, work)
                results[name]["seconds"] = time.perf_counter() - t0
    write_json_atomic(out, results)
    items: dict = {}
    if "kd" in results:
        items |= {
            f"fkl_vs_plain_{k}": v["forward_kl_vs_plain"] for k, v in results["kd"]["runs"].items() if k != "plain_kd"
        }
    if "cross" in results:
        items |= {
            f"ppl_vs_sft_{k}": v["perplexity_vs_sft"]
            for k, v in results["cross"]["runs"].items()
            if k in ("uld", "vocab_map")
        }
    if "classifier" in results:
        c = results["classifier"]["models"]
        items["sms_kd_acc"] = c["kd_student"]["accuracy"]
        items["sms_no_teacher_acc"] = c["no_teacher"]["accuracy"]
        items["sms_student_speedup"] = c["kd_student"]["speedup"]
    items["json"] = str(out)
    print(summary_line("heterogeneous", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
