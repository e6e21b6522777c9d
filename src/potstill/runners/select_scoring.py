"""The scoring machinery of ``potstill select``: for causal-LM pools the pool's texts, the teacher-signal
cache, per-phase timings, per-example scores and statistics (each computed at most once), embeddings,
and LESS gradient scores; for classification pools the data values of ``knn_shapley`` / ``tmc_shapley``
(:func:`value_pool`)."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from potstill.errors import PotstillError
from potstill.recipes.distill import Recipe
from potstill.recipes.divergences import divergence_params
from potstill.recipes.select import (
    ClsSelectConfig,
    ConfidentTeacherUnsureStudentScorer,
    IfdLossRatioScorer,
    IfdPplRatioScorer,
    KdDivergenceScorer,
    LessScorer,
    PerplexityScorer,
    SelectConfig,
    SelectRecipe,
)

__all__ = [
    "VALUATION_SET",
    "Clock",
    "Scoring",
    "TimedSource",
    "Valued",
    "budget_count",
    "hidden_embeddings",
    "less_scores",
    "open_cache",
    "pad_of",
    "pair_text",
    "pool_pairs",
    "score_summary",
    "value_pool",
]

VALUATION_SET = "valuation set, held out"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
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


class TimedSource:
    """A :class:`~potstill.signals.SignalSource` that adds the time of each ``signal`` call to a clock."""

    def __init__(self, source, clock: Clock, key: str):
        self.source, self.clock, self.key = source, clock, key
        self.temperature = getattr(source, "temperature", None)

    def signal(self, batch):
        _sync(self.clock.device)
        t0 = time.perf_counter()
        out = self.source.signal(batch)
        _sync(self.clock.device)
        self.clock.add(self.key, time.perf_counter() - t0)
        return out


def open_cache(prep, recipe: Recipe):
    """The recipe's cache, checked like distill checks it (tokenizer, teacher weights, data, signal).

    The head chunk size the cache was written with does not change what it holds, so
    unlike training it need not equal ``select.chunk_size``.
    """
    from potstill.fingerprints import weights_fingerprint
    from potstill.runners.prepare import cache_spec
    from potstill.signals.cache import CachedSignal

    spec = cache_spec(recipe)
    source = CachedSignal(
        recipe.cache_dir,
        tokenizer=prep.tokenizer,
        tail=spec.tail,
        teacher_fingerprint=weights_fingerprint(prep.teacher),
        verify=recipe.cache.verify,
        allow_mixed=recipe.cache.allow_mixed,
    )
    source.check_spec(dataclasses.replace(spec, chunk_size=source.spec.chunk_size))
    source.check_data(prep.pool_examples)
    return source


def pair_text(pair: dict) -> str:
    """Prompt turns (system turns left out: they are the same everywhere) and the response, one text."""
    turns = [m["content"] for m in pair["messages"] if m.get("role") != "system"]
    return "\n".join([*turns, pair["response"]])


def pool_pairs(prep, recipe: Recipe, pool: list[dict]) -> list[dict]:
    """The texts of the pool, from the same split the pool was encoded from (checked to line up)."""
    from potstill.runners.prepare import split_pairs

    teacher_id = "" if prep.teacher is None else str(getattr(prep.teacher, "name_or_path", recipe.teacher.model))
    pairs, _ = split_pairs(recipe, prep.teacher, prep.tokenizer, teacher_id)
    if len(pairs) != len(pool) or any(p["response"] != ex["reference"] for p, ex in zip(pairs, pool)):
        raise PotstillError(
            "the pool's texts do not line up with its encoded examples (the data source is not "
            "deterministic); fix the data source so two reads give the same rows"
        )
    return pairs


@torch.no_grad()
def hidden_embeddings(model: torch.nn.Module, examples: Sequence[dict], batch_size: int, pad_id: int) -> Tensor:
    """Mean final hidden state over each example's tokens (prompt and response), L2-normalized: ``[N, H]``."""
    from potstill.data import PadCollator
    from potstill.dd.select import batches, device_of, eval_mode
    from potstill.models import final_hidden

    collate = PadCollator(pad_id)
    with eval_mode(model):
        device = device_of(model)
        rows: dict[int, Tensor] = {}
        for members in batches(examples, batch_size):
            batch = collate([examples[i] for i in members])
            mask = batch["attention_mask"].to(device)
            h = final_hidden(model, batch["input_ids"].to(device), mask).float()
            m = mask.unsqueeze(-1).float()
            mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            for j, i in enumerate(members):
                rows[i] = mean[j].cpu()
        out = torch.stack([rows[i] for i in range(len(examples))])
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def less_scores(
    cfg: LessScorer, student0, pool: list[dict], targets: list[dict], sel: SelectConfig, clock: Clock
) -> Tensor:
    """LESS (Xia et al. 2024): warm a LoRA copy of the scoring student up on the pool, then the
    cosine of each example's (Adam) update with the target set's mean gradient, ``[N]``."""
    from potstill.data import PadCollator
    from potstill.dd.influence import AdamState, lora_model
    from potstill.dd.influence import less_scores as influence_scores
    from potstill.dd.select import device_of, pad_id
    from potstill.models import final_hidden, output_head
    from potstill.signals import target_index, target_rows

    with clock("student_warmup_s"):
        model = lora_model(copy.deepcopy(student0), r=cfg.lora_r, alpha=cfg.lora_alpha, seed=sel.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        device = device_of(model)
        collate = PadCollator(pad_id(model, None))
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
        return influence_scores(model, pool, targets, adam=adam, proj_dim=cfg.proj_dim, seed=sel.seed)


def score_summary(x: Tensor) -> dict[str, float] | None:
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


class Scoring:
    """Scores, statistics and embeddings of one selection, each computed at most once."""

    def __init__(self, prep, sr: SelectRecipe, pool: list[dict], pairs: list[dict], source, clock: Clock):
        self.prep, self.sr, self.pool, self.pairs, self.source, self.clock = prep, sr, pool, pairs, source, clock
        self._stats: dict[str, tuple[list[int], dict[str, Tensor]]] = {}

    def _model(self, which: str):
        return self.prep.teacher if which == "teacher" else self.prep.student0

    def stats(self, which: str, idx: list[int]) -> dict[str, Tensor]:
        """:func:`~potstill.dd.select.example_stats` of ``which`` on pool rows ``idx`` (reusing a superset)."""
        from potstill.dd.select import example_stats

        have = self._stats.get(which)
        if have is None or not set(idx) <= set(have[0]):
            sel = self.sr.select
            with self.clock(f"{which}_s"):
                st = example_stats(
                    self._model(which),
                    [self.pool[i] for i in idx],
                    batch_size=sel.batch_size,
                    chunk_size=sel.chunk_size,
                    pad_token_id=pad_of(self.prep),
                )
            have = (list(idx), st)
            self._stats[which] = have
        pos = {i: j for j, i in enumerate(have[0])}
        take = torch.tensor([pos[i] for i in idx], dtype=torch.long)
        return {k: v[take] for k, v in have[1].items()}

    def scores(self, cfg, idx: list[int]) -> Tensor:
        """The scalar score of ``cfg`` for pool rows ``idx``: ``[len(idx)]`` float64."""
        from potstill.dd import select as S

        if isinstance(cfg, PerplexityScorer):
            return S.perplexity_score(self.stats(cfg.model, idx))
        if isinstance(cfg, IfdLossRatioScorer):
            return S.ifd_loss_ratio(self.stats(cfg.model, idx))
        if isinstance(cfg, IfdPplRatioScorer):
            return S.ifd_ppl_ratio(self.stats(cfg.model, idx))
        if isinstance(cfg, (KdDivergenceScorer, ConfidentTeacherUnsureStudentScorer)):
            from potstill.signals import OnlineTeacher

            sel = self.sr.select
            teacher = self.source if self.source is not None else OnlineTeacher(self.prep.teacher)
            timed = TimedSource(teacher, self.clock, "teacher_s")
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
                pad_token_id=pad_of(self.prep),
                **kw,
            )
            spent = time.perf_counter() - t0 - (self.clock.s.get("teacher_s", 0.0) - before)
            self.clock.add("student_s", spent)  # student body, both heads, the divergence
            return st["divergence" if isinstance(cfg, KdDivergenceScorer) else "confident_teacher_unsure_student"]
        raise AssertionError(type(cfg))

    def embeddings(self, kind: str, idx: list[int]) -> Tensor:
        if kind == "minilm":
            from potstill.dd.diversity import embed_texts

            with self.clock("embedding_s"):
                return embed_texts([pair_text(self.pairs[i]) for i in idx], batch_size=32, device=self.prep.device)
        with self.clock("embedding_s"):
            return hidden_embeddings(
                self.prep.student0, [self.pool[i] for i in idx], self.sr.select.batch_size, pad_of(self.prep)
            )


def pad_of(prep) -> int:
    from potstill.generate import pad_id

    return pad_id(prep.tokenizer)


def budget_count(budget: int | float, n: int) -> int:
    if isinstance(budget, float):
        return max(1, math.ceil(budget * n - 1e-9))
    if budget > n:
        raise PotstillError(
            f"select.budget={budget} is more than the pool's {n} examples; lower it or give a fraction such as 0.1"
        )
    return budget


@dataclasses.dataclass
class Valued:
    """Data values of a classification pool: ``values[i]`` for every valued pool row (the pool less the
    validation rows ``val_idx``), the ``suspects`` (lowest values first) and the valuation's settings."""

    values: dict[int, float]
    val_idx: list[int]
    suspects: list[int]
    info: dict[str, Any]


def value_pool(sel: ClsSelectConfig, emb: Tensor, labels: Tensor, num_classes: int) -> Valued:
    """KNN-Shapley or TMC-Shapley values of the pool in the coreset space ``emb [N, D]``, with a seeded
    ``valuation.val_size`` slice of the pool as the held-out validation (test) points."""
    from potstill.dd import valuation as V

    cfg, n = sel.valuation, len(labels)
    if cfg.val_size >= n:
        raise PotstillError(
            f"select.valuation.val_size={cfg.val_size} leaves no pool examples to value ({n} in all); lower it"
        )
    g = torch.Generator().manual_seed(sel.seed)
    val_idx = sorted(torch.randperm(n, generator=g)[: cfg.val_size].tolist())
    held = set(val_idx)
    train_idx = [i for i in range(n) if i not in held]
    for y in sorted(set(labels.tolist())):
        have = int((labels[train_idx] == y).sum())
        if have < sel.per_class:
            raise PotstillError(
                f"after holding out valuation.val_size={cfg.val_size} examples, label {y} has {have} left, "
                f"fewer than select.per_class={sel.per_class}; lower val_size or per_class, or raise data.pool_size"
            )
    tr, va = torch.tensor(train_idx), torch.tensor(val_idx)
    info: dict[str, Any] = {"validation": f"{cfg.val_size} pool examples drawn with select.seed, not selectable"}
    if sel.scorer == "knn_shapley":
        values = V.knn_shapley(emb[tr], labels[tr], emb[va], labels[va], cfg.k)
        info |= {"method": "knn_shapley (Jia et al. 2019, exact)", "k": cfg.k}
    else:
        V.check_pool_size(len(train_idx), cfg.max_pool)
        util = V.NearestCentroidUtility(emb[tr], labels[tr], emb[va], labels[va], num_classes)
        values, run = V.tmc_shapley(
            util, permutations=cfg.permutations, tolerance=cfg.tolerance, convergence=cfg.convergence, seed=sel.seed
        )
        info |= {"method": "tmc_shapley (Ghorbani & Zou 2019, Alg. 1), nearest-centroid accuracy", **run}
    suspects = [train_idx[j] for j in V.lowest(values, cfg.suspect_fraction).tolist()]
    return Valued({i: float(v) for i, v in zip(train_idx, values.tolist())}, val_idx, suspects, info)
