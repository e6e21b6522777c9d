"""Cross-tokenizer KD from disk against the live run (issue 20): a cache of the Gemma-3 270M teacher, written in
its own tokens and vocabulary (262,144), read by a 6-layer cut of SmolLM2-135M-Instruct (49,152) through the
vocabulary map.

``recipes/cross_tokenizer.yaml`` on the first ``--examples`` AlpacaEval pairs (written to a scratch file; the
held-out split is the recipe's 40), at equal optimizer steps, per seed (``train.seed``: data order):

* ``sft``: the student alone (reference);
* ``live``: live cross-tokenizer KD (``align: vocab_map``; the teacher reads the student's decoded text, its chat
  markup included);
* ``live_own``: the same with ``teacher_view: own``: the live teacher reads its own encoding of each pair (what the
  cache holds), rows aligned on the response;
* ``disk_topk<k>`` / ``disk_sampled<n>``: the same run from a cache written once by ``potstill cache`` on the
  same recipe (the teacher's own encoding of each pair: its own prompt rendering), projected per batch.

Per arm: held-out perplexity of the references and ECE (mean, std over seeds, per seed), train seconds, the
rows aligned and informed; per cache: bytes/token and seconds to write. The verdict of each disk arm against
the live one counts a gap only past the sum of their stds (``_common.verdict``).

``--certify``: only the certificate of each cache's setting (``potstill cache --certify`` on the same recipe:
the probe's rows aligned on the response, both signals projected onto the student's vocabulary), merged into an
existing JSON as ``certificates`` beside its held-out results: does the certificate's order match theirs?

Usage: ``python benchmarks/cross_cache.py [--quick] [--seeds N] [--steps N] [--examples N] [--out PATH]
[--work DIR] [--certify]``. Resumable: finished (arm, seed) units are kept in ``<out>.partial.json``, finished
caches in ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Partial, seed_stats, summary_line, verdict, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cross_cache.json"
# the demo's cache settings at <= 32 bytes/token (benchmarks/results/cache.json)
CACHES = {
    "topk8_int8": {"signal": {"kind": "topk", "k": 8}, "dtype": "int8"},
    "sampled12": {"signal": {"kind": "sampled", "draws": 12}},
    # a control far past the budget: if it matches the live run where the small caches do not, fidelity is
    # what they lack; if it does not either, the difference is the teacher reading its own prompt rendering
    "topk64": {"signal": {"kind": "topk", "k": 64}},
    "topk1024": {"signal": {"kind": "topk", "k": 1024}},  # and far past that: does the gap close with k?
}


def _subset(n: int, work: Path) -> Path:
    data = Path(os.environ.get("POTSTILL_DATA", HERE.parent.parent / "shared" / "data"))
    rows = json.loads((data / "alpaca_eval" / "gpt4_outputs.json").read_text())[:n]
    path = work / "alpaca_subset.json"
    path.write_text(json.dumps(rows))
    return path


def _cache_overrides(work: Path, name: str) -> list[str]:
    return [f"cache.dir={work / name}"] + [f"cache.{k}={json.dumps(v)}" for k, v in CACHES[name].items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--examples", type=int, default=160, help="AlpacaEval pairs read (40 are held out)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", default=None, help="scratch directory (kept: a rerun reuses its finished caches)")
    p.add_argument(
        "--certify",
        action="store_true",
        help="only each cache setting's certificate, merged into the existing JSON (no cache is written)",
    )
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.examples = 1, 2, 48
    from potstill.eval import evaluate_runs, metrics_only
    from potstill.recipes.distill import load_recipe
    from potstill.runners.cache import cache as write_cache_cli
    from potstill.runners.prepare import Prepared
    from potstill.runners.train import train_run
    from potstill.signals.cache import read_manifest

    setting = {"seeds": args.seeds, "steps": args.steps, "examples": args.examples}
    partial = Partial(args.out, setting)  # units are keyed by arm and seed: adding a cache reuses the others
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cross_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    data = _subset(args.examples, work)
    vmap = "{kind: cross_tokenizer, align: vocab_map, kinds: [exact, normalized, mined]}"
    base = [
        f"data.source.path={data}",
        f"train.max_steps={args.steps}",
        "train.batch_size=4",
        f"output_dir={work / 'out'}",
        f"runs=[{{name: sft, alpha: 1.0}}, {{name: kd, alpha: 0.5, method: {vmap}}}, "
        f"{{name: kd_own, alpha: 0.5, method: {vmap[:-1]}, teacher_view: own}}}}]",
    ]
    t0 = time.perf_counter()
    if args.certify:
        try:
            return _certify(args, base, work, t0)
        finally:
            if not args.work:  # only the data subset was written there
                shutil.rmtree(work, ignore_errors=True)
    caches: dict[str, dict] = {}
    for name in CACHES:
        if f"cache/{name}" in partial and (work / name / "manifest.json").is_file():
            caches[name] = partial[f"cache/{name}"]
            continue
        over = base + _cache_overrides(work, name)
        t = time.perf_counter()
        write_cache_cli(load_recipe(HERE.parent / "recipes" / "cross_tokenizer.yaml", over), progress=False)
        m = read_manifest(work / name)
        caches[name] = {
            "bytes_per_token": m["bytes_per_token"],
            "rows": m["data"]["num_rows"],
            "examples": m["data"]["num_examples"],
            "write_seconds": time.perf_counter() - t,
            "settings": CACHES[name],
        }
        partial.put(f"cache/{name}", caches[name])
    prep = Prepared(load_recipe(HERE.parent / "recipes" / "cross_tokenizer.yaml", base))
    ctx_live = prep.cross_context()
    sources = {}
    for name in CACHES:
        r = load_recipe(HERE.parent / "recipes" / "cross_tokenizer.yaml", base + _cache_overrides(work, name))
        prep.recipe = r
        sources[name] = (prep.cached_source(), prep.cross_context(), r)
    prep.recipe = load_recipe(HERE.parent / "recipes" / "cross_tokenizer.yaml", base)
    arms = ["sft", "live", "live_own"] + [f"disk_{n}" for n in CACHES]
    run_of = {"sft": 0, "live": 1, "live_own": 2}
    for seed in range(args.seeds):
        for arm in arms:
            key = f"{arm}/{seed}"
            if key in partial:
                continue
            recipe = prep.recipe if not arm.startswith("disk_") else sources[arm[5:]][2]
            recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": seed})})
            run = recipe.runs[run_of.get(arm, 1)]
            source, ctx = (None, ctx_live) if not arm.startswith("disk_") else sources[arm[5:]][:2]
            out = work / "runs" / key
            shutil.rmtree(out, ignore_errors=True)  # what a killed unit left
            model, _ = train_run(
                recipe,
                run,
                copy.deepcopy(prep.student0).train(),
                prep.teacher,
                prep.tokenizer,
                prep.train_examples,
                out,
                prep.device,
                prep.vocab_size,
                source=source,
                cross=ctx,
            )
            info = json.loads((out / "train_info.json").read_text())
            res = metrics_only(
                evaluate_runs(
                    {arm: model},
                    None,
                    prep.tokenizer,
                    prep.eval_examples,
                    batch_size=8,
                    max_new_tokens=0,
                    progress=False,
                )
            )[arm]
            partial.put(
                key,
                {
                    "perplexity": res["perplexity"],
                    "ece": res["ece"],
                    "train_seconds": info["train_seconds"],
                    "coverage": info.get("cross_tokenizer"),
                },
            )
            print(summary_line(key, {"perplexity": res["perplexity"], "ece": res["ece"]}), flush=True)
    runs = {}
    for arm in arms:
        per = [partial[f"{arm}/{s}"] for s in range(args.seeds)]
        runs[arm] = {
            "perplexity": seed_stats([x["perplexity"] for x in per]),
            "ece": seed_stats([x["ece"] for x in per]),
            "train_seconds": seed_stats([x["train_seconds"] for x in per]),
            "coverage": per[0]["coverage"],
        }
    for arm in arms:
        for ref in ("live", "live_own"):
            if arm.startswith("disk_") or (arm == "live_own" and ref == "live"):
                runs[arm][f"vs_{ref}"] = {
                    "perplexity_ratio": runs[arm]["perplexity"]["mean"] / runs[ref]["perplexity"]["mean"],
                    "perplexity": verdict(runs[arm]["perplexity"], runs[ref]["perplexity"], lower_better=True),
                    "ece": verdict(runs[arm]["ece"], runs[ref]["ece"], lower_better=True),
                    "train_seconds_ratio": runs[arm]["train_seconds"]["mean"] / runs[ref]["train_seconds"]["mean"],
                }
    result = {
        "setup": {
            "teacher": "gemma3-270m (vocab 262,144)",
            "student": "smollm2-135m-instruct, 6 of 30 layers (vocab 49,152)",
            "data": f"first {args.examples} AlpacaEval pairs, {len(prep.train_examples)} train / "
            f"{len(prep.eval_examples)} held out",
            **setting,
            "caches": CACHES,
            "batch_size": 4,
        },
        "caches": caches,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(args.out, result)
    partial.finish()
    items = {"live_ppl": runs["live"]["perplexity"]["mean"], "sft_ppl": runs["sft"]["perplexity"]["mean"]}
    items["own_vs_live"] = runs["live_own"]["vs_live"]["perplexity_ratio"]
    for n in CACHES:
        items[f"{n}_vs_live"] = runs[f"disk_{n}"]["vs_live"]["perplexity_ratio"]
        items[f"{n}_vs_own"] = runs[f"disk_{n}"]["vs_live_own"]["perplexity_ratio"]
        items[f"{n}_time_vs_live"] = runs[f"disk_{n}"]["vs_live"]["train_seconds_ratio"]
    print(summary_line("cross_cache", items))
    return 0


def _certify(args, base: list[str], work: Path, t0: float) -> int:
    """Each cache setting's certificate (forward KL, the recipe's vocab_map run) against the held-out results."""
    from scipy.stats import kendalltau

    from potstill.recipes.distill import load_recipe
    from potstill.runners.cache import certificate
    from potstill.runners.prepare import Prepared

    result = json.loads(Path(args.out).read_text())
    recipe_path = HERE.parent / "recipes" / "cross_tokenizer.yaml"
    prep = Prepared(load_recipe(recipe_path, base))
    certs: dict[str, dict] = {}
    for name in CACHES:
        prep.recipe = load_recipe(recipe_path, base + _cache_overrides(work, name))
        t = time.perf_counter()
        cert = certificate(prep.recipe, prep)
        (d,) = cert["divergences"].values()
        mine = next(row for row in d["candidates"] if row[d["param"]] == d["own"])
        held = result["runs"][f"disk_{name}"]["vs_live"]
        certs[name] = {
            "own": {d["param"]: d["own"], **mine},
            "recommendation": d["recommendation"],
            "reason": d["reason"],
            "rows": d["rows"],
            "aligned_row_share": d["aligned_row_share"],
            "dense_loss": d["dense_loss"],
            "seconds": time.perf_counter() - t,
            "held_out_perplexity_ratio": held["perplexity_ratio"],
            "held_out_verdict": held["perplexity"],
            "certificate": d,
        }
        print(summary_line(f"certify/{name}", {k: mine[k] for k in ("loss_error", "head_grad_bias", "noise_ratio")}))
    names = list(certs)
    ratios = [certs[n]["held_out_perplexity_ratio"] for n in names]
    order = {}
    for key in ("loss_error", "grad_error", "head_grad_bias"):
        tau = kendalltau([certs[n]["own"][key] for n in names], ratios)
        order[key] = {"tau": float(tau.statistic), "p": float(tau.pvalue)}
    result["certificates"] = {
        "settings": "recipes/cross_tokenizer.yaml's cache.certify defaults (16 probe examples, <= 512 rows, 8 draw "
        "seeds), forward KL, the vocab_map run's kinds",
        "caches": certs,
        "order_vs_held_out": order,
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(args.out, result)
    print(summary_line("cross_cache_certify", {f"tau_{k}": v["tau"] for k, v in order.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
