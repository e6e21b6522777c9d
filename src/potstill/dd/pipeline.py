"""``potstill select``: choose the training subset a KD student will learn from.

A :class:`SelectRecipe` names the teacher, the scoring student, the data (the pool is
*exactly* the train split that ``potstill distill`` makes from the same ``data`` section:
same order, same ``example_id``), an optional teacher-signal cache, and a ``select``
section: a scorer (a discriminated union on ``kind``), filters, and a budget.

:func:`run_select` runs, in order (GUIDE item 9: every step keeps or drops with a reason):

1. the pool (:class:`potstill.pipeline.Prepared` on the equivalent distill recipe, so the
   split, the encoding and the ids are distill's own);
2. the filters, in recipe order (MinHash near-duplicates, IFD > 1), over the whole pool;
3. the scorer over the survivors: per-example scores (perplexity, IFD, KD divergence,
   "confident teacher, unsure student", LESS) or embeddings (k-center, k-means medoids,
   herding, DEITA). KD-aware scores read the teacher from the cache when one is given:
   one teacher pass feeds both the soft targets and the data scores;
4. the budget: the ``k`` best survivors (or a subset chosen over embeddings, or random).

and writes atomically to ``output_dir``:

* ``selection.json``: ``{"example_ids": [kept, pool order], "scorer", "budget",
  "data_fingerprint", ...}``; a distill recipe reads it with ``data.selection: PATH``
  (:func:`load_selection`), which refuses other data;
* ``selected.jsonl``: the kept pairs (``prompt``, ``response``, ``messages``, ``example_id``);
* ``selection_report.json``: counts kept / dropped per reason, a score summary, every
  example's score and reason, and the time split ``timings_s``: ``load_s`` (models and data),
  ``teacher_s`` (teacher forward, or reading its signal from the cache), ``student_s``
  (student forward, both output heads, the per-token scores), ``student_warmup_s`` and
  ``student_gradients_s`` (LESS), ``embedding_s``, ``filters_s``, ``selection_s`` (the budget
  step), ``scoring_s`` (all of these but loading) and ``total_s``;
* ``select_recipe.resolved.yaml``.

Public API: :class:`SelectRecipe` (and its sections), :func:`load_select_recipe`,
:func:`distill_recipe`, :func:`run_select`, :func:`load_selection`,
:func:`pool_fingerprint`, :func:`summary_line`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor

from ..config import (
    CacheConfig,
    DataConfig,
    DivergenceConfig,
    ForwardKL,
    FromTeacherStudent,
    Recipe,
    StudentConfig,
    TeacherConfig,
    divergence_params,
    format_validation_error,
)
from ..errors import PotstillError
from ..io import atomic_write_json, atomic_write_text

FORMAT = "potstill-selection"
VERSION = 1
SELECTION, REPORT, SELECTED = "selection.json", "selection_report.json", "selected.jsonl"
BUDGET_CUT = "budget cut"
LESS_TARGET = "LESS target set, held out"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


ScoringModel = Literal["student", "teacher"]
Embeddings = Literal["minilm", "student_hidden"]


# ------------------------------------------------------------------------------ scorers


class RandomScorer(_Strict):
    kind: Literal["random"] = "random"


class PerplexityScorer(_Strict):
    kind: Literal["perplexity"] = "perplexity"
    model: ScoringModel = Field("student", description="Whose perplexity of the response given the prompt.")


class IfdLossRatioScorer(_Strict):
    kind: Literal["ifd_loss_ratio"] = "ifd_loss_ratio"
    model: ScoringModel = Field(
        "teacher",
        description="The model whose losses L(A|Q) / L(A) give Cherry LLM's IFD. The teacher by default: "
        "IFD asks whether the instruction helps a model that follows instructions, and a freshly cut or "
        "random-init student does not (its IFD is > 1 almost everywhere); a pretrained student may score too.",
    )


class IfdPplRatioScorer(_Strict):
    kind: Literal["ifd_ppl_ratio"] = "ifd_ppl_ratio"
    model: ScoringModel = Field(
        "teacher",
        description="The model whose PPL(A|Q) / PPL(A) gives Superfiltering's "
        "IFD (see ifd_loss_ratio for the default).",
    )


class KdDivergenceScorer(_Strict):
    kind: Literal["kd_divergence"] = "kd_divergence"
    divergence: DivergenceConfig = Field(
        default_factory=ForwardKL, description="Teacher-student divergence averaged over each response's tokens."
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Distillation temperature of the scores (a sparse cache must hold this temperature)."
    )


class ConfidentTeacherUnsureStudentScorer(_Strict):
    kind: Literal["confident_teacher_unsure_student"] = "confident_teacher_unsure_student"
    temperature: float = Field(1.0, gt=0.0, description="Temperature of both distributions.")


class LessScorer(_Strict):
    kind: Literal["less"] = "less"
    proj_dim: int = Field(8192, ge=1, description="Random-projection size of the LoRA gradients (LESS: 8192).")
    target: Literal["pool", "eval"] = Field(
        "pool",
        description="Target set whose loss the selection should lower: a seeded slice of the pool (held "
        "out of the selection) or the recipe's eval split (then the eval metrics are no longer held out).",
    )
    target_size: int = Field(16, ge=1, description="Target examples (pool: drawn with select.seed; eval: the first).")
    warmup_steps: int = Field(8, ge=1, description="AdamW steps of LoRA warmup on the pool before taking gradients.")
    learning_rate: float = Field(1e-4, gt=0.0, description="Warmup learning rate.")
    lora_r: int = Field(8, ge=1, description="LoRA rank of the gradient features (attention projections).")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    adam: bool = Field(True, description="Score with the Adam update direction (LESS) instead of the SGD gradient.")


class KCenterScorer(_Strict):
    kind: Literal["k_center"] = "k_center"
    embeddings: Embeddings = Field(
        "minilm",
        description="minilm: all-MiniLM-L6-v2 over prompt + response text; student_hidden: the scoring "
        "student's final hidden state averaged over the example's tokens (L2-normalized).",
    )


class KMeansMedoidsScorer(_Strict):
    kind: Literal["kmeans_medoids"] = "kmeans_medoids"
    embeddings: Embeddings = Field("minilm", description="See k_center.")
    iters: int = Field(100, ge=1, description="Lloyd iterations at most.")


class HerdingScorer(_Strict):
    kind: Literal["herding"] = "herding"
    embeddings: Embeddings = Field("minilm", description="See k_center.")


ScoreConfig = Annotated[
    PerplexityScorer
    | IfdLossRatioScorer
    | IfdPplRatioScorer
    | KdDivergenceScorer
    | ConfidentTeacherUnsureStudentScorer,
    Field(discriminator="kind"),
]


class DeitaScorer(_Strict):
    kind: Literal["deita"] = "deita"
    score: ScoreConfig = Field(
        default_factory=KdDivergenceScorer,
        description="Per-example score walked best first (select.largest says which end).",
    )
    threshold: float = Field(
        0.9, ge=-1.0, le=1.0, description="Skip an example whose cosine similarity to a chosen one exceeds this."
    )
    embeddings: Embeddings = Field("minilm", description="See k_center.")


ScorerConfig = Annotated[
    RandomScorer
    | PerplexityScorer
    | IfdLossRatioScorer
    | IfdPplRatioScorer
    | KdDivergenceScorer
    | ConfidentTeacherUnsureStudentScorer
    | LessScorer
    | KCenterScorer
    | KMeansMedoidsScorer
    | HerdingScorer
    | DeitaScorer,
    Field(discriminator="kind"),
]

KD_SCORERS = ("kd_divergence", "confident_teacher_unsure_student")
"""Scorers that read the teacher's distribution (from the cache when the recipe has one)."""


# ------------------------------------------------------------------------------ filters


class MinHashFilter(_Strict):
    kind: Literal["minhash_dedup"] = "minhash_dedup"
    threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity of shingle sets at or above "
        "which a later example is a near-duplicate of a kept one.",
    )
    num_perm: int = Field(128, ge=2, description="MinHash permutations.")
    ngram: int = Field(5, ge=1, description="Shingle size.")
    unit: Literal["word", "char"] = Field("word", description="Shingles of words or of characters.")


class IfdAboveOneFilter(_Strict):
    kind: Literal["drop_ifd_above_one"] = "drop_ifd_above_one"
    model: ScoringModel = Field(
        "teacher",
        description="The model whose L(A|Q) > L(A) marks a misaligned pair (see ifd_loss_ratio for the default).",
    )


FilterConfig = Annotated[MinHashFilter | IfdAboveOneFilter, Field(discriminator="kind")]


# ------------------------------------------------------------------------------- recipe


class SelectConfig(_Strict):
    scorer: ScorerConfig = Field(default_factory=KdDivergenceScorer, description="How examples are ranked or chosen.")
    budget: int | float = Field(
        0.1, description="Examples to keep: a fraction of the pool in (0, 1] (0.1 = 10%, rounded up) or a count >= 1."
    )
    largest: bool = Field(
        True,
        description="Keep the highest scores (hardest: most divergence, perplexity, IFD, "
        "influence); false keeps the lowest. Ignored by random and embedding selectors.",
    )
    filters: list[FilterConfig] = Field(default_factory=list, description="Applied in order before the budget.")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of random picks, k-means, k-center's first point and LESS."
    )
    batch_size: int = Field(8, ge=1, description="Examples per scoring forward pass.")
    chunk_size: int = Field(256, ge=1, description="Token rows per chunk of [rows, vocab] logits while scoring.")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, bool):
            raise ValueError("budget must be a fraction in (0, 1] or a count >= 1")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"budget={v} keeps nothing; give a count >= 1 or a fraction in (0, 1]")
        if isinstance(v, float) and not (0.0 < v <= 1.0 and math.isfinite(v)):
            raise ValueError(f"budget={v} must be a fraction in (0, 1] (or an integer count)")
        return v


class SelectRecipe(_Strict):
    output_dir: str = Field("runs/select", description="Where selection.json, selected.jsonl and the report go.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher (as in the distill recipe).")
    student: StudentConfig = Field(
        default_factory=FromTeacherStudent,
        description="The scoring student: the KD student's initial state (as in the distill recipe).",
    )
    student_seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="The distill recipe's train.seed: the initial weights of a scaled (random-init) scoring student.",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The distill recipe's data section: the pool is its train split, example for example.",
    )
    cache: CacheConfig | None = Field(
        None,
        description="The distill recipe's cache section: KD-aware scores read the teacher from this cache "
        "(written by `potstill cache`) instead of running it.",
    )
    select: SelectConfig = Field(default_factory=SelectConfig, description="Scorer, filters and budget.")
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")

    @model_validator(mode="after")
    def _check(self) -> SelectRecipe:
        if self.data.selection is not None:
            raise ValueError(
                "data.selection belongs in the distill recipe; a select recipe scores the whole pool, remove it"
            )
        kinds = _score_kinds(self.select)
        if self.teacher.model is None:
            needs = sorted(k for k in kinds if k in KD_SCORERS) + sorted(
                f"{k} (model: teacher)" for k, m in _model_uses(self.select) if m == "teacher"
            )
            if needs:
                raise ValueError(
                    f"{', '.join(needs)} need the teacher's weights, which a black-box teacher "
                    "(teacher.model null) does not have; choose another scorer or name a teacher"
                )
        kd = _kd_scorer(self.select)
        if self.cache is not None and kd is not None and self.cache.signal.kind != "dense":
            t = self.cache.temperature
            if t is not None and t != kd.temperature:
                raise ValueError(
                    f"cache.temperature={t} but the scorer's temperature is {kd.temperature}; a "
                    f"{self.cache.signal.kind} cache holds one temperature: make them equal"
                )
        return self


def _score_kinds(sel: SelectConfig) -> set[str]:
    s = sel.scorer
    return {s.kind} | ({s.score.kind} if isinstance(s, DeitaScorer) else set())


def _scalar(sel: SelectConfig):
    """The per-example score config of the selection (DEITA's inner score), or None."""
    s = sel.scorer
    return s.score if isinstance(s, DeitaScorer) else s


def _kd_scorer(sel: SelectConfig):
    s = _scalar(sel)
    return s if s.kind in KD_SCORERS else None


def _model_uses(sel: SelectConfig) -> list[tuple[str, str]]:
    out = [(f.kind, f.model) for f in sel.filters if isinstance(f, IfdAboveOneFilter)]
    s = _scalar(sel)
    if isinstance(s, (PerplexityScorer, IfdLossRatioScorer, IfdPplRatioScorer)):
        out.append((s.kind, s.model))
    return out


def select_recipe_from_dict(
    data: dict, overrides: list[str] | None = None, base_dir: Path | None = None
) -> SelectRecipe:
    """Validate a select recipe (``key=value`` overrides applied first); data paths resolved as distill does."""
    from ..config import apply_overrides, recipe_from_dict

    data = apply_overrides(copy.deepcopy(dict(data or {})), overrides or [])
    try:
        sr = SelectRecipe.model_validate(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "select")) from None
    # $POTSTILL_DATA/ and recipe-relative file paths, exactly as a distill recipe resolves them.
    sr.data = recipe_from_dict({"data": sr.data.model_dump(mode="json")}, base_dir=base_dir).data
    return sr


def load_select_recipe(path: str | Path, overrides: list[str] | None = None):
    """Read a YAML select recipe (``yaml.safe_load``) and apply ``key=value`` overrides. A recipe
    with ``kind: classification`` gives a :class:`~potstill.dd.select_cls.ClsSelectRecipe`."""
    from ..config import read_recipe_file

    data = read_recipe_file(path, "teacher, student, data, select")
    if data.get("kind") == "classification":
        from .select_cls import load_cls_select_recipe

        return load_cls_select_recipe(data, overrides or [])
    return select_recipe_from_dict(data, overrides, base_dir=Path(path).parent)


def distill_recipe(sr: SelectRecipe) -> Recipe:
    """The distill :class:`~potstill.config.Recipe` whose train split is this selection's pool.

    Teacher, student (and ``train.seed``), data and device are the select recipe's; the
    cache is kept only when a KD-aware scorer reads it; one run stands for the scorer
    (its divergence and temperature, so the cache's temperature resolves as distill's does).
    """
    kd = _kd_scorer(sr.select)
    black_box = sr.teacher.model is None
    run: dict[str, Any] = {"name": "select", "alpha": 1.0 if black_box else 0.0}
    if kd is not None:
        run["temperature"] = kd.temperature
        if isinstance(kd, KdDivergenceScorer):
            run["divergence"] = kd.divergence.model_dump(mode="json")
    d = {
        "output_dir": sr.output_dir,
        "teacher": sr.teacher.model_dump(mode="json"),
        "student": sr.student.model_dump(mode="json"),
        "data": sr.data.model_dump(mode="json"),
        "train": {"seed": sr.student_seed, "chunk_size": sr.select.chunk_size},
        "runs": [run],
        "eval": {"include_untrained": False},
        "device": sr.device,
    }
    if sr.cache is not None and kd is not None:
        d["cache"] = sr.cache.model_dump(mode="json")
    try:
        return Recipe.model_validate(d)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, d, "select")) from None


# ---------------------------------------------------------------------------- helpers


def pool_fingerprint(examples: Sequence[dict]) -> str:
    """sha256 over the examples' content hashes (token ids and prompt mask, in order): the
    same fingerprint a teacher-signal cache records for its data."""
    from ..signals.cache import example_hash

    return hashlib.sha256(b"".join(example_hash(x["input_ids"], x["labels"]) for x in examples)).hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Seconds per phase; ``with clock("phase"):`` adds to it (CUDA synchronized)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.s: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + seconds

    def __call__(self, key: str):
        clock = self

        class _Phase:
            def __enter__(self):
                _sync(clock.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _sync(clock.device)
                clock.add(key, time.perf_counter() - self.t0)

        return _Phase()


class _TimedSource:
    """A :class:`~potstill.signals.SignalSource` that adds the time of each ``signal`` call to a clock."""

    def __init__(self, source, clock: _Clock, key: str):
        self.source, self.clock, self.key = source, clock, key
        self.temperature = getattr(source, "temperature", None)

    def signal(self, batch):
        _sync(self.clock.device)
        t0 = time.perf_counter()
        out = self.source.signal(batch)
        _sync(self.clock.device)
        self.clock.add(self.key, time.perf_counter() - t0)
        return out


def _open_cache(prep, recipe: Recipe):
    """The recipe's cache, checked like distill checks it (tokenizer, teacher weights, data, signal).

    The head chunk size the cache was written with does not change what it holds, so
    unlike training it need not equal ``select.chunk_size``.
    """
    from ..pipeline import cache_spec
    from ..signals.cache import CachedSignal, weights_fingerprint

    spec = cache_spec(recipe)
    source = CachedSignal(
        recipe.cache_dir,
        tokenizer=prep.tokenizer,
        tail=spec.tail,
        teacher_fingerprint=weights_fingerprint(prep.teacher),
        verify=recipe.cache.verify,
    )
    source.check_spec(dataclasses.replace(spec, chunk_size=source.spec.chunk_size))
    source.check_data(prep.pool_examples)
    return source


def _pair_text(pair: dict) -> str:
    """Prompt turns (system turns left out: they are the same everywhere) and the response, one text."""
    turns = [m["content"] for m in pair["messages"] if m.get("role") != "system"]
    return "\n".join([*turns, pair["response"]])


def _pool_pairs(prep, recipe: Recipe, pool: list[dict]) -> list[dict]:
    """The texts of the pool, from the same split the pool was encoded from (checked to line up)."""
    from ..pipeline import split_pairs

    teacher_id = "" if prep.teacher is None else str(getattr(prep.teacher, "name_or_path", recipe.teacher.model))
    pairs, _ = split_pairs(recipe, prep.teacher, prep.tokenizer, teacher_id)
    if len(pairs) != len(pool) or any(p["response"] != ex["reference"] for p, ex in zip(pairs, pool)):
        raise PotstillError(
            "the pool's texts do not line up with its encoded examples (the data source is not "
            "deterministic); fix the data source so two reads give the same rows"
        )
    return pairs


@torch.no_grad()
def _hidden_embeddings(model: torch.nn.Module, examples: Sequence[dict], batch_size: int, pad_id: int) -> Tensor:
    """Mean final hidden state over each example's tokens (prompt and response), L2-normalized: ``[N, H]``."""
    from ..data import PadCollator
    from ..models import final_hidden
    from .select import _batches, _device_of, _eval_mode

    collate = PadCollator(pad_id)
    with _eval_mode(model):
        device = _device_of(model)
        rows: dict[int, Tensor] = {}
        for members in _batches(examples, batch_size):
            batch = collate([examples[i] for i in members])
            mask = batch["attention_mask"].to(device)
            h = final_hidden(model, batch["input_ids"].to(device), mask).float()
            m = mask.unsqueeze(-1).float()
            mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            for j, i in enumerate(members):
                rows[i] = mean[j].cpu()
        out = torch.stack([rows[i] for i in range(len(examples))])
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _less_scores(
    cfg: LessScorer, student0, pool: list[dict], targets: list[dict], sel: SelectConfig, clock: _Clock
) -> Tensor:
    """LESS (Xia et al. 2024): warm a LoRA copy of the scoring student up on the pool, then the
    cosine of each example's (Adam) update with the target set's mean gradient, ``[N]``."""
    from ..data import PadCollator
    from ..models import final_hidden, output_head
    from ..signals import target_index, target_rows
    from .influence import AdamState, less_scores, lora_model
    from .select import _device_of, _pad_id

    with clock("student_warmup_s"):
        model = lora_model(copy.deepcopy(student0), r=cfg.lora_r, alpha=cfg.lora_alpha, seed=sel.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        device = _device_of(model)
        collate = PadCollator(_pad_id(model, None))
        g = torch.Generator().manual_seed(sel.seed)
        order: list[int] = []
        model.eval()  # no dropout: the gradients below are taken in eval mode too
        for _ in range(cfg.warmup_steps):
            if len(order) < sel.batch_size:
                order += torch.randperm(len(pool), generator=g).tolist()
            members, order = order[: sel.batch_size], order[sel.batch_size :]
            batch = {k: v.to(device) for k, v in collate([pool[i] for i in members]).items()}
            rows = target_rows(
                final_hidden(model, batch["input_ids"], batch["attention_mask"]), target_index(batch["labels"])
            )
            lab = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(output_head(model)(rows).float(), lab[lab != -100])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        adam = AdamState.from_optimizer(opt, model) if cfg.adam else None
    with clock("student_gradients_s"):
        return less_scores(model, pool, targets, adam=adam, proj_dim=cfg.proj_dim, seed=sel.seed)


def _summary(x: Tensor) -> dict[str, float] | None:
    if x.numel() == 0:
        return None
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "n": int(x.numel()),
        "min": float(x.min()),
        "p10": q[0],
        "median": q[1],
        "mean": float(x.mean()),
        "p90": q[2],
        "max": float(x.max()),
    }


# ------------------------------------------------------------------------------ runner


class _Scoring:
    """Scores, statistics and embeddings of one selection, each computed at most once."""

    def __init__(self, prep, sr: SelectRecipe, pool: list[dict], pairs: list[dict], source, clock: _Clock):
        self.prep, self.sr, self.pool, self.pairs, self.source, self.clock = prep, sr, pool, pairs, source, clock
        self._stats: dict[str, tuple[list[int], dict[str, Tensor]]] = {}

    def _model(self, which: str):
        return self.prep.teacher if which == "teacher" else self.prep.student0

    def stats(self, which: str, idx: list[int]) -> dict[str, Tensor]:
        """:func:`~potstill.dd.select.example_stats` of ``which`` on pool rows ``idx`` (reusing a superset)."""
        from .select import example_stats

        have = self._stats.get(which)
        if have is None or not set(idx) <= set(have[0]):
            sel = self.sr.select
            with self.clock(f"{which}_s"):
                st = example_stats(
                    self._model(which),
                    [self.pool[i] for i in idx],
                    batch_size=sel.batch_size,
                    chunk_size=sel.chunk_size,
                    pad_token_id=_pad(self.prep),
                )
            have = (list(idx), st)
            self._stats[which] = have
        pos = {i: j for j, i in enumerate(have[0])}
        take = torch.tensor([pos[i] for i in idx], dtype=torch.long)
        return {k: v[take] for k, v in have[1].items()}

    def scores(self, cfg, idx: list[int]) -> Tensor:
        """The scalar score of ``cfg`` for pool rows ``idx``: ``[len(idx)]`` float64."""
        from . import select as S

        if isinstance(cfg, PerplexityScorer):
            return S.perplexity_score(self.stats(cfg.model, idx))
        if isinstance(cfg, IfdLossRatioScorer):
            return S.ifd_loss_ratio(self.stats(cfg.model, idx))
        if isinstance(cfg, IfdPplRatioScorer):
            return S.ifd_ppl_ratio(self.stats(cfg.model, idx))
        if isinstance(cfg, (KdDivergenceScorer, ConfidentTeacherUnsureStudentScorer)):
            from ..signals import OnlineTeacher

            sel = self.sr.select
            teacher = self.source if self.source is not None else OnlineTeacher(self.prep.teacher)
            timed = _TimedSource(teacher, self.clock, "teacher_s")
            kw: dict[str, Any] = {"temperature": cfg.temperature}
            if isinstance(cfg, KdDivergenceScorer):
                kw |= {"divergence": cfg.divergence.name, "divergence_kwargs": divergence_params(cfg.divergence)}
            t0 = time.perf_counter()
            before = self.clock.s.get("teacher_s", 0.0)
            st = S.kd_stats(
                self.prep.student0,
                timed,
                [self.pool[i] for i in idx],
                batch_size=sel.batch_size,
                chunk_size=sel.chunk_size,
                vocab_size=self.prep.vocab_size,
                pad_token_id=_pad(self.prep),
                **kw,
            )
            spent = time.perf_counter() - t0 - (self.clock.s.get("teacher_s", 0.0) - before)
            self.clock.add("student_s", spent)  # student body, both heads, the divergence
            return st["divergence" if isinstance(cfg, KdDivergenceScorer) else "confident_teacher_unsure_student"]
        raise AssertionError(type(cfg))

    def embeddings(self, kind: str, idx: list[int]) -> Tensor:
        if kind == "minilm":
            from .diversity import embed_texts

            with self.clock("embedding_s"):
                return embed_texts([_pair_text(self.pairs[i]) for i in idx], batch_size=32, device=self.prep.device)
        with self.clock("embedding_s"):
            return _hidden_embeddings(
                self.prep.student0, [self.pool[i] for i in idx], self.sr.select.batch_size, _pad(self.prep)
            )


def _pad(prep) -> int:
    from ..generate import pad_id

    return pad_id(prep.tokenizer)


def _budget_count(budget: int | float, n: int) -> int:
    if isinstance(budget, float):
        return max(1, math.ceil(budget * n - 1e-9))
    if budget > n:
        raise PotstillError(
            f"select.budget={budget} is more than the pool's {n} examples; lower it or give a fraction such as 0.1"
        )
    return budget


def run_select(sr: SelectRecipe) -> dict:
    """Score the pool, filter, apply the budget, and write the selection atomically.

    Returns the content of ``selection_report.json`` plus ``"paths"`` (the three files).
    Nothing is written before the models, the data, the cache and the budget are checked.
    A classification recipe runs :func:`potstill.dd.select_cls.run_select_cls`.
    """
    if not isinstance(sr, SelectRecipe):
        from .select_cls import run_select_cls

        return run_select_cls(sr)
    from ..pipeline import Prepared
    from .dedup import MinHashDedup
    from .select import apply_filters, drop_ifd_above_one, keep_indices, reason_key, top_k

    t_start = time.perf_counter()
    recipe = distill_recipe(sr)
    sel = sr.select
    scorer = sel.scorer
    t0 = time.perf_counter()
    prep = Prepared(recipe)
    pool = prep.pool_examples
    n = len(pool)
    k = _budget_count(sel.budget, n)
    source = _open_cache(prep, recipe) if recipe.cache is not None else None
    pairs = _pool_pairs(prep, recipe, pool)
    clock = _Clock(prep.device)
    clock.add("load_s", time.perf_counter() - t0)
    scoring = _Scoring(prep, sr, pool, pairs, source, clock)
    records = [{"text": _pair_text(p), "example_id": ex["example_id"]} for p, ex in zip(pairs, pool)]

    # 1. filters, in order, over the whole pool (a LESS target slice is held out first)
    less_targets: list[dict] | None = None
    filters: list[Callable] = []
    if isinstance(scorer, LessScorer):
        if scorer.target == "pool":
            if scorer.target_size >= n:
                raise PotstillError(
                    f"select.scorer.target_size={scorer.target_size} leaves no pool examples to "
                    f"select from ({n} in all); lower it"
                )
            g = torch.Generator().manual_seed(sel.seed)
            held = sorted(torch.randperm(n, generator=g)[: scorer.target_size].tolist())
            less_targets = [pool[i] for i in held]
            held_set = set(held)

            def less_target(example, index: int):
                return True if index not in held_set else (False, LESS_TARGET)

            less_target.__name__ = "less_target"
            filters.append(less_target)
        else:
            less_targets = prep.eval_examples[: scorer.target_size]
    for f in sel.filters:
        if isinstance(f, MinHashFilter):
            filters.append(
                MinHashDedup(threshold=f.threshold, num_perm=f.num_perm, ngram=f.ngram, unit=f.unit, seed=sel.seed + 1)
            )
        else:
            from .select import ifd_loss_ratio

            st = scoring.stats(f.model, list(range(n)))
            filters.append(drop_ifd_above_one(ifd_loss_ratio(st), name=f"ifd_loss_ratio[{f.model}]"))
    with clock("filters_s"):
        first = apply_filters(records, filters)
    surv = first.kept_index
    reasons: dict[int, str] = {d.index: d.reason for d in first.dropped}
    if not surv:
        raise PotstillError(f"the filters dropped all {n} pool examples ({first.report}); loosen them")

    # 2. scores / embeddings of the survivors; 3. the budget among them
    kk = min(k, len(surv))
    scores: Tensor | None = None
    score_name = None
    emb: Tensor | None = None
    chosen: list[int]  # positions in surv
    budget_reasons: dict[int, str] = {}
    if isinstance(scorer, RandomScorer):
        with clock("selection_s"):
            g = torch.Generator().manual_seed(sel.seed)
            chosen = torch.randperm(len(surv), generator=g)[:kk].tolist()
            for j in set(range(len(surv))) - set(chosen):
                budget_reasons[j] = f"{BUDGET_CUT} (not drawn, seed {sel.seed})"
    elif isinstance(scorer, (KCenterScorer, KMeansMedoidsScorer, HerdingScorer)):
        from . import diversity as D

        emb = scoring.embeddings(scorer.embeddings, surv)
        with clock("selection_s"):
            if isinstance(scorer, KCenterScorer):
                chosen = D.greedy_k_center(emb, kk, seed=sel.seed).tolist()
            elif isinstance(scorer, KMeansMedoidsScorer):
                chosen = D.kmeans_medoids(emb, kk, seed=sel.seed, iters=scorer.iters).tolist()
            else:
                chosen = D.herding(emb, kk).tolist()
            for j in set(range(len(surv))) - set(chosen):
                budget_reasons[j] = f"{BUDGET_CUT} (not a {scorer.kind} pick)"
    else:
        inner = _scalar(sel)
        if isinstance(scorer, LessScorer):
            scores = _less_scores(scorer, prep.student0, [pool[i] for i in surv], less_targets, sel, clock)
            score_name = "less"
        else:
            scores = scoring.scores(inner, surv)
            score_name = inner.kind
        if isinstance(scorer, DeitaScorer):
            from .diversity import deita_filter

            emb = scoring.embeddings(scorer.embeddings, surv)
            with clock("selection_s"):
                walk = scores if sel.largest else -scores
                idx, why = deita_filter(emb, walk, kk, scorer.threshold, return_reasons=True)
                chosen = idx.tolist()
                for j, r in why.items():
                    budget_reasons[j] = f"{BUDGET_CUT} ({r})" if r.startswith("deita budget filled") else r
        else:
            with clock("selection_s"):
                keep = top_k(scores, kk, largest=sel.largest, name=score_name)
                chosen = []
                for j in range(len(surv)):
                    verdict = keep(None, j)
                    if verdict is True:
                        chosen.append(j)
                    else:
                        budget_reasons[j] = f"{BUDGET_CUT} ({verdict[1]})"
    for j, r in budget_reasons.items():
        reasons[surv[j]] = r
    kept = sorted(surv[j] for j in chosen)
    final = apply_filters(records, [keep_indices(kept, reasons)])
    assert final.kept_index == kept

    # report
    score_of = {} if scores is None else {surv[j]: float(scores[j]) for j in range(len(surv))}
    summary = None
    if scores is not None:
        kept_pos = torch.tensor(sorted(chosen), dtype=torch.long)
        mask = torch.zeros(len(surv), dtype=torch.bool)
        mask[kept_pos] = True
        summary = {
            "name": score_name,
            "largest": sel.largest,
            "scored": _summary(scores),
            "kept": _summary(scores[mask]),
            "cut": _summary(scores[~mask]),
        }
    coverage = None
    if emb is not None and chosen:
        d = torch.cdist(emb.double(), emb[torch.tensor(chosen)].double()).amin(1)
        coverage = {
            "embeddings": getattr(scorer, "embeddings", None),
            "max_distance_to_kept": float(d.max()),
            "mean_distance_to_kept": float(d.mean()),
        }
    timings = {k_: round(v, 4) for k_, v in clock.s.items()}
    timings["scoring_s"] = round(sum(v for k_, v in clock.s.items() if k_ != "load_s"), 4)
    timings["total_s"] = round(time.perf_counter() - t_start, 4)
    fingerprint = pool_fingerprint(pool)
    kept_set = set(kept)
    ids = [pool[i]["example_id"] for i in kept]
    budget = {"requested": sel.budget, "count": k, "kept": len(kept), "unmet": len(kept) < k}
    report = {
        "format": FORMAT,
        "version": VERSION,
        "pool": n,
        "kept": len(kept),
        "dropped": dict(final.report.dropped),
        "reason_order": list(final.report.dropped),
        "budget": budget,
        "scorer": scorer.model_dump(mode="json"),
        "filters": [f.model_dump(mode="json") for f in sel.filters],
        "filter_report": first.report.to_dict(),
        "scores": summary,
        "coverage": coverage,
        "teacher_signal": "none"
        if _kd_scorer(sel) is None
        else (f"cache {recipe.cache_dir}" if source is not None else "live teacher"),
        "device": str(prep.device),
        "timings_s": timings,
        "data_fingerprint": fingerprint,
        "examples": [
            {
                "example_id": pool[i]["example_id"],
                "kept": i in kept_set,
                "reason": reasons.get(i),
                "reason_key": None if i not in reasons else reason_key(reasons[i]),
                "score": score_of.get(i),
            }
            for i in range(n)
        ],
    }
    selection = {
        "format": FORMAT,
        "version": VERSION,
        "example_ids": ids,
        "scorer": scorer.model_dump(mode="json"),
        "largest": sel.largest,
        "budget": budget,
        "filters": [f.model_dump(mode="json") for f in sel.filters],
        "seed": sel.seed,
        "pool_size": n,
        "data_fingerprint": fingerprint,
        "teacher": sr.teacher.model,
        "data": sr.data.model_dump(mode="json"),
    }
    # Input is valid and everything is computed: from here on we write (selection.json last).
    out = Path(sr.output_dir)
    (out / SELECTION).unlink(missing_ok=True)  # never leave an old selection next to new files
    atomic_write_text(out / "select_recipe.resolved.yaml", yaml.safe_dump(sr.model_dump(mode="json"), sort_keys=False))
    lines = []
    for i in kept:
        p = pairs[i]
        user = [m["content"] for m in p["messages"] if m.get("role") == "user"]
        lines.append(
            json.dumps(
                {
                    "example_id": pool[i]["example_id"],
                    "prompt": user[-1] if user else "",
                    "response": p["response"],
                    "messages": [*p["messages"], {"role": "assistant", "content": p["response"]}],
                },
                ensure_ascii=False,
            )
        )
    atomic_write_text(out / SELECTED, "".join(line + "\n" for line in lines))
    atomic_write_json(out / REPORT, report)
    atomic_write_json(out / SELECTION, selection)
    report["paths"] = {"selection": str(out / SELECTION), "selected": str(out / SELECTED), "report": str(out / REPORT)}
    return report


def summary_line(report: dict) -> str:
    """One line for the CLI: kept of pool, drops per reason, time, where the selection is."""
    drops = ", ".join(f"{k}: {v}" for k, v in report["dropped"].items())
    return (
        f"select: kept {report['kept']} of {report['pool']} ({report['scorer']['kind']})"
        + (f"; dropped {drops}" if drops else "")
        + f"; {report['timings_s']['total_s']:.1f} s  selection: {report['paths']['selection']}"
    )


# ----------------------------------------------------------------------------- loading


def load_selection(path: str | Path, examples: Sequence[dict]) -> list[dict]:
    """The examples a ``selection.json`` keeps, in pool order, each with its original ``example_id``.

    ``path`` is the file or the directory holding it; ``examples`` the encoded train split
    (the pool) of the distill recipe. Refuses a selection made for other data (its
    ``data_fingerprint`` differs from :func:`pool_fingerprint` of ``examples``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / SELECTION
    if not p.is_file():
        raise PotstillError(f"no selection at '{p}'; run `potstill select RECIPE.yaml` first or fix data.selection")
    try:
        sel = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise PotstillError(f"{p} is not valid JSON; rerun `potstill select` to rewrite it") from None
    if not isinstance(sel, dict) or sel.get("format") != FORMAT:
        raise PotstillError(f"{p} is not a potstill selection; point data.selection at a selection.json")
    if sel.get("version") != VERSION:
        raise PotstillError(f"selection format version {sel.get('version')} is not {VERSION}; rerun `potstill select`")
    if sel.get("data_fingerprint") != pool_fingerprint(examples):
        raise PotstillError(
            f"the selection at '{p}' was made for other data ({sel.get('pool_size')} examples then, {len(examples)} "
            "now; data, max_length, system prompt or chat template differ); rerun `potstill select` with this "
            "recipe's data section"
        )
    ids = sel.get("example_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise PotstillError(f"{p} has no example ids; rerun `potstill select` to rewrite it")
    by_id = {int(ex["example_id"]): ex for ex in examples}
    missing = [i for i in ids if i not in by_id]
    if missing or len(set(ids)) != len(ids):
        raise PotstillError(
            f"{p} names example ids that are not in the pool once each (e.g. "
            f"{(missing or ids)[0]}); rerun `potstill select` to rewrite it"
        )
    keep = set(ids)
    return [ex for ex in examples if int(ex["example_id"]) in keep]
