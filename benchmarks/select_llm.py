"""Data selection for KD: students trained on 10% chosen by each scorer vs 10% random vs 100%.

Claim (the issue): with equal epochs, a KD student trained on the 10% of the data a KD-aware
scorer picks matches the student trained on 100% within 5% of held-out forward KL to the teacher.

Setup (all arms in one run, one process):

* **teacher** SmolLM2-135M-Instruct; **student** the demo's: ``from_teacher``, 6 of 30 layers;
* **data**: AlpacaEval's 805 instructions with GPT-4 answers (``$POTSTILL_DATA/alpaca_eval``),
  prompts that fit ``max_length`` (the teacher's chat template), a seeded subset of
  ``pool + eval`` rows written to a JSONL read by ``data.source: {kind: file}``; answers
  truncated to ``max_length`` tokens. Not the demo's 200 prompts: with 160 training prompts a
  10% subset is 16 examples (two batches), where the arms would differ by noise only; the
  AlpacaEval mix (self-instruct, oasst, koala, helpful_base, vicuna) gives a 10% of 40+ examples
  and a pool with real variety for a scorer to find. The teacher supplies logits on GPT-4's
  answers (off-policy KD data, as with any fixed corpus);
* **one teacher pass** (``potstill cache``, top-k 32 + tail bucket, fp16) feeds both the soft
  targets of every student and the KD-aware scores (``select.cache``);
* **selection** by ``potstill.runners.select.run_select`` (10% = ``ceil(0.1 * pool)``): random
  (3 seeds, averaged), the scoring student's perplexity (hardest first), IFD (loss ratio, IFD > 1
  dropped first, as in Cherry LLM) of the teacher (the freshly cut student follows no
  instruction: its IFD is > 1 on most examples), KD divergence (forward KL, highest first) and "confident teacher,
  unsure student" read from the cache, k-means medoids on all-MiniLM-L6-v2 embeddings of
  prompt + answer (``--arms`` adds k_center, herding, LESS and kd_divergence_easiest, the lowest divergences first);
* **training** through ``potstill.runners.train.train_run`` (KD, alpha 0, forward KL, T = 1, from the
  cache), same init, seed, batch and learning rate; equal *epochs*: each student takes
  ``ceil(epochs * n / batch)`` steps (the 10% students ~10% of the steps). ``--equal-steps``
  adds the KD-aware 10% trained for as many steps as the 100% student;
* **evaluation**: held-out forward KL (teacher || student, per response token, T = 1) and
  top-1 agreement on the recipe's eval split, ``potstill.eval.evaluate_runs``, live teacher.

Reported per arm: FKL, its ratio to the 100% student, selection cost (scoring seconds,
model loading excluded), training seconds, and an estimated total cost vs the 100% student
(the KD-aware arms need the teacher pass over the whole pool, the others over their 10%).

``--source mixed --pool 900`` adds Self-Instruct's user-oriented and seed tasks (one row per
instance, the input appended to the instruction) to AlpacaEval for a pool of 900 (its results:
``benchmarks/results/select_llm_mixed900.json``).

``--layers 27 --lr 1e-4`` is the *healing* regime (a student with 3 of the teacher's 30 layers
removed, distilled back: Minitron-style prune then distill), where the student starts close to
the teacher (its results: ``benchmarks/results/select_llm_heal27.json``).

Usage: ``python benchmarks/select_llm.py [--quick] [--source alpaca|mixed] [--pool N] [--arms a,b] [--layers N]
[--lr X] [--equal-steps] [--out PATH]``.
Writes JSON and prints one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import summary_line, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "select_llm.json"
TEACHER = "smollm2-135m-instruct"
RANDOM_SEEDS = (0, 1, 2)

ARMS = {
    "perplexity": {"scorer": {"kind": "perplexity", "model": "student"}},
    "ifd_loss_ratio": {
        "scorer": {"kind": "ifd_loss_ratio", "model": "teacher"},
        "filters": [{"kind": "drop_ifd_above_one", "model": "teacher"}],
    },
    "kd_divergence": {"scorer": {"kind": "kd_divergence", "divergence": {"name": "forward_kl"}}},
    # the same score, lowest first: the examples the student already imitates best
    "kd_divergence_easiest": {
        "scorer": {"kind": "kd_divergence", "divergence": {"name": "forward_kl"}},
        "largest": False,
    },
    "confident_teacher_unsure_student": {"scorer": {"kind": "confident_teacher_unsure_student"}},
    "kmeans_medoids": {"scorer": {"kind": "kmeans_medoids", "embeddings": "minilm"}},
    "k_center": {"scorer": {"kind": "k_center", "embeddings": "minilm"}},
    "herding": {"scorer": {"kind": "herding", "embeddings": "minilm"}},
    "less": {"scorer": {"kind": "less", "proj_dim": 1024, "target_size": 16, "warmup_steps": 8}},
}
DEFAULT_ARMS = (
    "random",
    "perplexity",
    "ifd_loss_ratio",
    "kd_divergence",
    "confident_teacher_unsure_student",
    "kmeans_medoids",
)
KD_AWARE = ("kd_divergence", "confident_teacher_unsure_student", "kd_divergence_easiest")


def _source_rows(source: str) -> tuple[list[dict], list[str]]:
    """(instruction, output, dataset) rows of ``alpaca`` (AlpacaEval's 805) or ``mixed`` (those plus the
    Self-Instruct user-oriented tasks and seed tasks, one row per instance, input appended to the
    instruction as in Self-Instruct's prompts)."""
    from potstill.data.rationale import data_root

    root = data_root()
    src = root / "alpaca_eval" / "gpt4_outputs.json"
    rows = [
        {"instruction": r["instruction"], "output": r["output"], "dataset": r["dataset"]}
        for r in json.loads(src.read_text(encoding="utf-8"))
    ]
    paths = [str(src)]
    if source == "mixed":
        for name in ("user_oriented_instructions", "seed_tasks"):
            f = root / "self_instruct" / f"{name}.jsonl"
            paths.append(str(f))
            for line in f.read_text(encoding="utf-8").splitlines():
                task = json.loads(line)
                for inst in task["instances"]:
                    prompt = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"] else "")
                    rows.append({"instruction": prompt, "output": inst["output"], "dataset": f"self_instruct_{name}"})
    return rows, paths


def write_pool(path: Path, n_rows: int, max_length: int, seed: int = 0, source: str = "alpaca") -> dict:
    """A seeded subset of the source whose chat-formatted prompts leave >= 16 answer tokens."""
    from potstill.data import encode_prompt
    from potstill.models import load_tokenizer

    rows, paths = _source_rows(source)
    tok = load_tokenizer(TEACHER)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    keep = []
    for i in order:
        r = rows[i]
        if len(encode_prompt(tok, [{"role": "user", "content": r["instruction"]}])) <= max_length - 16:
            keep.append(r)
        if len(keep) == n_rows:
            break
    if len(keep) < n_rows:
        raise SystemExit(
            f"select_llm: only {len(keep)} prompts of {source!r} fit max_length {max_length}; "
            f"lower --pool/--eval-size or raise --max-length"
        )
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
    return {
        "source": paths if len(paths) > 1 else paths[0],
        "rows": len(keep),
        "of": len(rows),
        "seed": seed,
        "datasets": {d: sum(r["dataset"] == d for r in keep) for d in sorted({r["dataset"] for r in keep})},
    }


def base_dict(data_path: Path, work: Path, args) -> dict:
    return {
        "output_dir": str(work / "distill"),
        "teacher": {"model": TEACHER},
        "student": {"kind": "from_teacher", "layers": args.layers},
        "data": {
            "source": {
                "kind": "file",
                "path": str(data_path),
                "prompt_field": "instruction",
                "response_field": "output",
            },
            "eval_size": args.eval_size,
            "max_length": args.max_length,
        },
        "train": {"batch_size": args.batch_size, "learning_rate": args.lr, "logging_steps": 10, "seed": 0},
        "runs": [{"name": "kd", "alpha": 0.0, "divergence": {"name": "forward_kl"}, "temperature": 1.0}],
        "cache": {"dir": str(work / "teacher_cache"), "signal": {"kind": "topk", "k": 32}, "dtype": "fp16"},
        "eval": {"include_untrained": True, "batch_size": 8},
    }


def select_dict(base: dict, name: str, spec: dict, seed: int, work: Path, budget: float) -> dict:
    return {
        "output_dir": str(work / "select" / name),
        "teacher": base["teacher"],
        "student": base["student"],
        "data": base["data"],
        "cache": base["cache"],
        "select": {"budget": budget, "seed": seed, "batch_size": 8, **spec},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny run, smoke test only")
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --quick: a temp file)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"10%% arms (of random, {', '.join(ARMS)})")
    p.add_argument(
        "--source",
        choices=("alpaca", "mixed"),
        default="alpaca",
        help="alpaca: AlpacaEval's 805; mixed: plus Self-Instruct's user-oriented and seed tasks",
    )
    p.add_argument("--pool", type=int, default=400, help="training pool size (examples)")
    p.add_argument("--eval-size", type=int, default=40, help="held-out examples")
    p.add_argument("--max-length", type=int, default=96, help="prompt + answer tokens")
    p.add_argument("--epochs", type=float, default=2.0, help="equal epochs of every student")
    p.add_argument("--layers", type=int, default=6, help="teacher layers the student keeps (of 30)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--equal-steps", action="store_true", help="also train the KD-aware 10%% for the 100%% steps")
    p.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="N >= 2: every 10%% arm trained with training seeds 0..N-1 (random draws its subset with the same "
        "seed) and judged against random with potstill compare's statistics (per held-out example, Holm); "
        "default: one training seed, random averaged over 3 draws",
    )
    args = p.parse_args(argv)
    if args.seeds == 1 or args.seeds < 0:
        p.error("--seeds: give 2 or more (one seed gives no verdict), or leave it out")
    if args.seeds and "random" not in [a.strip() for a in args.arms.split(",")]:
        p.error("--seeds judges every arm against random: add random to --arms")
    if args.quick:
        args.pool, args.eval_size, args.max_length, args.epochs = 40, 8, 64, 1.0
        args.fraction = 0.25

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    from potstill.dd.selection_io import load_selection
    from potstill.eval import evaluate_runs, metrics_only
    from potstill.recipes.distill import Recipe
    from potstill.recipes.methods import RunConfig
    from potstill.recipes.select import select_recipe_from_dict
    from potstill.runners.cache import cache
    from potstill.runners.prepare import Prepared
    from potstill.runners.select import run_select
    from potstill.runners.train import train_run

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a != "random" and a not in ARMS]
    if bad:
        p.error(f"unknown arms {bad}; choose from random, {', '.join(ARMS)}")
    out = (
        Path(args.out)
        if args.out
        else (Path(tempfile.gettempdir()) / "select_llm_quick.json" if args.quick else DEFAULT_OUT)
    )
    t_all = time.perf_counter()
    results: dict = {
        "quick": args.quick,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
    }

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.0f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="potstill-bench-select-") as tmp:
        work = Path(tmp)
        data_path = work / f"{args.source}_pool.jsonl"
        results["data"] = write_pool(data_path, args.pool + args.eval_size, args.max_length, source=args.source)
        base = base_dict(data_path, work, args)
        recipe = Recipe.model_validate(base)

        # one teacher pass over the pool: soft targets of every student and the KD-aware scores
        t0 = time.perf_counter()
        man = cache(recipe, progress=False)
        cache_s = time.perf_counter() - t0
        log(f"cache: {man['data']['num_examples']} examples, {man['data']['num_rows']} tokens, {cache_s:.0f} s")
        prep = Prepared(recipe)
        source = prep.cached_source()
        pool = prep.pool_examples
        n_pool = len(pool)
        pool_tokens = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in pool)

        # selections
        selections: dict[str, dict] = {}
        random_seeds = range(args.seeds) if args.seeds else RANDOM_SEEDS
        jobs = [(f"random_s{s}", {"scorer": {"kind": "random"}}, s) for s in random_seeds if "random" in arms]
        jobs += [(a, ARMS[a], 0) for a in arms if a != "random"]
        for name, spec, seed in jobs:
            sr = select_recipe_from_dict(select_dict(base, name, spec, seed, work, args.fraction))
            rep = run_select(sr)
            ids = json.loads(Path(rep["paths"]["selection"]).read_text())["example_ids"]
            selections[name] = {"ids": ids, "report": rep}
            log(
                f"select {name}: kept {rep['kept']} of {rep['pool']}, dropped {rep['dropped']}, "
                f"scoring {rep['timings_s']['scoring_s']:.0f} s"
            )

        # training: equal epochs
        run = RunConfig(name="kd", alpha=0.0, temperature=1.0)
        students, info = {}, {}

        def train(name: str, examples: list[dict], steps: int, seed: int = 0) -> None:
            r = recipe.model_copy(deep=True)
            r.train.max_steps = steps
            r.train.seed = seed
            t = time.perf_counter()
            model, curve = train_run(
                r,
                run,
                copy.deepcopy(prep.student0).train(),
                prep.teacher,
                prep.tokenizer,
                examples,
                work / "runs" / name,
                prep.device,
                prep.vocab_size,
                source=source,
            )
            secs = time.perf_counter() - t
            students[name] = model.eval()
            info[name] = {
                "examples": len(examples),
                "steps": steps,
                "train_seconds": secs,
                "response_tokens": sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples),
                "final_loss": curve[-1][1] if curve else None,
            }
            log(f"train {name}: {len(examples)} examples, {steps} steps, {secs:.0f} s")

        def steps_for(n: int) -> int:
            return max(1, math.ceil(args.epochs * n / args.batch_size))

        train("full", pool, steps_for(n_pool))
        per_seed: dict[int, dict] = {}  # --seeds: seed -> {arm: per-example scores}
        if args.seeds:
            from potstill.eval import per_example_scores

            for seed in range(args.seeds):
                trained = {}
                for arm in arms:
                    sel = selections[f"random_s{seed}" if arm == "random" else arm]
                    sub = load_selection(sel["report"]["paths"]["selection"], pool)
                    train(f"{arm}_s{seed}", sub, steps_for(len(sub)), seed=seed)
                    trained[arm] = students[f"{arm}_s{seed}"]
                per_seed[seed] = per_example_scores(
                    trained, prep.teacher, prep.tokenizer, prep.eval_examples, vocab_size=prep.vocab_size, batch_size=8
                )
                log(f"seed {seed}: scored {len(trained)} arms on {len(prep.eval_examples)} held-out examples")
        for name, s in ({} if args.seeds else selections).items():
            sub = load_selection(s["report"]["paths"]["selection"], pool)
            train(name, sub, steps_for(len(sub)))
        if args.equal_steps:
            for a in KD_AWARE[:1]:
                if a in selections:
                    sub = load_selection(selections[a]["report"]["paths"]["selection"], pool)
                    train(f"{a}_equal_steps", sub, info["full"]["steps"])

        t0 = time.perf_counter()
        res = metrics_only(
            evaluate_runs(
                {"student_init": prep.student0, **students},
                prep.teacher,
                prep.tokenizer,
                prep.eval_examples,
                vocab_size=prep.vocab_size,
                batch_size=8,
                max_new_tokens=1,
                progress=False,
            )
        )
        log(f"eval: {time.perf_counter() - t0:.0f} s")

    full_fkl = res["full"]["forward_kl"]
    full_train = info["full"]["train_seconds"]
    full_cost = cache_s + full_train
    rows: dict[str, dict] = {}
    for name in ["student_init", "full", *[n for n in students if n != "full"]]:
        m = res[name]
        row = {
            "forward_kl": m["forward_kl"],
            "fkl_ratio_to_full": m["forward_kl"] / full_fkl,
            "top1_agreement": m["top1_agreement"],
        }
        if name in info:
            row |= info[name]
        arm = name.removesuffix("_equal_steps")
        if args.seeds and arm.rpartition("_s")[0] in arms and not arm.startswith("random_s"):
            arm = arm.rpartition("_s")[0]  # one selection, trained with several seeds
        if arm in selections:
            rep = selections[arm]["report"]
            sel_s = rep["timings_s"]["scoring_s"]
            # teacher pass the arm needs: the whole pool for KD-aware scores, else only its subset
            teacher_s = cache_s if arm in KD_AWARE else cache_s * row["examples"] / n_pool
            row |= {
                "selection_seconds": sel_s,
                "selection_timings": rep["timings_s"],
                "selection_vs_full_train": sel_s / full_train,
                "est_total_cost_vs_full": (teacher_s + sel_s + row["train_seconds"]) / full_cost,
                "dropped": rep["dropped"],
                "scores": rep["scores"],
            }
        rows[name] = row
    rnd = [rows[n] for n in rows if n.startswith("random_s")]
    if rnd and not args.seeds:  # (with --seeds, random_over_seeds below)
        fk = [r["forward_kl"] for r in rnd]
        mean = sum(fk) / len(fk)
        rows["random_mean"] = {
            "forward_kl": mean,
            "fkl_ratio_to_full": mean / full_fkl,
            "forward_kl_std": (sum((x - mean) ** 2 for x in fk) / max(1, len(fk) - 1)) ** 0.5,
            "seeds": list(RANDOM_SEEDS),
            "top1_agreement": sum(r["top1_agreement"] for r in rnd) / len(rnd),
            "train_seconds": sum(r["train_seconds"] for r in rnd) / len(rnd),
            "response_tokens": sum(r["response_tokens"] for r in rnd) / len(rnd),
        }
    verdicts = seed_verdicts(per_seed, arms) if per_seed else None
    if per_seed:  # each arm over the training seeds
        for arm in arms:
            fk = [rows[f"{arm}_s{s}"]["forward_kl"] for s in per_seed]
            rows[f"{arm}_over_seeds"] = {
                "forward_kl": sum(fk) / len(fk),
                "fkl_ratio_to_full": sum(fk) / len(fk) / full_fkl,
                "forward_kl_std": (sum((x - sum(fk) / len(fk)) ** 2 for x in fk) / (len(fk) - 1)) ** 0.5,
                "seeds": list(per_seed),
                "top1_agreement": sum(rows[f"{arm}_s{s}"]["top1_agreement"] for s in per_seed) / len(fk),
            }
    # how much the chosen subsets overlap (Jaccard), to read the arms side by side
    names = [n for n in selections]
    overlap = {
        a: {
            b: round(
                len(set(selections[a]["ids"]) & set(selections[b]["ids"]))
                / len(set(selections[a]["ids"]) | set(selections[b]["ids"])),
                3,
            )
            for b in names
        }
        for a in names
    }
    kd_ratio = rows.get("kd_divergence", rows.get("kd_divergence_over_seeds", {})).get("fkl_ratio_to_full")
    results |= {
        "setup": {
            "teacher": TEACHER,
            "student": f"from_teacher, {args.layers} of 30 layers",
            "pool": n_pool,
            "pool_response_tokens": pool_tokens,
            "eval_examples": len(prep.eval_examples),
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "epochs": args.epochs,
            "fraction": args.fraction,
            "budget": math.ceil(args.fraction * n_pool - 1e-9),
            "training": "KD alpha 0, forward KL, T 1, from the top-k 32 cache (tail bucket, fp16), "
            "train_run; equal epochs",
            "cache": {"seconds": cache_s, "bytes_per_token": man["bytes_per_token"]},
            "arms": arms,
            "equal_steps": args.equal_steps,
            "seeds": args.seeds or None,
        },
        "runs": rows,
        "verdicts": verdicts,
        "overlap_jaccard": overlap,
        "goal": {
            "kd_aware_within_5pct_of_full": None if kd_ratio is None else kd_ratio <= 1.05,
            "kd_divergence_ratio": kd_ratio,
            "best_10pct_arm": min(
                (
                    n
                    for n in rows
                    if n not in ("full", "student_init", "random_mean") and not n.endswith("_equal_steps")
                ),
                key=lambda n: rows[n]["forward_kl"],
                default=None,
            ),
        },
        "seconds_total": time.perf_counter() - t_all,
        "loadavg_end": list(os.getloadavg()),
    }
    write_json_atomic(out, results)
    items = {"full_fkl": full_fkl}
    for n in ["random_mean", *[a for a in arms if a != "random"]]:
        n = n if n in rows else f"{n}_over_seeds"
        if n in rows:
            items[f"{n}_ratio"] = rows[n]["fkl_ratio_to_full"]
    if args.equal_steps and "kd_divergence_equal_steps" in rows:
        items["kd_equal_steps_ratio"] = rows["kd_divergence_equal_steps"]["fkl_ratio_to_full"]
    items["kd_within_5pct"] = results["goal"]["kd_aware_within_5pct_of_full"]
    for c in (verdicts or {}).get("rows", []):
        if c["metric"] == "forward_kl":
            items[f"{c['arm']}_vs_{c['baseline']}"] = f"{c['difference']:+.3f}:{c['verdict']}"
    items["json"] = str(out)
    print(summary_line("select_llm", items))
    return 0


def seed_verdicts(per_seed: dict[int, dict], arms: list[str]) -> dict:
    """``--seeds``: every 10 % arm against ``random``, and each KD-aware arm against the embedding coreset
    (``kmeans_medoids``) when both ran, on held-out forward KL (lower is better) and top-1 agreement, per
    example; seed s of every arm shares the training seed (``random`` draws its subset with it). The
    statistics of ``potstill compare`` (:mod:`potstill.eval.verdict`): paired difference, interval from the
    crossed bootstrap over seeds x examples, Holm over every row. All 10 % arms train the same steps on the
    same number of examples: equal training cost (selection cost is in ``runs``)."""
    import numpy as np

    from potstill.eval.verdict import compare_arms
    from potstill.runners.compare import LOWER_BETTER

    lower = {m: LOWER_BETTER[m] for m in ("forward_kl", "top1_agreement")}
    seeds = sorted(per_seed)
    scores = {m: {a: np.array([per_seed[s][a][m] for s in seeds], dtype=np.float64) for a in arms} for m in lower}
    pairs = [(a, "random") for a in arms if a != "random"]
    if "kmeans_medoids" in arms:
        pairs += [(a, "kmeans_medoids") for a in arms if a in KD_AWARE]
    rows = compare_arms(scores, "random", lower_better=lower, level=0.95, pairs=pairs)
    return {
        "level": 0.95,
        "seeds": seeds,
        "family": f"Holm over all {len(rows)} rows",
        "rows": [c.as_dict() for c in rows],
    }


if __name__ == "__main__":
    sys.exit(main())
