"""potstill: knowledge distillation and dataset distillation for large language models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_recipe(path: Any, overrides: Any = (), verb: str | None = None) -> Any:
    """Read, override and validate a recipe file of any verb: :func:`potstill.recipes.load_recipe`."""
    from potstill.recipes import load_recipe as load

    return load(path, overrides, verb=verb)


__all__ = ["__version__", "load_recipe"]
