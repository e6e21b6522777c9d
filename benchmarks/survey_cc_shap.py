"""CC-SHAP of the SmolLM2-135M-Instruct teacher and two students cut from it, on the same SMS spam examples.

CC-SHAP (Parcalabescu & Frank 2024, ACL, Sec. 4; :mod:`potstill.eval.cc_shap`): each model answers "spam or
ham?" (the label with the higher log-prob), is asked "Why?", explains greedily; shap attributes the answer and
the explanation to the message's tokens; CC-SHAP is the cosine of their contribution ratios. SMS spam stands in
for phishing mail (the nearest offline set). Also reported: answer accuracy and seconds per example.

Students (no training fits this CPU budget, so both are untrained layer cuts, ``student_from_teacher``; a
distilled student's directory can be explained the same way with ``potstill explain``): ``cut6`` keeps 6 of
the 30 layers (the demo's student), ``cut15`` keeps 15. Ratios are against the teacher, measured in the same run.
The estimator is deterministic (partition explainer), so the spread is over examples, not seeds; a gap smaller
than that spread is reported as no measurable difference.

``python benchmarks/survey_cc_shap.py [--quick] [--n N]``; writes ``benchmarks/results/survey_cc_shap.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")  # shap's kernels as Python: no minutes of compiling

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import summary_line, write_json_atomic  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "survey_cc_shap.json"


def settings(quick: bool, n: int | None) -> dict:
    if quick:
        return {"n": n or 1, "max_evals": 21, "max_text_tokens": 10, "max_explanation_tokens": 6}
    return {"n": n or 2, "max_evals": 40, "max_text_tokens": 16, "max_explanation_tokens": 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one example, a few evaluations (smoke test)")
    ap.add_argument("--n", type=int, default=None, help="examples (default 2; 1 with --quick)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    cfg = settings(args.quick, args.n)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from potstill.data.classification import load_sms_spam
    from potstill.models.loading import load_model
    from potstill.models.student import student_from_teacher
    from potstill.recipes.explain import load_explain_recipe
    from potstill.runners.explain import balanced_draw, explain_model

    torch.manual_seed(0)
    recipe = load_explain_recipe(
        {
            "models": [{"name": "teacher", "model": "smollm2-135m-instruct"}],
            "data": {"num_examples": cfg["n"], "seed": 0},
            "prompt": {
                "system": "You classify SMS messages.",  # shorter than SmolLM2's default system turn: fewer tokens
                "max_text_tokens": cfg["max_text_tokens"],
                "max_explanation_tokens": cfg["max_explanation_tokens"],
            },
            "shap": {"algorithm": "partition", "max_evals": cfg["max_evals"], "batch_size": 16},
        }
    )
    examples = balanced_draw(load_sms_spam(recipe.data.path), recipe.data.num_examples, recipe.data.seed)
    t0 = time.perf_counter()
    teacher, tok = load_model("smollm2-135m-instruct")
    models = {"teacher": teacher}
    models["cut15"] = student_from_teacher(teacher, 15).eval()
    models["cut6"] = student_from_teacher(teacher, 6).eval()
    results = {}
    for name, model in models.items():
        rep = explain_model(model, tok, examples, recipe)
        results[name] = {
            "layers": int(model.config.num_hidden_layers),
            "cc_shap": rep["cc_shap"],
            "accuracy": rep["accuracy"],
            "seconds_per_example": rep["seconds"] / len(examples),
            "per_example": [
                {k: e[k] for k in ("gold", "answer", "cc_shap", "explanation", "evaluations", "seconds")}
                for e in rep["examples"]
            ],
        }
    base = results["teacher"]
    ratios = {}
    for name, r in results.items():
        if name == "teacher":
            continue
        gap = r["cc_shap"]["mean"] - base["cc_shap"]["mean"]
        spread = max(r["cc_shap"]["std"], base["cc_shap"]["std"])
        ratios[name] = {
            "cc_shap_minus_teacher": gap,
            "time_ratio_vs_teacher": r["seconds_per_example"] / base["seconds_per_example"],
            "verdict": "no measurable difference" if not abs(gap) > spread else "difference exceeds the spread",
        }
    data = {
        "claim": "CC-SHAP self-consistency of the teacher vs two layer-cut students on SMS spam (phishing stand-in)",
        "setting": {
            **cfg,
            "quick": args.quick,
            "algorithm": "partition",
            "score": "logodds",
            "mask_token": "...",
            "students": "untrained layer cuts of the teacher (student_from_teacher 15 and 6 of 30 layers); "
            "KD/SFT training did not fit the CPU budget",
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "models": results,
        "vs_teacher": ratios,
        "wall_seconds": time.perf_counter() - t0,
    }
    write_json_atomic(args.out, data)
    items = {f"{n}_cc": r["cc_shap"]["mean"] for n, r in results.items()}
    items |= {f"{n}_acc": r["accuracy"] for n, r in results.items()}
    items |= {f"{n}_time_x": v["time_ratio_vs_teacher"] for n, v in ratios.items()}
    items["n"] = len(examples)
    print(summary_line("survey_cc_shap", items))


if __name__ == "__main__":
    main()
