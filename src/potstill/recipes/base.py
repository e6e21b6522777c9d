"""What every recipe shares: the strict pydantic base, seeds, ``key=value`` overrides, YAML reading,
``$POTSTILL_DATA`` paths and the one-line error for a validation failure. Importable without torch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError

from potstill.errors import PotstillError


class Strict(BaseModel):
    # allow_inf_nan=False: a learning rate, temperature or divergence parameter of inf/NaN is refused at load
    # time; otherwise it trains a NaN student and exits 0.
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class RecipeFile(Strict):
    """A whole recipe file: its verb (the ``potstill`` command it is for) and format version, and what the verb
    needs. ``resolve_paths`` turns the file's paths into ones that work from anywhere."""

    version: Literal[1] = Field(1, description="The recipe format's version (1).")

    def resolve_paths(self, base_dir: Path | None) -> None:
        """Make ``$POTSTILL_DATA/...`` and recipe-relative paths absolute (``base_dir``: the recipe's folder)."""


SEED_MAX = 2**32 - 1


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


def key_path(loc: tuple, data: Any, absent_last: bool = False) -> str:
    """The recipe key of an error location, without pydantic's class names and union tags.

    A union tag is a location part the recipe does not hold: ``cache.signal.sampled.draws`` ->
    ``cache.signal.draws`` (also when the tag was defaulted, so the recipe names no ``kind``). Only
    the last part may legitimately be absent (``absent_last``: an unknown or a missing key)."""
    parts, node = [], data
    for i, p in enumerate(loc):
        if isinstance(p, str) and p[:1].isupper():
            continue
        last = i == len(loc) - 1
        nxt = None if last else loc[i + 1]
        if (
            isinstance(node, dict)
            and isinstance(p, str)
            and (
                (p not in node and not (last and absent_last))
                # a tag that is also a field name (student kind `layers` with a `layers` list)
                or (isinstance(nxt, str) and nxt in node and not isinstance(node.get(p), dict))
            )
        ):
            continue  # the tag of a discriminated union
        parts.append(str(p))
        if isinstance(node, dict):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            node = None
    return ".".join(parts) or "<recipe>"


def format_validation_error(err: ValidationError, data: Any = None, verb: str = "distill", tagged: bool = False) -> str:
    """One line naming the recipe key of the first problem and the fix, for every recipe kind
    (``verb``: the ``potstill`` command whose ``--help`` lists the options; ``tagged``: the error locations start
    with the tag of a union the recipe does not name, such as its verb)."""
    e = err.errors()[0]
    loc = key_path(e["loc"][1:] if tagged else e["loc"], data, absent_last=e["type"] in ("extra_forbidden", "missing"))
    # a callable discriminator's name is no help to the reader
    msg = re.sub(r" found using \w+\(\)", "", e["msg"].removeprefix("Value error, "))
    if e["type"] == "extra_forbidden":
        return f"recipe key '{loc}' is not a known option; remove it or fix its spelling (see `potstill {verb} --help`)"
    if e["type"] == "missing":
        return f"recipe key '{loc}' is required; add it to the recipe"
    if e["type"] == "union_tag_invalid":
        ctx = e.get("ctx") or {}
        key = str(ctx.get("discriminator", "")).strip("'")
        where = f"{loc}.{key}" if key.isidentifier() else loc  # a callable discriminator names no key
        return (
            f"recipe key '{where}' is '{ctx.get('tag')}'; use one of {ctx.get('expected_tags')}"
            if "expected_tags" in ctx
            else f"recipe key '{loc}': {msg}; use one of the listed values"
        )
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    if "; " in msg:  # the validator's message names its own fix: keep it last
        problem, fix = msg.split("; ", 1)
        return f"recipe key '{loc}': {problem}{more}; {fix}"
    return f"recipe key '{loc}': {msg}{more}; fix the value in the recipe"


def parse_override(item: str, example: str = "train.max_steps=10") -> tuple[list[str], Any]:
    if "=" not in item:
        raise PotstillError(f"override '{item}' is not key=value; write e.g. {example}")
    key, raw = item.split("=", 1)
    if not key:
        raise PotstillError(f"override '{item}' has an empty key; write e.g. {example}")
    return key.split("."), override_value(raw)


def override_value(raw: str) -> Any:
    """An override's value read as YAML; what YAML cannot read (``[1``, a 5,000-digit number) stays a string,
    which the schema then refuses in one line naming the key."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        return raw


def default_at(defaults: Any, path: list[str]) -> Any:
    """The value of ``defaults`` (a recipe's embedded default, as JSON) at ``path``, when it is a section or a
    list; else ``{}`` (so ``runs.1.alpha=...`` works on a recipe without runs)."""
    node = defaults
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return {}
    return node if isinstance(node, (dict, list)) else {}


def apply_overrides(
    data: dict, overrides: Sequence[str], defaults: Any = None, example: str = "train.max_steps=10"
) -> dict:
    """Dotted ``key=value`` overrides (the value read as YAML) into ``data``, in place. A missing section is
    taken from ``defaults`` (the recipe's embedded default) or created empty; a list item is named by its index."""
    for item in overrides:
        path, value = parse_override(item, example)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise PotstillError(f"override '{item}': '{part}' is not an index of {'.'.join(path[:i])}")
                node = node[int(part)]
            elif isinstance(node, dict):
                if part not in node or node[part] is None:
                    node[part] = copy.deepcopy(default_at(defaults, path[: i + 1]))
                node = node[part]
            else:
                raise PotstillError(f"override '{item}': '{path[i - 1]}' is not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise PotstillError(f"override '{item}': '{last}' is not an index of {'.'.join(path[:-1])}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise PotstillError(
                f"override '{item}': '{'.'.join(path[:-1])}' is not a section; override "
                f"'{'.'.join(path[:-1])}' itself or a key of a section"
            )
    return data


def read_recipe_file(path: str | Path, sections: str = "teacher, student, data, ...") -> dict:
    """The mapping in a YAML recipe file (``yaml.safe_load``; empty file: ``{}``), or a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise PotstillError(f"recipe file '{p}' does not exist; pass the path of a YAML recipe (see recipes/)")
    data = parse_recipe_text(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PotstillError(f"recipe '{p}' must be a YAML mapping of sections ({sections})")
    return data


def parse_recipe_text(p: Path) -> Any:
    """``yaml.safe_load`` of a recipe file, with every way it can fail as one line naming the file and the fix."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PotstillError(
            f"recipe '{p}' is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise PotstillError(
            f"recipe '{p}' cannot be read ({err.strerror}); check the path and its permissions"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PotstillError(f"recipe '{p}' is not valid YAML{where}; fix its syntax") from None
    except RecursionError:
        raise PotstillError(
            f"recipe '{p}' is nested too deeply to read; a recipe is a few levels of sections, fix its structure"
        ) from None
    except ValueError as err:  # e.g. Python's limit on the digits of an integer
        raise PotstillError(
            f"recipe '{p}' holds a value YAML cannot read ({str(err).splitlines()[0]}); fix that value"
        ) from None


# ------------------------------------------------------- verbs with two flavours (select, condense, eval-data)

DEFAULT_KIND = "classification"
"""The flavour of a select, condense or eval-data recipe that names no ``kind``."""
KINDS = ("classification", "causal_lm")


def kind_of(data: Any) -> str:
    """The flavour of a task recipe (a mapping or a model): its ``kind``, else :data:`DEFAULT_KIND`."""
    kind = data.get("kind") if isinstance(data, dict) else getattr(data, "kind", None)
    # an unknown kind is checked by the default flavour, whose error names the key `kind`
    return kind if kind in KINDS else DEFAULT_KIND


def by_kind(classification: type, causal_lm: type) -> Any:
    """A verb's schema with two flavours: the union of both models, chosen by :func:`kind_of`."""
    return Annotated[
        Union[Annotated[classification, Tag("classification")], Annotated[causal_lm, Tag("causal_lm")]],  # noqa: UP007
        Discriminator(kind_of),
    ]


def read_source(source: str | Path | dict, sections: str) -> dict:
    """A recipe mapping: a copy of ``source`` when it is one, else the YAML file it names (``sections``: what
    a mapping holds, for the error of a file that is not one)."""
    return copy.deepcopy(source) if isinstance(source, dict) else read_recipe_file(source, sections)


def validate_recipe(schema: Any, data: dict, verb: str, base_dir: Path | None = None) -> Any:
    """``data`` validated against ``schema`` (a model or a :func:`by_kind` union), its paths resolved;
    any problem raises one :class:`PotstillError` line naming the key."""
    try:
        recipe = TypeAdapter(schema).validate_python(data)
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, verb)) from None
    recipe.resolve_paths(base_dir)
    return recipe
