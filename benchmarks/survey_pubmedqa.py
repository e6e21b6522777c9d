"""Healthcare application: PubMedQA decisions of a teacher, a KD student and an SFT student.

Setup: teacher SmolLM2-135M-Instruct (offline wheel); students the 6-of-30-layer cut of it (as in
the demo); training pairs the 500 PQA-L training questions as prompt = abstract (cut to
``--context-words``) + question, response = the expert's reasoned answer, decision first
(``"yes. <long answer>"``, :mod:`potstill.data.pubmedqa`). KD is white-box forward-KL KD on
those responses (the teacher's distribution over the expert's reasoned answer; a 135M teacher's
own generated answers would be a weaker target), SFT is cross-entropy on the same tokens; equal
optimizer steps, ``--seeds`` training seeds (data order).

Decisions are scored on the 500 test ids by the likeliest of `` yes / no / maybe`` after the
prompt (lm-evaluation-harness's ``pubmedqa`` ``acc``): decision accuracy and macro-F1, beside the
majority-class baseline. A gap is called a difference only when it exceeds the sum of the two arms' spreads
over seeds. Each finished arm and seed is kept in ``<out>.partial.json``, so a killed run resumes.

Usage: ``python benchmarks/survey_pubmedqa.py [--seeds 3] [--steps 30] [--quick]``.
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
DEFAULT_OUT = HERE / "results" / "survey_pubmedqa.json"


def score(model, tokenizer, examples: list[dict]) -> dict:
    from potstill.data import pad_id
    from potstill.data.pubmedqa import CHOICES
    from potstill.eval.choice import choice_metrics, choice_scores

    tokens = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in CHOICES]
    scores = choice_scores(model, [ex["prompt_ids"] for ex in examples], tokens, pad_id=pad_id(tokenizer))
    m = choice_metrics(scores, [CHOICES.index(ex["answer"]) for ex in examples])
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "predicted": dict(zip(CHOICES, m["predicted"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-words", type=int, default=150)
    ap.add_argument("--test-limit", type=int, default=None, help="score only the first N test ids (CPU budget)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    import torch

    from potstill.data.pubmedqa import load_pubmedqa, majority_baseline
    from potstill.models import load_model, select_layers, student_from_teacher
    from potstill.paths import data_root
    from potstill.recipes.distill import Recipe
    from potstill.runners.prepare import encode_pairs
    from potstill.runners.train import train_run

    t0 = time.perf_counter()
    limit = 16 if args.quick else None
    steps = 2 if args.quick else args.steps
    train_pairs, test_pairs = load_pubmedqa(data_root() / "pubmedqa", context_words=args.context_words, limit=limit)
    teacher, tok = load_model("smollm2-135m-instruct")
    teacher.eval()
    max_length = 448
    if args.test_limit is not None:
        test_pairs = test_pairs[: args.test_limit]
    train = encode_pairs(train_pairs, tok, max_length)
    test = encode_pairs(test_pairs, tok, max_length)
    student0 = student_from_teacher(teacher, select_layers(teacher.config.num_hidden_layers, 6))
    result: dict = {
        "setup": {
            "teacher": "smollm2-135m-instruct",
            "student": "from_teacher, 6 of 30 layers",
            "train_examples": len(train),
            "test_examples": len(test),
            "context_words": args.context_words,
            "test_ids_scored": "all 500" if args.test_limit is None else f"the first {len(test)} of 500 (CPU budget)",
            "max_length": max_length,
            "steps": steps,
            "batch_size": args.batch_size,
            "seeds": list(range(args.seeds)),
            "scoring": "likeliest of yes/no/maybe after the prompt (lm-eval pubmedqa acc)",
            "kd_target": "teacher distribution over the expert reasoned answer (decision first)",
        },
        "majority": majority_baseline(train_pairs, test_pairs),
    }
    partial = Partial(args.out, result["setup"])
    if "teacher" not in partial:
        partial.put("teacher", score(teacher, tok, test))
    result["teacher"] = partial["teacher"]
    per: dict[str, dict[str, list[float]]] = {
        "kd": {"accuracy": [], "macro_f1": []},
        "sft": {"accuracy": [], "macro_f1": []},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            recipe = Recipe.model_validate(
                {
                    "data": {"max_length": max_length},
                    "train": {"max_steps": steps, "batch_size": args.batch_size, "seed": seed, "learning_rate": 5.0e-4},
                    "runs": [
                        {"name": "sft", "alpha": 1.0},
                        {"name": "kd", "alpha": 0.0, "divergence": {"name": "forward_kl"}},
                    ],
                }
            )
            for run in recipe.runs:
                key = f"{run.name}/{seed}"
                if key in partial:
                    continue
                model, _ = train_run(
                    recipe,
                    run,
                    copy.deepcopy(student0).train(),
                    teacher,
                    tok,
                    train,
                    Path(tmp) / f"s{seed}" / run.name,
                    torch.device("cpu"),
                    None,
                )
                partial.put(key, score(model.eval(), tok, test))
                del model
    for seed in range(args.seeds):
        for name in per:
            for k in per[name]:
                per[name][k].append(partial[f"{name}/{seed}"][k])
    result["students"] = {name: {k: seed_stats(v) for k, v in m.items()} for name, m in per.items()}
    kd, sft = result["students"]["kd"], result["students"]["sft"]
    result["verdict_kd_vs_sft"] = {k: verdict(kd[k], sft[k], lower_better=False) for k in ("accuracy", "macro_f1")}
    result["wall_seconds"] = time.perf_counter() - t0
    result["quick"] = args.quick
    write_json_atomic(args.out, result)
    partial.finish()
    print(
        summary_line(
            "survey_pubmedqa",
            {
                "majority_acc": result["majority"]["accuracy"],
                "teacher_acc": result["teacher"]["accuracy"],
                "kd_acc": kd["accuracy"]["mean"],
                "sft_acc": sft["accuracy"]["mean"],
                "kd_vs_sft": result["verdict_kd_vs_sft"]["accuracy"],
            },
        )
    )


if __name__ == "__main__":
    main()
