"""``potstill <verb> RECIPE.yaml [key=value ...]``.

Bad input prints one line, ``error: <what is wrong>; <how to fix it>``, and exits 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXAMPLE = """example:
  potstill distill recipes/demo.yaml train.max_steps=20 runs.1.temperature=2.0
  potstill cache recipes/demo_cache.yaml        # run the teacher once; then:
  potstill distill recipes/demo_cache.yaml      # train every student from the cache
  accelerate launch --num_processes 2 -m potstill cache recipes/demo_cache.yaml   # sharded over 2 processes
  potstill eval recipes/demo.yaml --student path/to/other_student
  potstill compare recipes/demo.yaml compare.seeds=[0,1,2]   # every run vs the first over seeds: verdict table
  potstill demo --output-dir runs/demo
  potstill classify recipes/classify_sms_spam.yaml      # task-specific KD of a text classifier
  potstill select recipes/select_kd.yaml                 # keep 10% of the data, every drop with its reason
  potstill synthesize recipes/synthesize_self_instruct.yaml
  potstill condense recipes/condense_sst2.yaml
  potstill eval-data recipes/eval_data_sst2.yaml      # a set vs random / coreset subsets, hard + soft labels
  potstill distill-vlm recipes/distill_vlm_smolvlm.yaml   # VLM -> VLM KD on the text tokens
  potstill explain recipes/explain_sms_spam.yaml          # CC-SHAP: do answer and explanation use the same tokens?
"""

# verb -> (help, recipe loader, runner): recipes of their own kind, outside distill's. A loader of None is
# `potstill.recipes.load_recipe(path, overrides, verb=<verb>)`; "module:name" names a function; a runner's module
# may define `summary_line(result)`.
TASKS = {
    "classify": (
        "task-specific KD of a text classifier: teacher, KD student, no-teacher student",
        None,
        "potstill.runners.classify:run",
    ),
    "select": (
        "score and select training examples (dataset distillation by selection)",
        None,
        "potstill.runners.select:run",
    ),
    "synthesize": (
        "generate a compact instruction dataset with a teacher (Self-Instruct, Evol-Instruct)",
        None,
        "potstill.runners.synthesize:run_synthesis",
    ),
    "condense": (
        "learn a small synthetic classification set (gradient / trajectory matching)",
        None,
        "potstill.runners.condense:run",
    ),
    "eval-data": (
        "judge distilled / selected sets against random and coreset subsets of the same size",
        None,
        "potstill.runners.eval_data:run",
    ),
    "distill-vlm": (
        "distill a VLM teacher into a VLM student on the text tokens of image-text examples",
        None,
        "potstill.runners.distill_vlm:run",
    ),
    "explain": (
        "CC-SHAP self-consistency of models' answers and their explanations (Parcalabescu & Frank 2024)",
        None,
        "potstill.runners.explain:run",
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="potstill",
        description="Knowledge distillation and dataset distillation for LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    d = sub.add_parser(
        "distill",
        help="train the recipe's students from its teacher, evaluate, report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    d.add_argument("recipe", help="YAML recipe (see recipes/)")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    c = sub.add_parser(
        "cache",
        help="run the recipe's teacher once over its training data and store its signal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    c.add_argument("recipe", help="YAML recipe with a `cache` section")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    c.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)")
    c.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    c.add_argument("--append", action="store_true", help="the data grew: cache the new examples only")
    c.add_argument(
        "--refresh",
        action="store_true",
        help="the teacher changed: recompute the examples that drifted past cache.refresh (the rest are kept)",
    )
    c.add_argument(
        "--certify",
        action="store_true",
        help="measure the signal's loss and gradient error against the dense teacher per candidate k or draws; "
        "written into the manifest",
    )
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    e = sub.add_parser("eval", help="evaluate the finished students of a recipe on its held-out prompts")
    e.add_argument("recipe", help="YAML recipe whose output_dir holds finished runs")
    e.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    e.add_argument("--student", action="append", default=[], help="extra student directory (repeatable)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    k = sub.add_parser(
        "compare",
        help="train the recipe's runs over compare.seeds and judge each against a baseline run (verdict table)",
    )
    k.add_argument("recipe", help="YAML distill recipe (its `compare` section: seeds, baseline, metrics)")
    k.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    k.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    for verb, (text, *_rest) in TASKS.items():
        t = sub.add_parser(verb, help=text)
        t.add_argument("recipe", help=f"YAML recipe (see recipes/{verb.replace('-', '_')}_*.yaml)")
        t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    s = sub.add_parser("schema", help="print the JSON schema of a verb's recipe (for editors)")
    s.add_argument("name", metavar="VERB", help="the verb whose recipe schema to print, e.g. distill")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    m = sub.add_parser("demo", help="the embedded default: SmolLM2 teacher, SFT vs KD students, report")
    m.add_argument("overrides", nargs="*", help="dotted key=value overrides of the embedded recipe")
    m.add_argument("--output-dir", default=None, help="where to write (default runs/demo)")
    m.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def _quiet_libraries() -> None:
    """Weight-loading bars and library warnings would bury our own progress bars and error line."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _run(args: argparse.Namespace) -> int:
    _quiet_libraries()

    if args.verb == "demo":
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        recipe = _load_recipe(None, overrides, verb="demo")
        from .runners.distill import distill

        metrics = distill(recipe)
    elif args.verb == "distill":
        recipe = _load_recipe(args.recipe, args.overrides, verb="distill")
        from .runners.distill import distill

        metrics = distill(recipe)
    elif args.verb == "cache":
        return _cache(args)
    elif args.verb == "compare":
        return _compare(args)
    elif args.verb == "schema":
        return _schema(args)
    elif args.verb in TASKS:
        return _task(args)
    elif args.verb == "eval":
        recipe = _load_recipe(args.recipe, args.overrides, verb="eval")
        from .runners.distill import evaluate_only

        metrics = evaluate_only(recipe, args.student)
    else:  # pragma: no cover - argparse handles it
        raise AssertionError(args.verb)
    out = Path(recipe.output_dir)
    from .distributed import is_main_process

    if not is_main_process():  # the first of several processes evaluates and reports
        return 0
    _summary(metrics)
    print(f"report: {out / 'report.md'}  metrics: {out / 'metrics.json'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .distributed import world_size
    from .errors import PotstillError
    from .runners.compare import compare, summary_lines

    recipe = _load_recipe(args.recipe, args.overrides, verb="compare")
    if world_size() > 1:
        raise PotstillError("compare runs its seeds one after another in one process; run it without a launcher")
    result = compare(recipe)
    for line in summary_lines(result):
        print(line)
    out = Path(recipe.output_dir)
    print(f"compare: {out / 'compare.md'}  {out / 'compare.json'}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    """Print the JSON schema of a verb's recipe (for editors: YAML language servers read it)."""
    import json

    from .recipes import recipe_schema

    print(
        json.dumps(
            recipe_schema("distill" if args.name in ("cache", "eval", "demo", "compare") else args.name), indent=2
        )
    )
    return 0


def _env_int(name: str, default: int) -> int:
    import os

    from .errors import PotstillError

    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise PotstillError(f"${name}={raw!r} is not an integer; unset it or pass --rank/--world-size") from None


def _cache(args: argparse.Namespace) -> int:
    from .runners.cache import cache

    recipe = _load_recipe(args.recipe, args.overrides, verb="cache")
    rank = args.rank if args.rank is not None else _env_int("RANK", 0)
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE", 1)
    manifest = cache(
        recipe, rank=rank, world_size=world, append=args.append, refresh=args.refresh, certify=args.certify
    )
    if manifest is None:
        print(
            f"rank {rank} of {world}: its shards are written to {recipe.cache_dir}; the last process to finish "
            "writes the manifest"
        )
        return 0
    print(
        f"cache: {recipe.cache_dir}  {manifest['spec']['kind']} ({manifest['spec']['dtype']})  "
        f"{manifest['data']['num_examples']} examples, {manifest['data']['num_rows']} tokens, "
        f"{manifest['num_shards']} shards, {manifest['bytes_per_token']:.1f} bytes/token"
    )
    if args.certify:
        from .runners.cache import certificate_lines

        for line in certificate_lines(manifest["certificate"]) or [manifest["certificate"].get("reason", "")]:
            print(line)
    if args.refresh and manifest.get("refreshes"):
        r = manifest["refreshes"][-1]
        mixed = (
            "; rows of an earlier teacher kept (train with cache.allow_mixed: true)" if "sources" in manifest else ""
        )
        print(
            f"refresh {r['revision']}: {r['examples_recomputed']} of {r['examples_probed']} probed examples "
            f"recomputed (mean drift {r['mean_drift'] or 0.0:.4f} nats/token){mixed}"
        )
    return 0


def _task(args: argparse.Namespace) -> int:
    """Verbs whose recipes are their own kind: load, run, print where the results are."""
    import importlib
    import json

    from .errors import PotstillError

    _, loader, runner = TASKS[args.verb]
    path = Path(args.recipe)
    if not path.is_file():
        raise PotstillError(f"recipe file '{path}' does not exist; pass the path of a YAML recipe")
    if loader is None:
        recipe = _load_recipe(path, list(args.overrides), verb=args.verb)
    else:
        module, name = loader.split(":")
        recipe = getattr(importlib.import_module(module), name)(path, list(args.overrides))
    module, name = runner.split(":")
    mod = importlib.import_module(module)
    result = getattr(mod, name)(recipe)
    out = getattr(recipe, "output_dir", None)
    line = getattr(mod, "summary_line", None)
    brief = {k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str))}
    if line is not None:
        print(line(result))
    elif brief:
        print(json.dumps(brief, default=str)[:2000])
    print(f"{args.verb}: results in {out}")
    return 0


def _summary(metrics: dict[str, dict]) -> None:
    keys = ("forward_kl", "top1_agreement", "perplexity", "rouge_l")
    print(f"{'run':<24}" + "".join(f"{k:>16}" for k in keys))
    for name, m in metrics.items():
        print(f"{name:<24}" + "".join(f"{m.get(k, float('nan')):>16.4f}" for k in keys))


def _load_recipe(path, overrides, verb: str):
    """:func:`potstill.recipes.load_recipe`, its deprecation warnings (recipe keys of an older format) printed one
    line each, and only once the recipe loads: a bad recipe gets its one error line alone."""
    import warnings

    from .recipes import load_recipe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = load_recipe(path, overrides, verb=verb)
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, FutureWarning)):
        print(f"warning: {message}", file=sys.stderr)
    for w in caught:
        if not issubclass(w.category, FutureWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .errors import PotstillError

    try:
        code = _run(args)
        from .distributed import end_distributed

        end_distributed()  # under accelerate launch: a clean exit, not an abort at interpreter shutdown
        return code
    except PotstillError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume (finished runs are kept)", file=sys.stderr)
        return 130
    except OSError as err:  # the file system said no: a path, a permission, a full disk
        if args.debug:
            raise
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(
            f"error: {err.strerror or type(err).__name__}{where}; check the path, its permissions and the free "
            "space (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 2
    except Exception as err:  # a bug, or bad input no check caught yet: still one line, no traceback
        if args.debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(
            f"error: unexpected {type(err).__name__}: {first}; rerun with --debug for the traceback, and report "
            "it if the input looks right",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
