"""Recipes: the pydantic schemas of every ``potstill`` verb, importable without torch.

A recipe file names its verb (``verb: distill``, the default when absent) and may state its format
``version: 1``. :func:`load_recipe` reads one, applies ``key=value`` overrides and validates it against one
discriminated union on ``verb``; :func:`recipe_schema` is the JSON schema of a verb's recipe, for editors.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from potstill.errors import PotstillError
from potstill.recipes.base import RecipeFile, apply_overrides, format_validation_error, read_recipe_file

# verb -> the module whose ``RECIPE`` is that verb's schema (a RecipeFile, or a union of them on ``kind``).
VERBS: dict[str, str] = {
    "distill": "potstill.recipes.distill",
    "classify": "potstill.recipes.classify",
    "select": "potstill.recipes.select",
    "condense": "potstill.recipes.condense",
    "eval-data": "potstill.recipes.eval_data",
    "synthesize": "potstill.recipes.synthesize",
    "distill-vlm": "potstill.recipes.distill_vlm",
    "explain": "potstill.recipes.explain",
}

# Verbs that run a distill recipe.
DISTILL_VERBS = ("distill", "cache", "eval", "demo", "compare")


def recipe_type(verb: str) -> Any:
    """The schema (a pydantic type) of ``verb``'s recipe."""
    return importlib.import_module(VERBS[verb]).RECIPE


def _verb_of(data: Any) -> str:
    return data.get("verb", "distill") if isinstance(data, dict) else getattr(data, "verb", "distill")


@cache
def _adapter() -> TypeAdapter:
    members = tuple(Annotated[recipe_type(v), Tag(v)] for v in VERBS)
    return TypeAdapter(Annotated[Union[members], Discriminator(_verb_of)])  # type: ignore[arg-type]  # noqa: UP007


def _defaults(verb: str) -> Any:
    """The verb's embedded default recipe as JSON (sections an override may fill), when it has one."""
    if verb not in VERBS:
        return None
    kind = recipe_type(verb)
    try:
        return kind().model_dump(mode="json")
    except (TypeError, ValidationError):
        return None


def recipe_from_dict(
    data: dict | None, overrides: Sequence[str] = (), base_dir: Path | None = None, verb: str | None = None
) -> RecipeFile:
    """Validate a recipe mapping (with ``key=value`` overrides) against the union of every verb's schema."""
    want = "distill" if verb in DISTILL_VERBS else verb
    data = dict(data or {})
    data = apply_overrides(data, overrides, defaults=_defaults(str(data.get("verb") or want or "distill")))
    stated = data.get("verb")
    if stated is not None and stated not in VERBS:
        raise PotstillError(f"recipe key 'verb' is '{stated}'; use one of {sorted(VERBS)}")
    if stated is not None and want is not None and stated != want:
        raise PotstillError(
            f"recipe key 'verb' is '{stated}' but this is `potstill {verb}`; run `potstill {stated}` with this recipe"
        )
    chosen = stated or want or "distill"
    data.setdefault("verb", chosen)
    try:
        recipe = _adapter().validate_python(data)
    except ValidationError as err:
        # every location starts with the union's tag (the verb), which the recipe does not hold as a key
        raise PotstillError(format_validation_error(err, data, verb=chosen, tagged=True)) from None
    recipe.resolve_paths(base_dir)
    return recipe


def load_recipe(path: str | Path | None, overrides: Sequence[str] = (), verb: str | None = None) -> RecipeFile:
    """Read a YAML recipe file (``None``: the embedded distill default), apply ``key=value`` overrides and
    validate it. ``verb``: the command it is run by (a recipe naming another verb is refused in one line)."""
    if path is None:
        return recipe_from_dict({}, overrides, verb=verb)
    return recipe_from_dict(read_recipe_file(path), overrides, base_dir=Path(path).parent, verb=verb)


def recipe_schema(verb: str) -> dict:
    """The JSON schema of ``verb``'s recipe, with every field's description (for editors and the docs)."""
    if verb not in VERBS:
        raise PotstillError(f"'{verb}' is not a verb with a recipe; use one of {sorted(VERBS)}")
    return TypeAdapter(recipe_type(verb)).json_schema()


__all__ = ["DISTILL_VERBS", "VERBS", "load_recipe", "recipe_from_dict", "recipe_schema", "recipe_type"]
