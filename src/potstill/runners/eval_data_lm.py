"""``potstill eval-data`` for causal-LM training sets: a selection vs random and coreset subsets under KD.

The evaluation protocol of :mod:`potstill.runners.eval_data`, for instruction data and LLM students (a
recipe with ``kind: causal_lm``). Every set (``format: selection``, a ``selection.json`` from
``potstill select`` over this recipe's pool; or ``format: jsonl``, new prompt/response rows such as
``potstill synthesize``'s ``synthetic.jsonl``, trained from the live teacher since no cache covers
them) is compared, at the *same number of examples*, with baseline subsets of the same pool
(``random``, one draw per seed, and the coresets ``k_center``, ``kmeans_medoids``, ``herding`` over
``embeddings``), each drawn by :func:`potstill.runners.select.run_select` so the baselines are what the
``select`` verb would give. Every arm is trained by every run of ``runs`` (default: ``hard``, SFT on
the references, and ``soft``, KD with forward KL at T = 1 from the teacher or its cache) from the same
initial student with the same optimizer, batch, learning rate and seeds, for ``ceil(epochs * n /
(batch * accumulation))`` steps: equal epochs, so arms of one size take equal steps. With ``full``,
the 100% student (the whole pool, the same epochs) is the reference every ratio is taken against.

Reported per set, arm and run, over ``seeds`` learners: held-out forward KL to the teacher (per
response token, T = 1; lower is better), top-1 agreement, perplexity of the references, mean +- std;
the gain over random (``gain_vs_random_pct``: how much lower the forward KL is, in % of random's);
the ratio to the 100% student; the examples' response tokens; the construction seconds (the
recipe's ``construction_seconds``, else ``selection_report.json`` or ``synthesis_report.json``
beside the set; null if unknown).

Verdicts (``verdicts`` in each set's entry; :func:`potstill.runners.eval_data_sets.judge_sets`): the set
against every baseline, and every baseline against ``random`` once per set size (the report's
``verdicts.baselines``), per run and per held-out example (forward KL, top-1 agreement), with ``potstill
compare``'s statistics. Every arm of a set trains the same steps on the same number of examples: equal
training cost. Like ``compare``, a verdict weighs every held-out example alike, while the forward KL above
is the mean over all response tokens, so a small difference can read with another sign in the two.

Long runs resume: each finished arm's metrics are written atomically to ``arms.json`` under the
recipe's fingerprint (and every set's content hash); a rerun of the same recipe trains only what is
missing, a changed recipe starts over. Students are trained in a scratch folder and removed once
evaluated (``keep_students: true`` keeps them, as safetensors).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potstill.errors import PotstillError
from potstill.io import atomic_write_json
from potstill.paths import resolve_data_path
from potstill.recipes.eval_data import EvalDataLMRecipe, LMSet
from potstill.runners.common import finite
from potstill.runners.compare import LOWER_BETTER
from potstill.runners.eval_data_sets import construction, judge_sets

if TYPE_CHECKING:
    from potstill.recipes.distill import Recipe
    from potstill.runners.prepare import Prepared

__all__ = ["run_eval_data_lm", "summary_line"]

ARMS_FILE = "arms.json"
REPORT_FILE = "eval_data.json"
METRICS = ("forward_kl", "top1_agreement", "perplexity")
# per held-out example, and whether lower is better (as potstill compare reads them)
VERDICT_METRICS = {m: LOWER_BETTER[m] for m in ("forward_kl", "top1_agreement")}


def _set_path(s: LMSet) -> Path:
    from potstill.dd.selection_io import SELECTION

    p = Path(resolve_data_path(s.path))  # $POTSTILL_DATA/..., else as given (like output_dir)
    if s.format == "selection" and p.is_dir():
        p = p / SELECTION
    if not p.is_file():
        what = "a selection.json of `potstill select`" if s.format == "selection" else "a jsonl file"
        raise PotstillError(f"set '{s.name}': '{p}' does not exist or is not a file; point its path at {what}")
    return p


def _jsonl_examples(s: LMSet, path: Path, recipe: EvalDataLMRecipe, tokenizer) -> list[dict]:
    """A jsonl set's rows as encoded examples (the recipe's chat template, system prompt, max_length)."""
    from potstill.data import load_records, records_to_pairs
    from potstill.runners.prepare import encode_pairs

    rows = load_records(str(path))
    if not rows:
        raise PotstillError(f"set '{s.name}': '{path}' holds no rows; point it at a non-empty set")
    pairs = records_to_pairs(
        rows,
        prompt_field=s.prompt_field,
        response_field=s.response_field,
        system_prompt=recipe.data.system_prompt,
        where=f"set '{s.name}' ({path})",
    )
    return encode_pairs(pairs, tokenizer, recipe.data.max_length)


def _tokens(examples: list[dict]) -> int:
    return sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)


def _fingerprint(recipe: EvalDataLMRecipe, contents: list[str]) -> str:
    """The recipe (less what cannot change a result) and the contents: the sets' bytes, the pool's
    and held-out examples' tokens and the teacher's weights, so a retrained teacher or an edited
    data file in place is not mixed with old results."""
    body = recipe.model_dump(mode="json")
    for k in ("output_dir", "keep_students", "eval_batch_size", "device"):
        body.pop(k, None)
    body["contents"] = contents
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _stats(values: list[float | None]) -> dict:
    """Mean and std over the finite values (a diverged learner's NaN, stored as null, is counted
    in ``non_finite`` and left out); all non-finite: mean and std are NaN."""
    ok = [float(v) for v in values if v is not None and math.isfinite(v)]
    mean = statistics.fmean(ok) if ok else math.nan
    std = statistics.stdev(ok) if len(ok) > 1 else (0.0 if ok else math.nan)
    return {"mean": mean, "std": std, "n": len(ok), "non_finite": len(values) - len(ok), "values": values}


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _load_sets(recipe: EvalDataLMRecipe, paths: list[Path], prep: Prepared) -> list[tuple]:
    """``(set, path, examples, construction seconds, their source, content hash)`` per set: every set
    read and checked before anything trains, so bad input fails fast."""
    from potstill.dd.selection_io import load_selection

    pool = prep.pool_examples
    loaded = []
    for s, path in zip(recipe.sets, paths):
        try:
            examples = (
                load_selection(path, pool)
                if s.format == "selection"
                else _jsonl_examples(s, path, recipe, prep.tokenizer)
            )
        except PotstillError as err:
            msg = str(err)
            raise PotstillError(msg if msg.startswith(f"set '{s.name}'") else f"set '{s.name}': {msg}") from None
        if len(examples) >= len(pool):
            raise PotstillError(
                f"set '{s.name}' has {len(examples)} examples, the pool {len(pool)}: no real subset "
                "of its size to compare it with; raise the pool or judge a smaller set"
            )
        loaded.append((s, path, examples, *construction(s, path), hashlib.sha256(path.read_bytes()).hexdigest()[:16]))
    return loaded


def _resumed(arms_path: Path, fp: str) -> dict[str, dict]:
    """The finished arms of an earlier run of the same recipe (fingerprint ``fp``), else none."""
    if arms_path.is_file():
        try:
            prev = json.loads(arms_path.read_text(encoding="utf-8"))
            if prev.get("fingerprint") == fp:
                return prev["arms"]
        except (ValueError, KeyError, TypeError):
            pass  # a torn or foreign file: start over (it is rewritten atomically)
    return {}


@dataclass
class _Arms:
    """Trains and evaluates arms under one protocol and keeps their metrics in ``arms.json`` (resume)."""

    recipe: EvalDataLMRecipe
    distill: Recipe  # the protocol's distill recipe: runs, student, train section
    prep: Prepared  # tokenizer, teacher, initial student, pool, held-out examples
    source: Any  # the teacher's cached signals (``Prepared.cached_source``), None when no run uses the teacher
    out: Path
    fp: str
    done: dict[str, dict]

    @property
    def arms_path(self) -> Path:
        return self.out / ARMS_FILE

    @property
    def scratch(self) -> Path:
        return self.out / "students"

    @property
    def bsz(self) -> int:
        return self.recipe.train.batch_size * self.recipe.train.gradient_accumulation_steps

    def save(self) -> None:
        atomic_write_json(self.arms_path, finite({"fingerprint": self.fp, "arms": self.done}))

    def evaluate(self, models: dict) -> dict:
        """Held-out metrics of ``models`` (and of the teacher): one teacher pass serves them all."""
        from potstill.eval import evaluate_runs, metrics_only

        prep = self.prep
        return metrics_only(
            evaluate_runs(
                models,
                prep.teacher,
                prep.tokenizer,
                prep.eval_examples,
                vocab_size=prep.vocab_size,
                batch_size=self.recipe.eval_batch_size,
                max_new_tokens=0,
                progress=False,
            )
        )

    def per_example(self, models: dict) -> dict[str, dict[str, list[float]]]:
        """Each held-out example's forward KL and top-1 agreement (means over its response tokens) for the
        verdicts; a second teacher pass over the held-out examples, which are few next to training."""
        from potstill.eval import per_example_scores

        prep = self.prep
        scores = per_example_scores(
            models,
            prep.teacher,
            prep.tokenizer,
            prep.eval_examples,
            vocab_size=prep.vocab_size,
            batch_size=self.recipe.eval_batch_size,
        )
        return {n: {k: scores[n][k] for k in VERDICT_METRICS} for n in models}

    def learn(self, key: str, examples: list[dict], seed: int) -> dict:
        """Every run trained on ``examples`` from the initial student; metrics per run (resumed if done)."""
        from potstill.runners.train import train_run

        if key in self.done and (key == "full" or all("per_example" in v for v in self.done[key]["runs"].values())):
            return self.done[key]  # (an arm finished before verdicts existed is trained again for its scores;
            # the 100% student needs none: no verdict reads it)
        recipe, distill, prep = self.recipe, self.distill, self.prep
        steps = max(1, math.ceil(recipe.epochs * len(examples) / self.bsz - 1e-9))
        row: dict = {"examples": len(examples), "response_tokens": _tokens(examples), "steps": steps, "runs": {}}
        models, train_s = {}, {}
        for run in distill.runs:
            r = distill.model_copy(deep=True)
            r.train.max_steps, r.train.seed = steps, recipe.train.seed + seed
            t0 = time.perf_counter()
            models[run.name], _ = train_run(
                r,
                run,
                copy.deepcopy(prep.student0).train(),
                prep.teacher,
                prep.tokenizer,
                examples,
                self.scratch / key / run.name,
                prep.device,
                prep.vocab_size,
                source=self.source if run.uses_teacher else None,
            )
            train_s[run.name] = time.perf_counter() - t0
        # the arm's students together: one teacher pass over the held-out examples serves them all
        m = self.evaluate({n: x.eval() for n, x in models.items()})
        # per-example scores for the verdicts; the 100% student is a reference no verdict reads
        per = {} if key == "full" else {n: {"per_example": v} for n, v in self.per_example(models).items()}
        row["runs"] = {n: {k: m[n][k] for k in METRICS} | {"train_s": train_s[n]} | per.get(n, {}) for n in models}
        del models
        if not recipe.keep_students:
            shutil.rmtree(self.scratch / key, ignore_errors=True)
        self.done[key] = row
        self.save()
        return row

    def baseline(self, kind: str, n: int, seed: int) -> tuple[list[dict], float]:
        """``(examples, seconds)`` of one baseline subset of ``n`` pool examples, drawn by run_select
        (seconds: its scoring and selection, model loading left out)."""
        from potstill.dd.selection_io import REPORT, SELECTION, load_selection
        from potstill.recipes.select import select_recipe_from_dict
        from potstill.runners.select import run_select

        recipe = self.recipe
        key = f"{kind}_n{n}_s{seed}"
        sel_dir = self.out / "baselines" / key
        scorer: dict = {"kind": kind} if kind == "random" else {"kind": kind, "embeddings": recipe.embeddings}
        sr = select_recipe_from_dict(
            {
                "output_dir": str(sel_dir),
                "teacher": recipe.teacher.model_dump(mode="json"),
                "student": self.distill.student.model_dump(mode="json"),
                "student_seed": recipe.train.seed,
                "data": recipe.data.model_dump(mode="json"),
                "device": recipe.device,
                "select": {"scorer": scorer, "budget": n, "seed": recipe.train.seed + seed},
            }
        )
        if key in self.done and (sel_dir / SELECTION).is_file() and (sel_dir / REPORT).is_file():
            timings = json.loads((sel_dir / REPORT).read_text(encoding="utf-8"))["timings_s"]
        else:  # drawn again after a changed recipe or an interruption before its learners finished
            timings = run_select(sr)["timings_s"]
        examples = load_selection(sel_dir / SELECTION, self.prep.pool_examples)
        return examples, float(timings["total_s"] - timings.get("load_s", 0.0))

    def student_init(self) -> dict:
        """The untrained student's and the teacher's held-out metrics (the reference arm ``student_init``)."""
        if "student_init" not in self.done:
            m = self.evaluate({"student": self.prep.student0})
            self.done["student_init"] = {
                "runs": {"untrained": {k: m["student"][k] for k in METRICS}},
                "teacher": {k: m["teacher"][k] for k in METRICS},
            }
            self.save()
        return self.done["student_init"]


def _aggregate(arm_rows: dict[str, list[dict]], arm_info: dict[str, dict], n: int, runs, full: dict | None) -> dict:
    """``{arm: {examples, response_tokens, steps, construction, runs: {run: metric stats, gain, ratio}}}``
    over the seeds' rows; the gain is taken against ``random``, the ratio against the 100% student."""
    arms: dict[str, dict] = {}
    for arm, rows in arm_rows.items():
        a = {
            "examples": n,
            "response_tokens": statistics.fmean(r["response_tokens"] for r in rows),
            "steps": rows[0]["steps"],
            **arm_info[arm],
            "runs": {},
        }
        for run in runs:
            per = {k: _stats([r["runs"][run.name][k] for r in rows]) for k in METRICS}
            per["train_s"] = statistics.fmean(r["runs"][run.name]["train_s"] for r in rows)
            a["runs"][run.name] = per
        arms[arm] = a
    for run in runs:
        rnd = arms["random"]["runs"][run.name]["forward_kl"]["mean"]
        for arm in arms.values():
            per = arm["runs"][run.name]
            fkl = per["forward_kl"]["mean"]
            ref = full["runs"][run.name]["forward_kl"] if full else None
            per["gain_vs_random_pct"] = 100.0 * (rnd - fkl) / rnd if math.isfinite(rnd) and rnd else None
            per["ratio_to_full"] = fkl / ref if ref is not None and math.isfinite(ref) and ref else None
    return arms


def _judge_set(arms: _Arms, loaded_set: tuple, draws: dict, full: dict | None) -> tuple[dict, dict]:
    """The report entry of one set (its seeds' students against the baselines' of its size) and every arm's
    per-example scores, ``{run: {metric: {arm: [seeds, examples]}}}``, for the verdicts."""
    recipe, pool = arms.recipe, arms.prep.pool_examples
    s, path, examples, cost, cost_src, _h = loaded_set
    n = len(examples)
    arm_rows: dict[str, list[dict]] = {
        "set": [arms.learn(f"set_{s.name}_s{i}", examples, i) for i in range(recipe.seeds)]
    }
    arm_info: dict[str, dict] = {"set": {"construction_seconds": cost, "construction_source": cost_src}}
    for b in recipe.baselines:
        rows, secs = [], []
        for i in range(recipe.seeds):
            sub, sec = draws[(b, n, i)]
            rows.append(arms.learn(f"{b}_n{n}_s{i}", sub, i))
            secs.append(sec)
        arm_rows[b] = rows
        arm_info[b] = {"construction_seconds": statistics.fmean(secs), "construction_source": "measured"}
    scores = {
        run.name: {
            m: {arm: [r["runs"][run.name]["per_example"][m] for r in rows] for arm, rows in arm_rows.items()}
            for m in VERDICT_METRICS
        }
        for run in arms.distill.runs
    }
    return {
        "name": s.name,
        "format": s.format,
        "path": str(path),
        "size": n,
        "fraction_of_pool": n / len(pool),
        "arms": _aggregate(arm_rows, arm_info, n, arms.distill.runs, full),
    }, scores


def run_eval_data_lm(recipe: EvalDataLMRecipe) -> dict:
    """Train and evaluate every arm (module docstring); returns the report written atomically to
    ``output_dir/eval_data.json``."""
    from potstill.fingerprints import pool_fingerprint, weights_fingerprint
    from potstill.runners.prepare import Prepared

    t_start = time.perf_counter()
    distill = recipe.distill_recipe()
    paths = [_set_path(s) for s in recipe.sets]  # before the models load: a wrong path fails at once
    prep = Prepared(distill)
    pool = prep.pool_examples
    if not prep.eval_examples:
        raise PotstillError("the held-out split is empty; raise data.eval_size")
    loaded = _load_sets(recipe, paths, prep)
    source = prep.cached_source() if any(r.uses_teacher for r in distill.runs) else None

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(
        recipe,
        [x[-1] for x in loaded]
        + [pool_fingerprint(pool), pool_fingerprint(prep.eval_examples), weights_fingerprint(prep.teacher)],
    )
    arms = _Arms(recipe, distill, prep, source, out, fp, _resumed(out / ARMS_FILE, fp))
    # every baseline is drawn before anything trains: a coreset that cannot run fails at once
    draws = {
        (b, len(x[2]), i): arms.baseline(b, len(x[2]), i)
        for x in loaded
        for b in recipe.baselines
        for i in range(recipe.seeds)
    }
    # references: the untrained student, and the 100% student
    init = arms.student_init()
    full = arms.learn("full", pool, 0) if recipe.full else None
    judged = [_judge_set(arms, x, draws, full) for x in loaded]
    # the set against every baseline, each baseline against random (module docstring)
    verdicts = judge_sets(
        judged, list(recipe.baselines), VERDICT_METRICS, facet="run", group=lambda entry: f"n{entry['size']}"
    )
    report_sets = [entry for entry, _ in judged]
    if not recipe.keep_students:
        shutil.rmtree(arms.scratch, ignore_errors=True)
    report = finite(
        {
            "kind": "causal_lm",
            "n_pool": len(pool),
            "n_eval": len(prep.eval_examples),
            "pool_response_tokens": _tokens(pool),
            "runs": [r.name for r in distill.runs],
            "baselines": list(recipe.baselines),
            "teacher": init["teacher"],
            "student_init": init["runs"]["untrained"],
            "full": full,
            "protocol": {
                "epochs": recipe.epochs,
                "batch_size": arms.bsz,
                "learning_rate": recipe.train.learning_rate,
                "seeds": [recipe.train.seed + i for i in range(recipe.seeds)],
                "cache": recipe.cache is not None,
                "embeddings": recipe.embeddings,
            },
            "sets": report_sets,
            "verdicts": verdicts,
            "fingerprint": fp,
            "total_s": time.perf_counter() - t_start,
            "path": str(out / REPORT_FILE),
            "recipe": recipe.model_dump(mode="json"),
        }
    )
    atomic_write_json(out / REPORT_FILE, report)
    return report


def summary_line(report: dict) -> str:
    """One line: per set and run, its forward KL, the gain over random, the ratio to the 100% student."""
    parts = []
    for st in report["sets"]:
        runs = []
        for run in report["runs"]:
            row = st["arms"]["set"]["runs"][run]
            base = ", ".join(
                f"{b} {_num(st['arms'][b]['runs'][run]['forward_kl']['mean'], '.3f')}" for b in report["baselines"]
            )
            ratio = row.get("ratio_to_full")
            verdict = next(
                (
                    v["verdict"]
                    for v in st.get("verdicts", [])
                    if (v["arm"], v["baseline"], v["run"], v["metric"]) == ("set", "random", run, "forward_kl")
                ),
                None,
            )
            runs.append(
                f"{run} FKL {_num(row['forward_kl']['mean'], '.3f')} "
                f"({_num(row['gain_vs_random_pct'], '+.1f')}% vs random"
                + (f", {verdict}" if verdict else "")
                + (f", {ratio:.2f}x full" if ratio is not None else "")
                + f"; {base})"
            )
        parts.append(f"{st['name']} (n={st['size']}): " + " | ".join(runs))
    return f"eval-data: {'; '.join(parts)}; {report['total_s']:.0f} s  report: {report['path']}"
