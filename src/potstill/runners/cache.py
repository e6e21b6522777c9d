"""``potstill cache``: run the recipe's teacher once over its training data and store its signal."""

from __future__ import annotations

import logging

from potstill.errors import PotstillError
from potstill.finished import (
    check_output_dir,
)
from potstill.recipes.distill import Recipe
from potstill.runners.prepare import Prepared, cache_spec

log = logging.getLogger("potstill")


def cache(recipe: Recipe, *, rank: int = 0, world_size: int = 1, progress: bool = True) -> dict | None:
    """``potstill cache``: run the teacher over the recipe's training examples and store its signal.

    Returns the manifest when the cache is complete, ``None`` while other ranks still work.
    """
    from potstill.signals.cache import write_cache

    if recipe.cache is None:
        raise PotstillError("the recipe has no `cache` section; add e.g. `cache: {signal: {kind: topk, k: 32}}`")
    check_output_dir(recipe.cache_dir, key="cache.dir")
    prep = Prepared(recipe)
    spec = cache_spec(recipe)
    return write_cache(
        prep.teacher,
        prep.tokenizer,
        prep.pool_examples,
        recipe.cache_dir,
        spec,
        teacher_name=recipe.teacher.model,
        rank=rank,
        world_size=world_size,
        progress=progress,
    )
