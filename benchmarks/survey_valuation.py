"""Data valuation for dataset distillation on SST-2: KNN-Shapley selection beside herding, k-center and random,
and the planted-label-flip experiment (value-based detection of mislabelled examples).

Part 1, selection (benchmarks/dd_sst2.py's protocol, fewer sets): pool 5,000 sentences of ``sst2/train.tsv``
(seeded); set ``s`` works on its own random half of the pool (2,500) and holds out ``--val`` (500) sentences of
the *other* half as the KNN-Shapley validation (test) points, so neither the eval sentences nor the set's own
candidates are valuation targets; eval: 872 sentences of ``sst2/dev.tsv``; learner: frozen all-MiniLM-L6-v2 +
a fresh linear head (``trainable_layers=0``), 100 AdamW steps, lr 1e-2, batch 16, seed = set index; hard labels.
Arms, per class at 5 / 10 / 20: ``random``, ``k_center`` (greedy farthest-point, seed s), ``herding``,
``knn_shapley`` (the highest values, Jia et al. 2019, K = ``--k``), all in the learner's L2-normalized
mean-pooled feature space (what ``potstill select`` uses). dd_sst2.py evaluates 10 sets per arm; here 3
(``--seeds``), to fit the CPU budget.

Part 2, label flips: per seed, ``--flip-pool`` (500) pool sentences, 10 % of their labels flipped at random,
and ``--flip-val`` (200) other, clean pool sentences as validation. Each method ranks the 500 and flags its
lowest 10 %: ``knn_shapley`` (K = ``--k``), ``tmc_shapley`` (Ghorbani & Zou 2019, Alg. 1, nearest-centroid
validation accuracy, truncation tolerance 0.01, at most ``--permutations`` permutations, convergence rule 0.05),
``teacher_p_label`` (the learner trained on the noisy pool, lowest p(label); what recipes/select_sst2.yaml filters
by) and ``random``. Precision = flips among the flagged / flagged; recall = flips flagged / flips (equal here,
as many flagged as flipped).

Usage: ``python benchmarks/survey_valuation.py [--quick]``. Writes benchmarks/results/survey_valuation.json and
prints one line with ratios against ``random`` measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import summary_line, write_json_atomic

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "survey_valuation.json"
ARMS = ("random", "k_center", "herding", "knn_shapley")
FLIP_METHODS = ("knn_shapley", "tmc_shapley", "teacher_p_label", "random")


def verdict(mean: float, std: float, base_mean: float, base_std: float) -> str:
    gap = mean - base_mean
    return "no measurable difference" if abs(gap) <= max(std, base_std) else ("better" if gap > 0 else "worse")


def selection_part(args, pool_f, eval_f, emb, learner, seeds, budgets):
    import torch

    from potstill.dd.diversity import greedy_k_center, herding, per_class
    from potstill.dd.protocol import compare_arms, evaluate_set
    from potstill.dd.valuation import knn_shapley, per_class_top

    labels = pool_f.labels
    results = {b: {} for b in budgets}
    build = {b: {} for b in budgets}
    value_s = []
    for s in range(seeds):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(s))
        sub, other = perm[: len(labels) // 2], perm[len(labels) // 2 :]
        val = other[: args.val]
        t0 = time.process_time()
        values = knn_shapley(emb[sub], labels[sub], emb[val], labels[val], args.k)
        value_s.append(time.process_time() - t0)
        for b in budgets:
            picks, times = {}, {}
            t0 = time.process_time()
            gen = torch.Generator().manual_seed(1000 * s + b)
            rows = [(labels[sub] == c).nonzero().flatten() for c in (0, 1)]
            picks["random"] = torch.cat([r[torch.randperm(len(r), generator=gen)[:b]] for r in rows])
            times["random"] = time.process_time() - t0
            t0 = time.process_time()
            picks["k_center"] = per_class(greedy_k_center, emb[sub], labels[sub], b, seed=s)
            times["k_center"] = time.process_time() - t0
            t0 = time.process_time()
            picks["herding"] = per_class(herding, emb[sub], labels[sub], b)
            times["herding"] = time.process_time() - t0
            t0 = time.process_time()
            picks["knn_shapley"] = per_class_top(values, labels[sub], {0: b, 1: b})
            times["knn_shapley"] = time.process_time() - t0 + value_s[-1]
            for arm in ARMS:
                idx = sub[picks[arm]]
                r = evaluate_set(
                    pool_f.subset(idx),
                    learner=learner,
                    eval_examples=eval_f,
                    steps=args.steps,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    seed=s,
                )
                results[b].setdefault(arm, []).append(r)
                build[b].setdefault(arm, []).append(times[arm])
            acc = {a: round(results[b][a][-1]["accuracy"], 3) for a in ARMS}
            print(f"seed {s} budget {b}: {acc}", flush=True)
    table = {}
    for b in budgets:
        t = compare_arms(results[b], baseline="random", construction_s=build[b])
        base = t["random"]
        for row in t.values():
            row["values"] = [round(v, 4) for v in row["values"]]
            row["ratio_vs_random"] = row["mean"] / base["mean"]
            row["verdict_vs_random"] = verdict(row["mean"], row["std"], base["mean"], base["std"])
        table[str(b)] = t
    return table


def flip_part(args, pool_f, emb, learner, seeds):
    import torch

    from potstill.dd.protocol import mean_std, predict_features, train_top
    from potstill.dd.valuation import NearestCentroidUtility, knn_shapley, lowest, tmc_shapley

    n, nv = args.flip_pool, args.flip_val
    per_seed = {m: [] for m in FLIP_METHODS}
    runs = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(100 + s)
        perm = torch.randperm(len(pool_f), generator=g)
        tr, va = perm[:n], perm[n : n + nv]
        y = pool_f.labels[tr].clone()
        flipped = torch.randperm(n, generator=g)[: round(args.flip_fraction * n)]
        y[flipped] = 1 - y[flipped]
        bad = set(flipped.tolist())
        scores, secs = {}, {}
        t0 = time.process_time()
        scores["knn_shapley"] = knn_shapley(emb[tr], y, emb[va], pool_f.labels[va], args.k)
        secs["knn_shapley"] = time.process_time() - t0
        t0 = time.process_time()
        util = NearestCentroidUtility(emb[tr], y, emb[va], pool_f.labels[va], num_classes=2)
        scores["tmc_shapley"], info = tmc_shapley(
            util, permutations=args.permutations, tolerance=0.01, convergence=0.05, seed=s, max_pool=1000
        )
        secs["tmc_shapley"] = time.process_time() - t0
        t0 = time.process_time()
        noisy = pool_f.subset(tr)
        noisy.labels = y
        teacher = learner.new_top(10_000)
        train_top(teacher, noisy, steps=args.teacher_steps, lr=args.lr, batch_size=64, seed=s)
        scores["teacher_p_label"] = predict_features(teacher, noisy)[torch.arange(n), y].double()
        secs["teacher_p_label"] = time.process_time() - t0
        scores["random"] = torch.rand(n, generator=g, dtype=torch.float64)
        secs["random"] = 0.0
        row = {"seed": s, "flips": len(bad), "tmc": {k: v for k, v in info.items()}, "cpu_s": secs}
        for m in FLIP_METHODS:
            flagged = set(lowest(scores[m], len(bad) / n).tolist())
            hit = len(flagged & bad)
            per_seed[m].append((hit / len(flagged), hit / len(bad)))
            row[m] = {"precision": hit / len(flagged), "recall": hit / len(bad)}
        runs.append(row)
        print(f"flip seed {s}: " + ", ".join(f"{m} {row[m]['precision']:.2f}" for m in FLIP_METHODS), flush=True)
    out = {}
    for m in FLIP_METHODS:
        pm, ps = mean_std([p for p, _ in per_seed[m]])
        rm, rs = mean_std([r for _, r in per_seed[m]])
        out[m] = {"precision_mean": pm, "precision_std": ps, "recall_mean": rm, "recall_std": rs}
    base = out["random"]
    for m in FLIP_METHODS:
        out[m]["precision_ratio_vs_random"] = out[m]["precision_mean"] / max(base["precision_mean"], 1e-12)
        out[m]["verdict_vs_random"] = verdict(
            out[m]["precision_mean"], out[m]["precision_std"], base["precision_mean"], base["precision_std"]
        )
    return out, runs


def setup_of(args, budgets, learner_name: str, threads: int, features_wall: float) -> dict:
    return {
        "protocol": "benchmarks/dd_sst2.py's (pool, halves, eval, learner, steps, lr, batch), hard labels",
        "pool": args.pool,
        "eval": args.eval_size,
        "seeds": args.seeds,
        "seeds_note": "3 sets/learner seeds per arm and budget instead of dd_sst2.py's 10, to fit 8 CPU-minutes",
        "budgets": budgets,
        "learner": learner_name,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "space": "L2-normalized mean-pooled frozen MiniLM features (potstill select's coreset space)",
        "knn_shapley": {"k": args.k, "validation": f"{args.val} sentences of the other pool half per set"},
        "flip": {
            "pool": args.flip_pool,
            "validation": f"{args.flip_val} other, clean pool sentences",
            "fraction": args.flip_fraction,
            "tmc": {
                "learner": "nearest centroid, validation accuracy",
                "permutations_max": args.permutations,
                "tolerance": 0.01,
                "convergence": 0.05,
            },
            "teacher_steps": args.teacher_steps,
        },
        "quick": args.quick,
        "torch_threads": threads,
        "features_wall_s": features_wall,
    }


def summary_items(table: dict, flips: dict, budgets) -> dict:
    items = {}
    for b in budgets:
        t = table[str(b)]
        items[f"b{b}_random"] = round(t["random"]["mean"], 3)
        for arm in ("herding", "k_center", "knn_shapley"):
            items[f"b{b}_{arm}_x"] = round(t[arm]["ratio_vs_random"], 3)
    for m in ("knn_shapley", "tmc_shapley", "teacher_p_label"):
        items[f"flip_prec_{m}"] = f"{flips[m]['precision_mean']:.2f}({flips[m]['precision_ratio_vs_random']:.1f}x)"
    items["flip_prec_random"] = round(flips["random"]["precision_mean"], 3)
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: pool 600, eval 200, budgets 5,10")
    p.add_argument("--seeds", type=int, default=3, help="sets (learner seeds) per arm and budget, >= 3")
    p.add_argument("--budgets", default=None, help="examples per class (default 5,10,20)")
    p.add_argument("--pool", type=int, default=5000)
    p.add_argument("--eval-size", type=int, default=872)
    p.add_argument("--val", type=int, default=500, help="KNN-Shapley validation sentences (other pool half)")
    p.add_argument("--k", type=int, default=10, help="K of KNN-Shapley")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--flip-pool", type=int, default=500)
    p.add_argument("--flip-val", type=int, default=200)
    p.add_argument("--flip-fraction", type=float, default=0.1)
    p.add_argument("--permutations", type=int, default=300, help="TMC-Shapley permutations at most")
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    budgets = [int(b) for b in (args.budgets or ("5,10" if args.quick else "5,10,20")).split(",")]
    if args.quick:
        args.pool, args.eval_size, args.val, args.flip_pool, args.flip_val = 600, 200, 100, 150, 100
        args.permutations, args.teacher_steps = 40, 100
    out_path = Path(args.out) if args.out else (Path("/tmp/survey_valuation_quick.json") if args.quick else DEFAULT_OUT)

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from potstill.data.classification import load_sst2
    from potstill.dd.protocol import SplitLearner
    from potstill.models.classifier import TextClassifier, load_encoder
    from potstill.runners.common import coreset_space, pooled

    w0, c0 = time.perf_counter(), time.process_time()
    encoder, tokenizer = load_encoder("all-minilm-l6-v2")
    model = TextClassifier(encoder, tokenizer, num_labels=2, seed=0)
    learner = SplitLearner.from_classifier(model, trainable_layers=0, max_length=48)
    pool = random.Random(0).sample(load_sst2("train"), args.pool)
    dev = load_sst2("dev")
    random.Random(0).shuffle(dev)
    pool_f = pooled(learner.features(pool))
    eval_f = pooled(learner.features(dev[: args.eval_size]))
    emb = coreset_space(pool_f)
    features_wall = time.perf_counter() - w0
    table = selection_part(args, pool_f, eval_f, emb, learner, args.seeds, budgets)
    flips, flip_runs = flip_part(args, pool_f, emb, learner, args.seeds)
    data = {
        "setup": setup_of(args, budgets, learner.name, torch.get_num_threads(), features_wall),
        "selection": table,
        "label_flips": flips,
        "label_flip_runs": flip_runs,
        "cpu_s": time.process_time() - c0,
        "wall_s": time.perf_counter() - w0,
    }
    write_json_atomic(out_path, data)
    items = summary_items(table, flips, budgets)
    items.update(wall_min=round(data["wall_s"] / 60, 1), out=str(out_path))
    print(summary_line("survey_valuation", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
