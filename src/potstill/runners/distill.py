"""``potstill distill`` and ``potstill eval``: recipe -> models + data -> teacher signal -> students ->
evaluation -> report. Each trained student is written atomically; rerunning the same recipe skips the runs
that finished (resume).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from potstill.distributed import (
    barrier,
    end_distributed,
    is_main_process,
    is_sharded,
    process_rank,
    shard_frozen,
    shard_frozen_zero3,
    world_size,
)
from potstill.errors import PotstillError
from potstill.finished import (
    DONE,
    check_output_dir,
    load_finished,
    owned_output_dir,
    run_fingerprint,
)
from potstill.hub import check_push, push_students
from potstill.io import atomic_write_text, remove_stale_temporaries
from potstill.recipes.distill import Recipe, dump_recipe
from potstill.runners.checks import check_distributed, check_watch, preflight, start_processes
from potstill.runners.prepare import Prepared, load_teacher, resolve_device
from potstill.runners.train import train_run

log = logging.getLogger("potstill")


def evaluate_and_report(
    prep: Prepared,
    students: dict[str, Any],
    curves: dict[str, list],
    out: Path,
    notes: list[str],
    progress: bool = True,
    bayes: dict[str, dict] | None = None,
) -> dict[str, dict]:
    from potstill.eval import collect_samples, evaluate_runs, metrics_only, write_report

    r = prep.recipe
    teacher = None if getattr(prep, "cross", False) else prep.teacher  # other tokens: no token-level comparison
    results = evaluate_runs(
        students,
        teacher,
        prep.tokenizer,
        prep.eval_examples,
        vocab_size=prep.vocab_size,
        batch_size=r.eval.batch_size,
        max_new_tokens=r.eval.max_new_tokens,
        progress=progress,
    )
    answers = [ex.get("answer") for ex in prep.eval_examples]
    if all(a is not None for a in answers):
        from potstill.data.rationale import exact_match

        if not any("choices" in ex for ex in prep.eval_examples):
            for run in results.values():
                run["exact_match"] = exact_match(run["generations"], answers)
    if all("choices" in ex for ex in prep.eval_examples) and prep.eval_examples:
        _score_choices(results, {"teacher": teacher, **students}, prep)
    notes = [*notes, *_diversity(results, r.eval)]
    if r.eval.harness is not None:
        _harness(results, {"teacher": teacher, **students}, prep, out)
    for name, summary in (bayes or {}).items():
        from potstill.runners.bayesian_lm import bayesian_note, bayesian_row

        results[name].update(bayesian_row(summary))
        notes = [*notes, bayesian_note(name, summary)]
    metrics = metrics_only(results)
    samples = collect_samples(results, prep.eval_examples, k=4, tokenizer=prep.tokenizer)
    write_report(out, metrics, loss_curves=curves, title="potstill distillation report", notes=notes, samples=samples)
    return metrics


def _diversity(results: dict[str, dict], ev) -> list[str]:
    """Each model's embedding spread (when asked and the encoder is there) and the collapse flags -> report notes."""
    from potstill.eval.diversity import collapsed, embedding_spread
    from potstill.eval.report import GENERATIONS_KEY

    if ev.embedding_diversity:
        for run in results.values():
            try:
                run["embedding_spread"] = embedding_spread(run.get(GENERATIONS_KEY) or [])
            except PotstillError as err:  # the encoder is an optional install: say so once, report nan
                log.warning("embedding spread not reported: %s", err)
                for other in results.values():
                    other["embedding_spread"] = float("nan")
                break
    flagged = collapsed(results, ev.collapse_fraction)
    for name, run in results.items():
        if name != "teacher":
            run["collapsed"] = int(name in flagged)  # 1: flagged (metrics are numbers)
    if not flagged:
        return []
    return [
        f"diversity collapse: {', '.join(flagged)} (distinct-2 or embedding spread below "
        f"{ev.collapse_fraction:g} x the teacher's)"
    ]


def _harness(results: dict[str, dict], models: dict[str, Any], prep: Prepared, out: Path) -> None:
    """``eval.harness``: lm-eval scores of every model, as ``harness/<task>/<metric>`` entries of its row."""
    from potstill.eval.harness import SHIPPED_TASKS, harness_scores
    from potstill.paths import data_root

    h = prep.recipe.eval.harness
    root = data_root() if any(t in SHIPPED_TASKS for t in h.tasks) else Path()
    scored = {n: (m, prep.tokenizer) for n, m in models.items() if m is not None and n in results}
    scores = harness_scores(
        scored,
        h.tasks,
        limit=h.limit,
        work_dir=out / "harness_tasks",
        data_root=root,
        batch_size=h.batch_size,
        num_fewshot=h.num_fewshot,
        max_gen_toks=h.max_gen_toks,
        seed=prep.recipe.train.seed,
    )
    for name, flat in scores.items():
        results[name].update({f"harness/{k}": v for k, v in flat.items()})


def _score_choices(results: dict[str, dict], models: dict[str, Any], prep: Prepared) -> None:
    """Decision accuracy, macro-F1 and ECE of each model on held-out examples that name their ``choices`` and
    ``answer`` (e.g. PubMedQA's yes / no / maybe): the likeliest choice after the prompt (lm-eval's ``acc``)."""
    from potstill.data import pad_id
    from potstill.eval.choice import choice_metrics, choice_scores

    examples = prep.eval_examples
    names = list(examples[0]["choices"])
    if any(list(ex["choices"]) != names for ex in examples):
        raise PotstillError("held-out examples name different choices; give every example the same choice list")
    tokens = [prep.tokenizer(c, add_special_tokens=False)["input_ids"] for c in names]
    gold = [names.index(ex["answer"]) for ex in examples]
    prompts = [ex["prompt_ids"] for ex in examples]
    for name, run in results.items():
        model = models.get(name)
        if model is None:
            continue
        scores = choice_scores(
            model, prompts, tokens, pad_id=pad_id(prep.tokenizer), batch_size=prep.recipe.eval.batch_size
        )
        m = choice_metrics(scores, gold)
        run.update({"decision_accuracy": m["accuracy"], "decision_macro_f1": m["macro_f1"], "decision_ece": m["ece"]})


def distill(recipe: Recipe, *, progress: bool = True) -> dict[str, dict]:
    """Run a recipe end to end; returns the metrics of every run (``{}`` on every process but the first)."""
    t_start = time.perf_counter()
    out = Path(recipe.output_dir)
    check_distributed(recipe, resolve_device(recipe.device))
    check_watch(recipe)
    check_output_dir(out)
    if is_main_process():  # a push that cannot happen is refused before anything is trained
        check_push(recipe.push_to_hub, [r.name for r in recipe.runs])
    start_processes(resolve_device(recipe.device))
    prep = Prepared(recipe)
    source = prep.cached_source() if any(r.uses_teacher for r in recipe.runs) else None
    prep.extra_teachers()  # load and check them before anything is written
    preflight(prep)
    shard = {"fsdp2": shard_frozen, "zero3": shard_frozen_zero3}.get(recipe.train.distributed)
    if shard is not None:  # the live teachers: the main one, and extra ones that share the student's tokenizer
        frozen = [prep.teacher] if prep.teacher is not None and source is None else []
        frozen += [t.model for t in prep.extra_teachers() if t.tokenizer is None]
        for model in frozen:
            shard(model)
    barrier()  # every process checked the input before the first one writes
    if not is_main_process():  # the first process owns the output directory
        return _distill_runs(prep, source, out, t_start, progress)
    # Input is valid: from here on we write (and a failure before the first student finishes removes it all).
    with owned_output_dir(out):
        metrics = _distill_runs(prep, source, out, t_start, progress)
    if recipe.push_to_hub is not None:
        for name, url in push_students(recipe.push_to_hub, out / "runs", [r.name for r in recipe.runs]).items():
            log.info("run %s pushed to %s", name, url)
    return metrics


def _distill_runs(prep: Prepared, source, out: Path, t_start: float, progress: bool) -> dict[str, dict]:
    recipe = prep.recipe
    main = is_main_process()
    if main:
        for d in (out, out / "runs"):  # what a killed earlier run left half-written
            remove_stale_temporaries(d)
        atomic_write_text(out / "recipe.resolved.yaml", dump_recipe(recipe))
    students: dict[str, Any] = {}
    curves: dict[str, list] = {}
    # Every run sees the same batches in the same order: the teacher's forward is paid once.
    from potstill.signals import TeacherMemo

    memo = TeacherMemo()
    bayes: dict[str, dict] = {}
    for run in recipe.runs:
        run_dir = out / "runs" / run.name
        if main:
            done = load_finished(run_dir, prep.device, verified=True)  # preflight verified every finished student
        else:
            done = (run_dir / DONE).is_file() or None
        if done is not None:
            log.info("run %s already finished; reusing %s", run.name, run_dir)
            if main:
                students[run.name], curves[run.name] = done
                _bayesian(prep, run, students[run.name], run_dir, bayes)
            continue
        student = copy.deepcopy(prep.student0)
        student.train()
        model, curve = train_run(
            recipe,
            run,
            student,
            prep.teacher,
            prep.tokenizer,
            prep.train_examples,
            run_dir,
            prep.device,
            prep.vocab_size,
            memo=memo,
            source=source,
            extra_teachers=prep.extra_teachers(),
            cross=prep.cross_context(),
            eval_examples=prep.eval_examples,
        )
        students[run.name], curves[run.name] = model, curve
        if main:
            _bayesian(prep, run, model, run_dir, bayes)
        barrier()  # the student is on disk before any process goes on
    if world_size() > 1:
        end_distributed()  # evaluation is the first process's alone, with whole (unsharded) models
        if recipe.train.distributed == "zero3":  # else from_pretrained would load into ZeRO-3 partitions
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        if not main:
            return {}
        if prep.teacher is not None and is_sharded(prep.teacher):
            prep.teacher = load_teacher(recipe.teacher, prep.device)[0]
    if recipe.eval.include_untrained:
        students = {"student_init": prep.student0, **students}
    notes = [
        f"teacher: {recipe.teacher.label}; student: {recipe.student.kind}; {len(prep.train_examples)} train / "
        f"{len(prep.eval_examples)} held-out examples; {recipe.train.max_steps} optimizer steps per run, batch "
        f"{recipe.train.batch_size} x {recipe.train.gradient_accumulation_steps}"
        + "".join(f"; {r.name} {r.max_steps} steps" for r in recipe.runs if r.max_steps),
        f"wall time before evaluation {time.perf_counter() - t_start:.0f} s on {prep.device}",
    ]
    if source is not None:
        m = source.manifest
        notes.append(
            f"teacher signal from the cache at {recipe.cache_dir}: {source.kind} "
            f"({m['spec']['dtype']}), {m['bytes_per_token']:.1f} bytes/token"
            + (f"; rows of {len({fp for *_, fp in m['sources']})} teachers (refreshed)" if m.get("sources") else "")
        )
        if m.get("certificate"):
            from potstill.runners.cache import certificate_lines

            notes += certificate_lines(m["certificate"])
    return evaluate_and_report(prep, students, curves, out, notes, progress, bayes)


def _bayesian(prep: Prepared, run, model, run_dir: Path, bayes: dict[str, dict]) -> None:
    """``method.bayesian``: the run's posterior samples and their calibration (kept in ``bayes[run.name]``)."""
    if run.bayesian is None:
        return
    from potstill.runners.bayesian_lm import bayesian_lm_run

    bayes[run.name] = bayesian_lm_run(
        prep.recipe,
        run,
        model,
        prep.teacher,
        prep.tokenizer,
        prep.train_examples,
        prep.eval_examples,
        prep.vocab_size,
        run_dir,
    )


def evaluate_only(recipe: Recipe, extra: list[str] | None = None, *, progress: bool = True) -> dict[str, dict]:
    """``potstill eval``: evaluate the finished runs of a recipe (and extra student dirs) on its held-out set."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    out = Path(recipe.output_dir)
    if world_size() > 1:
        raise PotstillError(
            f"potstill eval runs in one process, but this is process {process_rank()} of "
            f"{world_size()} (accelerate launch / torchrun); run it without the launcher"
        )
    check_output_dir(out)
    taken = {"teacher", "student_init", *(r.name for r in recipe.runs)}
    for d in extra or []:
        p = Path(d)
        if not (p / "config.json").is_file():
            raise PotstillError(f"student directory '{p}' has no config.json; pass a save_pretrained directory")
        if p.name in taken:
            raise PotstillError(
                f"--student '{p}' would be reported as '{p.name}', which is already a row of this "
                "recipe's report; copy or rename the directory to a name of its own"
            )
        taken.add(p.name)
    prep = Prepared(recipe)
    students: dict[str, Any] = {}
    curves: dict[str, list] = {}
    if recipe.eval.include_untrained:
        students["student_init"] = prep.student0
    for run in recipe.runs:
        done = load_finished(out / "runs" / run.name, prep.device, run_fingerprint(recipe, run))
        if done is not None:
            students[run.name], curves[run.name] = done
    for d in extra or []:
        p = Path(d)
        try:
            students[p.name] = AutoModelForCausalLM.from_pretrained(p).to(prep.device)
        except (OSError, ValueError, SafetensorError) as err:
            raise PotstillError(
                f"student directory '{p}' does not load ({str(err).splitlines()[0][:200]}); pass a "
                "complete save_pretrained directory"
            ) from None
    if not set(students) - {"student_init"}:
        raise PotstillError(f"no finished runs in '{out}/runs' and no --student given; run `potstill distill` first")
    with owned_output_dir(out):
        return evaluate_and_report(prep, students, curves, out, [f"evaluation only of {sorted(students)}"], progress)
