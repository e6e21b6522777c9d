"""``potstill compare RECIPE.yaml``: the recipe's runs trained once per seed (``compare.seeds``), scored per
held-out example against the teacher, and each run set against the baseline run with an interval, a
Holm-corrected p-value and a verdict (:mod:`potstill.eval.verdict`).

Layout: ``<output_dir>/seed_<s>/`` is a whole distill output (students, metrics.json, report.md) for training seed
``s``; ``seed_<s>/per_example.json`` holds every run's per-example scores and training cost. A killed compare
resumes: distill reuses the finished students of a seed and a seed with its ``per_example.json`` is not scored
again. ``compare.json`` and ``compare.md`` hold the verdict table, the per-seed points and each run's cost (wall
seconds of training; tokens the student trained on, the teacher read and the student generated; their FLOPs by
Kaplan et al.'s estimate), measured on this machine. ``compare.match: flops`` gives each run the steps that
equalise that estimate (a cheaper run trains longer). With ``eval.harness``, each task score joins the table as
one number per seed (its spread is the seeds' alone).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from potstill.errors import PotstillError
from potstill.eval.verdict import compare_arms
from potstill.io import atomic_write_json, atomic_write_text
from potstill.recipes.distill import Recipe

log = logging.getLogger("potstill")

LOWER_BETTER = {"forward_kl": True, "top1_agreement": False, "nll": True}
PER_EXAMPLE_FILE = "per_example.json"


def check_compare(recipe: Recipe) -> None:
    """What compare cannot judge, refused in one line before anything trains."""
    if len(recipe.runs) < 2:
        raise PotstillError("compare needs at least two runs (a baseline and an arm); add a run to `runs`")
    if recipe.teacher.kind != "model" or recipe.teacher.model is None:
        raise PotstillError(
            "compare scores every student against the teacher model per example; name a teacher model "
            "(a self or black-box teacher has none)"
        )
    cross = [r.name for r in recipe.runs if r.cross_tokenizer is not None]
    if cross:
        raise PotstillError(f"runs {cross} use another tokenizer than the teacher; compare scores shared tokens only")
    if recipe.compare.match == "flops":
        odd = [r.name for r in recipe.runs if r.on_policy is not None or r.multi_teacher is not None]
        if odd:
            raise PotstillError(
                f"runs {odd} generate or read several teachers, whose compute is known only after training; "
                "compare them at compare.match: steps (the cost table shows what each spent)"
            )
        own = [r.name for r in recipe.runs if r.max_steps is not None]
        if own:
            raise PotstillError(f"runs {own} set their own max_steps; compare.match: flops sets them, remove them")


def compute_params(model) -> int:
    """Non-embedding parameters N, the unit of Kaplan et al. (2020)'s estimate: a token read costs about 2N
    FLOPs forward and 6N when the model also trains on it."""
    return int(model.num_parameters(exclude_embeddings=True))


def matched_steps(recipe: Recipe, n_student: int, n_teacher: int) -> dict[str, int]:
    """``match: flops``: every run's optimizer steps such that its estimated compute per token read (6 N_student,
    plus 2 N_teacher when it reads the live teacher) times its steps equals the costliest run's at
    ``train.max_steps``. Every run reads the same tokens per step (same batches), so the ratio is per token."""
    per_token = {
        r.name: 6 * n_student + (2 * n_teacher if r.uses_teacher and recipe.cache is None else 0) for r in recipe.runs
    }
    top = max(per_token.values())
    return {name: max(1, round(recipe.train.max_steps * top / c)) for name, c in per_token.items()}


def _cost(run_dir: Path, n_student: int, n_teacher: int) -> dict:
    info = json.loads((run_dir / "train_info.json").read_text(encoding="utf-8"))
    generated = (info.get("on_policy") or {}).get("gen_tokens", 0)
    student, teacher = info.get("student_tokens"), info.get("teacher_tokens", 0)
    return {
        "train_seconds": info.get("train_seconds"),
        "loss_tokens": info.get("loss_tokens"),
        "student_tokens": student,
        "teacher_tokens": teacher,
        "generated_tokens": generated,
        # Kaplan et al.'s estimate: 6N per training token, 2N per teacher token read and per token generated
        "flops": None
        if student is None
        else 6 * n_student * student + 2 * n_teacher * teacher + 2 * n_student * generated,
    }


COST_KEYS = ("train_seconds", "loss_tokens", "student_tokens", "teacher_tokens", "generated_tokens", "flops")


class _Scorer:
    """The teacher, tokenizer and held-out examples, loaded once for every seed (they do not depend on
    ``train.seed``), and only when something is left to score or match."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._prep = None

    @property
    def prep(self):
        if self._prep is None:
            from potstill.runners.prepare import Prepared

            self._prep = Prepared(self.recipe)
        return self._prep

    def sizes(self) -> tuple[int, int]:
        return compute_params(self.prep.student0), compute_params(self.prep.teacher)


def _seed(recipe: Recipe, seed: int, scorer: _Scorer, progress: bool) -> dict:
    """One seed: its distill output (resumed) and its per-example scores and costs (cached)."""
    from potstill.eval import per_example_scores
    from potstill.finished import load_finished
    from potstill.runners.distill import distill

    seed_dir = Path(recipe.output_dir) / f"seed_{seed}"
    path = seed_dir / PER_EXAMPLE_FILE
    runs = {run.name: run.model_dump(mode="json") for run in recipe.runs}
    if path.is_file():
        done = json.loads(path.read_text(encoding="utf-8"))
        if done.get("runs") == runs:
            log.info("compare: seed %d already scored; reusing %s", seed, path)
            return done
        log.info("compare: seed %d was scored for other runs (or steps); scoring it again", seed)
    r = recipe.model_copy(update={"output_dir": str(seed_dir), "train": recipe.train.model_copy(update={"seed": seed})})
    metrics = distill(r, progress=progress)  # its metrics.json and report.md stay in seed_dir
    prep = scorer.prep
    names = [run.name for run in r.runs]
    students = {n: load_finished(seed_dir / "runs" / n, prep.device, verified=False)[0] for n in names}
    scores = per_example_scores(
        students,
        prep.teacher,
        prep.tokenizer,
        prep.eval_examples,
        vocab_size=prep.vocab_size,
        batch_size=r.eval.batch_size,
    )
    n_teacher = compute_params(prep.teacher)
    result = {
        "seed": seed,
        "runs": runs,  # what was scored: a seed is reused only for the same runs
        "scores": scores,
        "costs": {n: _cost(seed_dir / "runs" / n, compute_params(students[n]), n_teacher) for n in names},
        # eval.harness scores: one number per run and seed (lm-eval's own aggregate), higher is better
        "harness": {n: {k: v for k, v in metrics.get(n, {}).items() if k.startswith("harness/")} for n in names},
    }
    atomic_write_json(path, result)
    return result


def compare(recipe: Recipe, *, progress: bool = True) -> dict:
    """Train and score every seed, then the verdict table; returns what ``compare.json`` holds."""
    check_compare(recipe)
    cfg = recipe.compare
    names = [r.name for r in recipe.runs]
    baseline = cfg.baseline or names[0]
    scorer = _Scorer(recipe)
    steps = {n: recipe.train.max_steps for n in names}
    if cfg.match == "flops":
        steps = matched_steps(recipe, *scorer.sizes())
        # the costliest runs keep train.max_steps unset, so their students trained at equal steps are reused
        runs = [
            r.model_copy(update={"max_steps": steps[r.name]}) if steps[r.name] != recipe.train.max_steps else r
            for r in recipe.runs
        ]
        recipe = recipe.model_copy(update={"runs": runs})
        log.info("compare: compute-matched steps %s", steps)
    seeds = [_seed(recipe, s, scorer, progress) for s in cfg.seeds]
    scores = {
        metric: {n: np.array([s["scores"][n][metric] for s in seeds], dtype=np.float64) for n in names}
        for metric in cfg.metrics
    }
    lower = {m: LOWER_BETTER[m] for m in cfg.metrics}
    # task scores (eval.harness) are one aggregate per seed: [S, 1], so only the seeds carry their spread
    for key in sorted({k for s in seeds for k in s.get("harness", {}).get(baseline, {})}):
        if all(key in s["harness"][n] for s in seeds for n in names):
            scores[key] = {n: np.array([[s["harness"][n][key]] for s in seeds], dtype=np.float64) for n in names}
            lower[key] = False
    rows = compare_arms(scores, baseline, lower_better=lower, level=cfg.level, n_boot=cfg.n_boot, df=cfg.df)
    costs = {n: {k: [s["costs"][n].get(k) for s in seeds] for k in COST_KEYS} for n in names}
    result = {
        "baseline": baseline,
        "seeds": list(cfg.seeds),
        "level": cfg.level,
        "df": cfg.df,
        "match": cfg.match,
        "steps": steps,
        "examples": int(scores[cfg.metrics[0]][baseline].shape[1]),
        "comparisons": [c.as_dict() for c in rows],
        "means": {m: {n: scores[m][n].mean(axis=1).tolist() for n in names} for m in scores},
        "costs": costs,
        "note": "one seed gives no verdict" if len(cfg.seeds) < 2 else None,
    }
    out = Path(recipe.output_dir)
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", _markdown(result))
    return result


def _markdown(r: dict) -> str:
    pct = f"{r['level']:.0%}"
    lines = [
        "# potstill compare",
        "",
        f"Every run against **{r['baseline']}**, trained with seeds {r['seeds']} and scored on the same "
        f"{r['examples']} held-out examples. Difference = run - baseline (mean over seeds and examples), its {pct} "
        "interval from a bootstrap over seeds x examples (that row alone) with Student's t at "
        + (
            "the crossed design's degrees of freedom (Satterthwaite; column df)"
            if r.get("df", "seeds") == "satterthwaite"
            else "seeds - 1 degrees of freedom"
        )
        + ", p-values Holm-corrected across every "
        "row (potstill.eval.verdict). The verdict reads the Holm p-value, so a row whose own interval leaves out 0 "
        "can still be *no difference* once every row is accounted for.",
        "",
        f"| metric | run | difference | {pct} interval | df | p (Holm) | verdict | per seed |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for c in r["comparisons"]:
        per = ", ".join(f"{v:+.4g}" for v in c["per_seed"])
        dof = "-" if c.get("df") is None else f"{c['df']:.3g}"
        lines.append(
            f"| {c['metric']} | {c['arm']} | {c['difference']:+.4g} | [{c['low']:+.4g}, {c['high']:+.4g}] | "
            f"{dof} | {c['p_holm']:.3g} | {c['verdict']} | {per} |"
        )
    matched = "compute-matched (`match: flops`)" if r.get("match") == "flops" else "equal steps"
    lines += [
        "",
        f"## Cost per seed (this machine, {matched})",
        "",
        "Tokens are those this process read (padding excluded); FLOPs = 6 N_student x student tokens + 2 N_teacher "
        "x teacher tokens + 2 N_student x generated tokens (N: non-embedding parameters, Kaplan et al. 2020).",
        "",
        "| run | steps | train seconds | student tokens | teacher tokens | generated tokens | FLOPs |",
        "|---|---:|---|---|---|---|---|",
    ]

    def cells(values, fmt) -> str:
        return ", ".join("-" if v is None else fmt(v) for v in values)

    for name, c in r["costs"].items():
        lines.append(
            f"| {name} | {r.get('steps', {}).get(name, '-')} | {cells(c['train_seconds'], lambda v: f'{v:.0f}')} | "
            f"{cells(c.get('student_tokens', []), str)} | {cells(c.get('teacher_tokens', []), str)} | "
            f"{cells(c['generated_tokens'], str)} | {cells(c.get('flops', []), lambda v: f'{v:.3g}')} |"
        )
    return "\n".join(lines) + "\n"


def summary_lines(result: dict) -> list[str]:
    """One line per comparison, for the terminal."""
    return [
        f"{c['metric']:<15} {c['arm']:<20} {c['difference']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] {c['verdict']}"
        for c in result["comparisons"]
    ]
