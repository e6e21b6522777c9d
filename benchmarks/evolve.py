"""A teacher that changes under a cache: refresh the rows that drifted vs recompute them all.

Setting: the demo cache (``recipes/demo_cache.yaml``: SmolLM2-135M-Instruct, 160 training answers, a
sampled cache of 12 draws in fp16). The teacher is then fine-tuned for a few steps on a slice of the
training answers (the first ``slice`` examples, AdamW, cross-entropy on the responses) -- a stand-in for the
next checkpoint of a teacher that keeps training. What the old cache can become, each timed:

* ``full``: the cache written again by the new teacher (``potstill cache`` into a new directory);
* ``refresh_hi`` / ``refresh_lo``: ``potstill cache --refresh`` at two thresholds (drift in nats per response
  token, measured on each example's first ``probe_tokens`` response tokens): only the examples over the
  threshold are recomputed, the rest keep the old teacher's rows;
* ``stale``: no refresh, the old cache as it is.

A student is distilled from each (the demo's KD run: forward KL, alpha 0, 40 steps of 8, cut from the old
teacher's layers, the same init for every arm) over 3 training seeds, and scored teacher-forced on the held-out
split against the *new* teacher (forward KL per response token). ``continue``: the ``stale`` student of each seed
trained ``continue_steps`` more steps on the ``refresh_lo`` cache (a distill run that starts from an earlier
student). A gap to ``full`` counts only past the sum of the two arms' standard deviations over seeds.

Usage: ``python benchmarks/evolve.py [--quick] [--out PATH]``; writes ``benchmarks/results/evolve.json`` and
prints one line. ``--timing-only --max-new-tokens 128`` times the same refreshes on longer answers (no students;
``evolve_timing.json``): a refresh saves what its probe does not read, so its gain grows with the answers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Partial, seed_stats, summary_line, verdict, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "evolve.json"
ARMS = ("full", "refresh_hi", "refresh_lo", "stale", "continue")


def setting(quick: bool) -> dict:
    return {
        "num_prompts": 24 if quick else 200,
        "max_new_tokens": 8 if quick else 32,
        "eval_size": 8 if quick else 40,
        "steps": 2 if quick else 40,
        "batch_size": 4 if quick else 8,
        "learning_rate": 5e-4,
        "cache": {"kind": "sampled", "draws": 12, "dtype": "fp16"},
        "slice": 4 if quick else 32,
        "finetune_steps": 2 if quick else 8,
        "finetune_lr": 3e-5,
        "thresholds": {"refresh_hi": 0.15, "refresh_lo": 0.08},
        "probe_tokens": 8,
        "probe_study": [4, 8, 16],
        "continue_steps": 2 if quick else 20,
        "seeds": [0] if quick else [0, 1, 2],
        "timing_repeats": 1 if quick else 3,
    }


def finetune(teacher, examples: list[dict], s: dict, pad: int):
    """The teacher after ``finetune_steps`` AdamW steps of response cross-entropy on ``examples``."""
    import torch

    from potstill.data import PadCollator

    new = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(new.parameters(), lr=s["finetune_lr"])
    collate = PadCollator(pad)
    torch.manual_seed(0)
    for step in range(s["finetune_steps"]):
        lo = (step * 8) % len(examples)
        batch = collate([{k: x[k] for k in ("input_ids", "labels", "attention_mask")} for x in examples[lo : lo + 8]])
        loss = new(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return new.eval()


def main() -> int:  # noqa: PLR0915 - one benchmark, read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke setting (one seed, 2 steps)")
    ap.add_argument("--out", default=None, help="default: results/evolve.json (evolve_timing.json with --timing-only)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="longer answers than the demo's 32 tokens")
    ap.add_argument(
        "--timing-only", action="store_true", help="time the refresh and the probes; train no student (one line, JSON)"
    )
    args = ap.parse_args()
    if args.out is None:
        args.out = str(DEFAULT_OUT if not args.timing_only else DEFAULT_OUT.with_name("evolve_timing.json"))

    import torch
    import transformers
    from scipy.stats import spearmanr

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from potstill.data.collate import pad_id
    from potstill.eval import evaluate_runs, metrics_only
    from potstill.fingerprints import weights_fingerprint
    from potstill.recipes.distill import Recipe
    from potstill.recipes.divergences import ForwardKL
    from potstill.recipes.methods import RunConfig
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run
    from potstill.signals.cache import CachedSignal, CacheSpec, write_cache
    from potstill.signals.cache.refresh import RefreshRule, refresh_cache

    s = setting(args.quick)
    if args.max_new_tokens:
        s["max_new_tokens"] = args.max_new_tokens
    if args.timing_only:
        s["seeds"] = []
    partial = Partial(args.out, s)
    recipe = Recipe.model_validate(
        {
            "data": {
                "source": {"kind": "demo", "num_prompts": s["num_prompts"], "max_new_tokens": s["max_new_tokens"]},
                "eval_size": s["eval_size"],
            },
            "train": {"max_steps": s["steps"], "batch_size": s["batch_size"], "learning_rate": s["learning_rate"]},
            "device": "cpu",
        }
    )
    prep = Prepared(recipe)
    exs, pad = prep.train_examples, pad_id(prep.tokenizer, required=True)
    c = s["cache"]
    spec = CacheSpec(kind=c["kind"], draws=c["draws"], dtype=c["dtype"])
    run = RunConfig(name="kd", alpha=0.0, divergence=ForwardKL())
    work = Path(tempfile.mkdtemp(prefix="potstill-bench-evolve-"))
    t_all = time.perf_counter()
    try:
        old = prep.teacher
        t0 = time.perf_counter()
        write_cache(old, prep.tokenizer, exs, work / "old", spec, progress=False)
        seconds = {"old_write": time.perf_counter() - t0}
        new = finetune(old, exs[: s["slice"]], s, pad)
        assert weights_fingerprint(new) != weights_fingerprint(old)
        caches = {"stale": work / "old"}
        # Each way of bringing the cache up to the new teacher is timed `timing_repeats` times, interleaved
        # (the 2 cores are shared: one timing can be off by 20 %); the median counts, the last copy is kept.
        timings: dict = {}
        each: dict[str, list[float]] = {"full": [], **{arm: [] for arm in s["thresholds"]}}
        refreshed = {}
        for rep in range(s["timing_repeats"]):
            last = rep == s["timing_repeats"] - 1
            shutil.rmtree(work / "full", ignore_errors=True)
            t = {}
            t0 = time.perf_counter()
            write_cache(new, prep.tokenizer, exs, work / "full", spec, progress=False, timings=t)
            each["full"].append(time.perf_counter() - t0)
            timings["full"] = t
            for arm, threshold in s["thresholds"].items():
                shutil.rmtree(work / arm, ignore_errors=True)
                shutil.copytree(work / "old", work / arm)
                t = {}
                t0 = time.perf_counter()
                rule = RefreshRule(threshold=threshold, probe_tokens=s["probe_tokens"])
                man = refresh_cache(new, prep.tokenizer, exs, work / arm, spec, rule, progress=False, timings=t)
                each[arm].append(time.perf_counter() - t0)
                timings[arm] = t
                if not last:
                    continue
                drift = json.loads((work / arm / "drift.json").read_text())
                d = [drift["drift"][str(e)] for e in range(len(exs))]
                refreshed[arm] = {
                    "threshold": threshold,
                    "tokens_vs_full": (t.get("probe_tokens_read", 0) + t.get("tokens_read", 0))
                    / timings["full"]["tokens_read"],
                    "examples_recomputed": man["refreshes"][-1]["examples_recomputed"],
                    "recomputed_in_slice": sum(e < s["slice"] for e in drift["recomputed"]),
                    "mean_drift_slice": sum(d[: s["slice"]]) / s["slice"],
                    "mean_drift_rest": sum(d[s["slice"] :]) / (len(d) - s["slice"]),
                }
        for arm, xs in each.items():
            seconds[arm] = statistics.median(xs)
        caches["full"] = work / "full"
        for arm in s["thresholds"]:
            caches[arm] = work / arm
        # the exact drift of every example (all its rows), and what shorter probes cost and how they rank
        probes = {}
        for probe in [None, *s["probe_study"]]:
            name = "exact" if probe is None else f"probe{probe}"
            shutil.copytree(work / "old", work / name)
            t = {}
            rule = RefreshRule(threshold=1e9, probe_tokens=probe)  # measure only: nothing passes
            refresh_cache(new, prep.tokenizer, exs, work / name, spec, rule, progress=False, timings=t)
            drift = json.loads((work / name / "drift.json").read_text())["drift"]
            probes[name] = {"drift": [drift[str(e)] for e in range(len(exs))], **t}
            shutil.rmtree(work / name)
        for row in probes.values():
            row["spearman_vs_exact"] = float(spearmanr(row["drift"], probes["exact"]["drift"]).statistic)
            row["tokens_vs_full"] = row["probe_tokens_read"] / timings["full"]["tokens_read"]
            row["seconds_vs_full"] = row["probe_s"] / seconds["full"]

        def evaluate(models: dict) -> dict:
            res = metrics_only(
                evaluate_runs(
                    models,
                    new,
                    prep.tokenizer,
                    prep.eval_examples,
                    vocab_size=prep.vocab_size,
                    batch_size=8,
                    max_new_tokens=0,
                    progress=False,
                )
            )
            return {k: {m: res[k][m] for m in ("forward_kl", "top1_agreement")} for k in models}

        if "student_init" not in partial and s["seeds"]:
            partial.put("student_init", evaluate({"student_init": prep.student0})["student_init"])
        for seed in s["seeds"]:
            r = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": seed})})
            stale_model = None
            for arm in ("full", "refresh_hi", "refresh_lo", "stale"):
                key = f"{arm}/{seed}"
                if key in partial and (arm != "stale" or f"continue/{seed}" in partial):
                    continue
                source = CachedSignal(caches[arm], tokenizer=prep.tokenizer, allow_mixed=True)
                t0 = time.perf_counter()
                model, _ = train_run(
                    r,
                    run,
                    copy.deepcopy(prep.student0).train(),
                    None,
                    prep.tokenizer,
                    exs,
                    work / f"{arm}_{seed}",
                    prep.device,
                    prep.vocab_size,
                    source=source,
                )
                secs = time.perf_counter() - t0
                if key not in partial:
                    partial.put(key, evaluate({key: model.eval()})[key] | {"train_seconds": secs})
                if arm == "stale":
                    stale_model = model
            key = f"continue/{seed}"
            if key not in partial:
                cont = r.model_copy(update={"train": r.train.model_copy(update={"max_steps": s["continue_steps"]})})
                source = CachedSignal(caches["refresh_lo"], tokenizer=prep.tokenizer, allow_mixed=True)
                model, _ = train_run(
                    cont,
                    run,
                    stale_model.train(),
                    None,
                    prep.tokenizer,
                    exs,
                    work / f"continue_{seed}",
                    prep.device,
                    prep.vocab_size,
                    source=source,
                )
                partial.put(key, evaluate({key: model.eval()})[key])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    res = partial.done
    arms = {}
    for arm in ARMS if s["seeds"] else ():
        arms[arm] = {
            "forward_kl": seed_stats([res[f"{arm}/{seed}"]["forward_kl"] for seed in s["seeds"]]),
            "top1_agreement": seed_stats([res[f"{arm}/{seed}"]["top1_agreement"] for seed in s["seeds"]]),
        }
    for row in arms.values():
        row["forward_kl_vs_full"] = row["forward_kl"]["mean"] / arms["full"]["forward_kl"]["mean"]
        row["vs_full"] = verdict(row["forward_kl"], arms["full"]["forward_kl"], lower_better=True)
    for arm in ("refresh_hi", "refresh_lo"):
        refreshed[arm]["seconds_vs_full"] = seconds[arm] / seconds["full"]
        refreshed[arm]["seconds_vs_full_each"] = [a / b for a, b in zip(each[arm], each["full"])]
    out = {
        "claim": "refreshing a cache against a fine-tuned teacher (recompute only the examples whose drift "
        "passes a threshold) vs recomputing it all vs keeping it stale: seconds and the student's held-out "
        "forward KL to the new teacher",
        "setting": s
        | {
            "teacher": recipe.teacher.model,
            "student": f"from_teacher, {recipe.student.layers} layers of the old teacher",
            "train_examples": len(exs),
            "eval_examples": len(prep.eval_examples),
            "quick": args.quick,
            "device": "cpu (2 shared cores)",
            "torch_threads": torch.get_num_threads(),
            "wall_seconds": round(time.perf_counter() - t_all, 1),
        },
        "seconds": seconds,
        "seconds_each": each,
        "timings": timings,
        "refreshed": refreshed,
        "probes": {k: {m: v for m, v in row.items() if m != "drift"} for k, row in probes.items()},
        "exact_drift": probes["exact"]["drift"],
    }
    if s["seeds"]:
        out |= {
            "student_init": res["student_init"],
            "arms": arms,
            "per_seed": {k: v for k, v in res.items() if k != "student_init"},
        }
    write_json_atomic(args.out, out)
    partial.finish()
    print(
        summary_line(
            "evolve",
            {
                "refresh_lo_s_vs_full": refreshed["refresh_lo"]["seconds_vs_full"],
                "refresh_lo_recomputed": refreshed["refresh_lo"]["examples_recomputed"],
                "refresh_hi_s_vs_full": refreshed["refresh_hi"]["seconds_vs_full"],
                "refresh_hi_recomputed": refreshed["refresh_hi"]["examples_recomputed"],
                "tokens_per_example": timings["full"]["tokens_read"] / len(exs),
                **{f"{a}_fkl_vs_full": arms[a]["forward_kl_vs_full"] for a in arms if a != "full"},
                **{f"{a}": arms[a]["vs_full"] for a in arms if a != "full"},
            },
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
