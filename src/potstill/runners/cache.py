"""``potstill cache``: run the recipe's teacher once over its training data and store its signal;
``--append`` caches examples added since, ``--refresh`` brings the cache up to a changed teacher."""

from __future__ import annotations

import logging

from potstill.errors import PotstillError
from potstill.finished import (
    check_output_dir,
)
from potstill.recipes.distill import Recipe
from potstill.runners.prepare import Prepared, cache_spec

log = logging.getLogger("potstill")


def cache(
    recipe: Recipe,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    append: bool = False,
    refresh: bool = False,
    timings: dict | None = None,
) -> dict | None:
    """``potstill cache``: run the teacher over the recipe's training examples and store its signal.

    ``append``: the recipe's examples extend the cached ones; only the new ones are run.
    ``refresh``: the cache exists for these examples but the recipe's teacher changed; the
    examples whose drift exceeds ``cache.refresh`` are recomputed
    (:mod:`potstill.signals.cache.refresh`). Returns the manifest when the cache is complete,
    ``None`` while other ranks still work.
    """
    from potstill.signals.cache import write_cache

    if recipe.cache is None:
        raise PotstillError("the recipe has no `cache` section; add e.g. `cache: {signal: {kind: topk, k: 32}}`")
    if append and refresh:
        raise PotstillError(
            "--append and --refresh are two steps: append with the teacher that wrote the cache, then refresh"
        )
    check_output_dir(recipe.cache_dir, key="cache.dir")
    prep = Prepared(recipe)
    spec = cache_spec(recipe)
    if refresh:
        from potstill.signals.cache.refresh import DEFAULT_THRESHOLD, RefreshRule, refresh_cache

        r = recipe.cache.refresh
        rule = RefreshRule(
            threshold=DEFAULT_THRESHOLD if r.threshold is None and r.fraction is None else r.threshold,
            fraction=r.fraction,
            probe_tokens=r.probe_tokens,
        )
        return refresh_cache(
            prep.teacher,
            prep.tokenizer,
            prep.pool_examples,
            recipe.cache_dir,
            spec,
            rule,
            teacher_name=recipe.teacher.model,
            rank=rank,
            world_size=world_size,
            progress=progress,
            timings=timings,
        )
    return write_cache(
        prep.teacher,
        prep.tokenizer,
        prep.pool_examples,
        recipe.cache_dir,
        spec,
        teacher_name=recipe.teacher.model,
        append=append,
        rank=rank,
        world_size=world_size,
        progress=progress,
        timings=timings,
    )
