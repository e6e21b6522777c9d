"""``potstill eval-data`` for causal-LM training sets: a selection vs random and coreset subsets under KD.

The evaluation protocol of :mod:`potstill.dd.eval_data`, for instruction data and LLM students (a
recipe with ``kind: causal_lm``). Every set (``format: selection``, a ``selection.json`` from
``potstill select`` over this recipe's pool; or ``format: jsonl``, new prompt/response rows such as
``potstill synthesize``'s ``synthetic.jsonl``, trained from the live teacher since no cache covers
them) is compared, at the *same number of examples*, with baseline subsets of the same pool
(``random``, one draw per seed, and the coresets ``k_center``, ``kmeans_medoids``, ``herding`` over
``embeddings``), each drawn by :func:`potstill.dd.pipeline.run_select` so the baselines are what the
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
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..config import (
    CacheConfig,
    DataConfig,
    FromTeacherStudent,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    _Strict,
)
from ..errors import PotstillError
from ..io import atomic_write_json
from .condense_recipe import _finite

__all__ = ["EvalDataLMRecipe", "LMSet", "load_lm_recipe", "run_eval_data_lm", "summary_line"]

LMBaseline = Literal["random", "k_center", "kmeans_medoids", "herding"]
ARMS_FILE = "arms.json"
REPORT_FILE = "eval_data.json"
METRICS = ("forward_kl", "top1_agreement", "perplexity")


def _default_lm_runs() -> list[RunConfig]:
    return [RunConfig(name="hard", alpha=1.0), RunConfig(name="soft", alpha=0.0)]


class LMSet(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Name of the arm in the report.")
    path: str = Field(
        ...,
        min_length=1,
        description="selection: a selection.json of `potstill select` over this "
        "recipe's pool (the same data section), or its folder; jsonl: a file of prompt/response rows.",
    )
    format: Literal["selection", "jsonl"] = Field(
        "selection",
        description="selection: a subset of the pool; "
        "jsonl: new examples, e.g. synthetic.jsonl of `potstill synthesize`.",
    )
    prompt_field: str = Field("prompt", description="jsonl: the column holding the prompt.")
    response_field: str = Field("response", description="jsonl: the column holding the response.")
    construction_seconds: float | None = Field(
        None,
        ge=0.0,
        description="Seconds it took to build the set "
        "(null: read from selection_report.json or synthesis_report.json "
        "beside it, else unknown).",
    )


class EvalDataLMRecipe(_Strict):
    kind: Literal["causal_lm"] = Field(
        ...,
        description="causal_lm: instruction data and LLM students (without it, eval-data judges classification sets).",
    )
    output_dir: str = Field(
        "runs/eval_data_lm", description="Where eval_data.json, arms.json and the baseline selections go."
    )
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher (as in distill).")
    student: StudentConfig = Field(
        default_factory=FromTeacherStudent, description="The student every arm starts from (as in distill)."
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The distill data section: the pool is its train split, the held-out examples its eval split.",
    )
    cache: CacheConfig | None = Field(
        None,
        description="Teacher-signal cache the KD runs train from (built by "
        "`potstill cache` with the same data); null: the live teacher.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Optimization of every learner; max_steps is ignored (equal epochs decide the steps).",
    )
    runs: list[RunConfig] = Field(
        default_factory=_default_lm_runs,
        min_length=1,
        description="How each arm is trained (distill runs): default hard (SFT) and soft (KD, forward KL, T 1).",
    )
    epochs: float = Field(2.0, gt=0.0, description="Epochs of every learner over its own set.")
    seeds: int = Field(1, ge=1, description="Learners per arm (train.seed + i); random draws one subset per seed.")
    baselines: list[LMBaseline] = Field(
        default_factory=lambda: ["random", "kmeans_medoids"],
        min_length=1,
        description="Real subsets of the same size, drawn by `potstill select`.",
    )
    embeddings: Literal["minilm", "student_hidden"] = Field("minilm", description="Space of the coreset baselines.")
    full: bool = Field(True, description="Also train on the whole pool (one learner per run): the reference.")
    eval_batch_size: int = Field(8, ge=1, description="Examples per evaluation batch.")
    keep_students: bool = Field(False, description="Keep every trained student under output_dir/students.")
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")
    sets: list[LMSet] = Field(
        ..., min_length=1, description="The selections to judge: {name, path, construction_seconds}."
    )

    @field_validator("baselines", "sets", "runs")
    @classmethod
    def _unique(cls, v: list, info) -> list:
        names = [x if isinstance(x, str) else x.name for x in v]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"'{dup}' is listed twice; name each once")
        if info.field_name == "baselines" and "random" not in v:
            raise ValueError("must include random (the gains are over it)")
        if info.field_name == "sets":
            clash = next((n for n in names if n in ("full", "student_init", *LMBaseline.__args__)), None)
            if clash is not None:
                raise ValueError(f"set name '{clash}' is reserved for a reference arm; rename it")
        return v

    @model_validator(mode="after")
    def _checks(self) -> EvalDataLMRecipe:
        if self.data.selection is not None:
            raise ValueError(
                "data.selection is set: eval-data judges the selections listed in `sets` against "
                "the whole pool; remove data.selection"
            )
        if self.teacher.model is None:
            raise ValueError("teacher.model is null: held-out forward KL needs the teacher's logits; name a teacher")
        new = next((s.name for s in self.sets if s.format == "jsonl"), None)
        if new is not None and self.cache is not None:
            raise ValueError(
                f"set '{new}' holds new examples that the cache does not cover; remove `cache` so every "
                "arm trains from the live teacher alike"
            )
        return self

    def distill_recipe(self):
        """The distill :class:`~potstill.config.Recipe` of this protocol (pool, models, runs, cache)."""
        from ..config import Recipe

        d = {
            "output_dir": self.output_dir,
            "teacher": self.teacher.model_dump(mode="json"),
            "student": self.student.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "train": self.train.model_dump(mode="json"),
            "runs": [r.model_dump(mode="json") for r in self.runs],
            "eval": {"include_untrained": True},
            "device": self.device,
        }
        if self.cache is not None:
            d["cache"] = self.cache.model_dump(mode="json")
        return Recipe.model_validate(d)


def load_lm_recipe(data: dict, base_dir: Path | None = None) -> EvalDataLMRecipe:
    """A validated recipe from a dict (overrides already applied); problems raise one-line errors.
    Data paths ($POTSTILL_DATA/..., relative to ``base_dir``, the recipe's folder) resolve as in
    distill and select, so the same data section means the same pool."""
    from ..config import format_validation_error, recipe_from_dict

    try:
        recipe = EvalDataLMRecipe.model_validate(data)
        recipe.distill_recipe()  # distill's own checks (cache vs runs, divergences, ...)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "eval-data")) from None
    recipe.data = recipe_from_dict({"data": recipe.data.model_dump(mode="json")}, base_dir=base_dir).data
    return recipe


# ------------------------------------------------------------------------------- helpers


def _set_path(s: LMSet) -> Path:
    from .eval_data import _resolve
    from .pipeline import SELECTION

    p = _resolve(s.path)
    if s.format == "selection" and p.is_dir():
        p = p / SELECTION
    if not p.is_file():
        what = "a selection.json of `potstill select`" if s.format == "selection" else "a jsonl file"
        raise PotstillError(f"set '{s.name}': '{p}' does not exist or is not a file; point its path at {what}")
    return p


def _jsonl_examples(s: LMSet, path: Path, recipe: EvalDataLMRecipe, tokenizer) -> list[dict]:
    """A jsonl set's rows as encoded examples (the recipe's chat template, system prompt, max_length)."""
    from ..data import load_records, records_to_pairs
    from ..pipeline import encode_pairs

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


# ------------------------------------------------------------------------------- run


def run_eval_data_lm(recipe: EvalDataLMRecipe) -> dict:
    """Train and evaluate every arm (module docstring); returns the report written atomically to
    ``output_dir/eval_data.json``."""
    from ..eval import evaluate_runs, metrics_only
    from ..pipeline import Prepared, train_run
    from .eval_data import _construction as construction
    from .pipeline import REPORT, SELECTION, load_selection, run_select, select_recipe_from_dict

    t_start = time.perf_counter()
    distill = recipe.distill_recipe()
    paths = [_set_path(s) for s in recipe.sets]  # before the models load: a wrong path fails at once
    prep = Prepared(distill)
    pool = prep.pool_examples
    if not prep.eval_examples:
        raise PotstillError("the held-out split is empty; raise data.eval_size")
    loaded = []  # every set is read and checked before anything trains: bad input fails fast
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
    source = prep.cached_source() if any(r.uses_teacher for r in distill.runs) else None

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..signals.cache import weights_fingerprint
    from .pipeline import pool_fingerprint

    fp = _fingerprint(
        recipe,
        [x[-1] for x in loaded]
        + [pool_fingerprint(pool), pool_fingerprint(prep.eval_examples), weights_fingerprint(prep.teacher)],
    )
    arms_path = out / ARMS_FILE
    done: dict[str, dict] = {}
    if arms_path.is_file():
        try:
            prev = json.loads(arms_path.read_text(encoding="utf-8"))
            if prev.get("fingerprint") == fp:
                done = prev["arms"]
        except (ValueError, KeyError, TypeError):
            done = {}  # a torn or foreign file: start over (it is rewritten atomically below)
    scratch = out / "students"
    bsz = recipe.train.batch_size * recipe.train.gradient_accumulation_steps

    def steps_for(n: int) -> int:
        return max(1, math.ceil(recipe.epochs * n / bsz - 1e-9))

    def learn(key: str, examples: list[dict], seed: int) -> dict:
        """Every run trained on ``examples`` from the initial student; metrics per run (resumed if done)."""
        if key in done:
            return done[key]
        steps = steps_for(len(examples))
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
                scratch / key / run.name,
                prep.device,
                prep.vocab_size,
                source=source if run.uses_teacher else None,
            )
            train_s[run.name] = time.perf_counter() - t0
        # the arm's students together: one teacher pass over the held-out examples serves them all
        m = metrics_only(
            evaluate_runs(
                {n: x.eval() for n, x in models.items()},
                prep.teacher,
                prep.tokenizer,
                prep.eval_examples,
                vocab_size=prep.vocab_size,
                batch_size=recipe.eval_batch_size,
                max_new_tokens=0,
                progress=False,
            )
        )
        row["runs"] = {n: {k: m[n][k] for k in METRICS} | {"train_s": train_s[n]} for n in models}
        del models
        if not recipe.keep_students:
            shutil.rmtree(scratch / key, ignore_errors=True)
        done[key] = row
        atomic_write_json(arms_path, _finite({"fingerprint": fp, "arms": done}))
        return row

    def baseline(kind: str, n: int, seed: int) -> tuple[list[dict], float]:
        """``(examples, seconds)`` of one baseline subset of ``n`` pool examples, drawn by run_select
        (seconds: its scoring and selection, model loading left out)."""
        key = f"{kind}_n{n}_s{seed}"
        sel_dir = out / "baselines" / key
        scorer: dict = {"kind": kind} if kind == "random" else {"kind": kind, "embeddings": recipe.embeddings}
        sr = select_recipe_from_dict(
            {
                "output_dir": str(sel_dir),
                "teacher": recipe.teacher.model_dump(mode="json"),
                "student": distill.student.model_dump(mode="json"),
                "student_seed": recipe.train.seed,
                "data": recipe.data.model_dump(mode="json"),
                "device": recipe.device,
                "select": {"scorer": scorer, "budget": n, "seed": recipe.train.seed + seed},
            }
        )
        if key in done and (sel_dir / SELECTION).is_file() and (sel_dir / REPORT).is_file():
            timings = json.loads((sel_dir / REPORT).read_text(encoding="utf-8"))["timings_s"]
        else:  # drawn again after a changed recipe or an interruption before its learners finished
            timings = run_select(sr)["timings_s"]
        return load_selection(sel_dir / SELECTION, pool), float(timings["total_s"] - timings.get("load_s", 0.0))

    # every baseline is drawn before anything trains: a coreset that cannot run fails at once
    draws = {
        (b, len(x[2]), i): baseline(b, len(x[2]), i)
        for x in loaded
        for b in recipe.baselines
        for i in range(recipe.seeds)
    }

    # references: the untrained student, and the 100% student
    if "student_init" not in done:
        m = metrics_only(
            evaluate_runs(
                {"student": prep.student0},
                prep.teacher,
                prep.tokenizer,
                prep.eval_examples,
                vocab_size=prep.vocab_size,
                batch_size=recipe.eval_batch_size,
                max_new_tokens=0,
                progress=False,
            )
        )
        done["student_init"] = {
            "runs": {"untrained": {k: m["student"][k] for k in METRICS}},
            "teacher": {k: m["teacher"][k] for k in METRICS},
        }
        atomic_write_json(arms_path, _finite({"fingerprint": fp, "arms": done}))
    full = learn("full", pool, 0) if recipe.full else None

    report_sets = []
    for s, path, examples, cost, cost_src, _h in loaded:
        n = len(examples)
        arm_rows: dict[str, list[dict]] = {
            "set": [learn(f"set_{s.name}_s{i}", examples, i) for i in range(recipe.seeds)]
        }
        arm_info: dict[str, dict] = {"set": {"construction_seconds": cost, "construction_source": cost_src}}
        for b in recipe.baselines:
            rows, secs = [], []
            for i in range(recipe.seeds):
                sub, sec = draws[(b, n, i)]
                rows.append(learn(f"{b}_n{n}_s{i}", sub, i))
                secs.append(sec)
            arm_rows[b] = rows
            arm_info[b] = {"construction_seconds": statistics.fmean(secs), "construction_source": "measured"}
        arms: dict[str, dict] = {}
        for arm, rows in arm_rows.items():
            a = {
                "examples": n,
                "response_tokens": statistics.fmean(r["response_tokens"] for r in rows),
                "steps": rows[0]["steps"],
                **arm_info[arm],
                "runs": {},
            }
            for run in distill.runs:
                per = {k: _stats([r["runs"][run.name][k] for r in rows]) for k in METRICS}
                per["train_s"] = statistics.fmean(r["runs"][run.name]["train_s"] for r in rows)
                a["runs"][run.name] = per
            arms[arm] = a
        for run in distill.runs:
            rnd = arms["random"]["runs"][run.name]["forward_kl"]["mean"]
            for arm in arms.values():
                per = arm["runs"][run.name]
                fkl = per["forward_kl"]["mean"]
                ref = full["runs"][run.name]["forward_kl"] if full else None
                per["gain_vs_random_pct"] = 100.0 * (rnd - fkl) / rnd if math.isfinite(rnd) and rnd else None
                per["ratio_to_full"] = fkl / ref if ref is not None and math.isfinite(ref) and ref else None
        report_sets.append(
            {
                "name": s.name,
                "format": s.format,
                "path": str(path),
                "size": n,
                "fraction_of_pool": n / len(pool),
                "arms": arms,
            }
        )
    if not recipe.keep_students:
        shutil.rmtree(scratch, ignore_errors=True)
    report = _finite(
        {
            "kind": "causal_lm",
            "n_pool": len(pool),
            "n_eval": len(prep.eval_examples),
            "pool_response_tokens": _tokens(pool),
            "runs": [r.name for r in distill.runs],
            "baselines": list(recipe.baselines),
            "teacher": done["student_init"]["teacher"],
            "student_init": done["student_init"]["runs"]["untrained"],
            "full": full,
            "protocol": {
                "epochs": recipe.epochs,
                "batch_size": bsz,
                "learning_rate": recipe.train.learning_rate,
                "seeds": [recipe.train.seed + i for i in range(recipe.seeds)],
                "cache": recipe.cache is not None,
                "embeddings": recipe.embeddings,
            },
            "sets": report_sets,
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
            runs.append(
                f"{run} FKL {_num(row['forward_kl']['mean'], '.3f')} "
                f"({_num(row['gain_vs_random_pct'], '+.1f')}% vs random"
                + (f", {ratio:.2f}x full" if ratio is not None else "")
                + f"; {base})"
            )
        parts.append(f"{st['name']} (n={st['size']}): " + " | ".join(runs))
    return f"eval-data: {'; '.join(parts)}; {report['total_s']:.0f} s  report: {report['path']}"
