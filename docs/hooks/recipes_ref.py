"""mkdocs hook: render the recipe reference (docs/recipes.md) from the pydantic schemas at build time.

For every verb in ``potstill.recipes.VERBS`` it takes ``potstill.recipes.recipe_schema(verb)`` (a JSON schema
with ``$defs``) and writes one table per section (section / key / type / default / description) in place of
the marker below. Nothing is written to disk: the page's markdown is replaced in memory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- recipes-reference -->"
PAGE = "recipes.md"


def _import_recipes() -> Any:
    try:
        import potstill.recipes as recipes
    except ImportError:  # not installed: read it from the checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
        import potstill.recipes as recipes
    return recipes


def _cell(text: Any) -> str:
    """One table cell: a single line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


class _Renderer:
    """Walk one verb's schema; every ``$defs`` object becomes one section, rendered once (later uses link to it)."""

    def __init__(self, verb: str, schema: dict) -> None:
        self.verb = verb
        self.defs: dict[str, dict] = schema.get("$defs", {})
        self.root = schema
        self.anchor: dict[str, str] = {}  # def name -> section anchor
        self.queue: list[tuple[str, str]] = []  # (def name, section path)
        self.out: list[str] = []

    # --- types -------------------------------------------------------------------------------------------------
    def _ref_name(self, node: dict) -> str | None:
        ref = node.get("$ref", "")
        return ref.rsplit("/", 1)[-1] if ref.startswith("#/$defs/") else None

    def _link(self, name: str, path: str) -> str:
        if name not in self.anchor:
            definition = self.defs.get(name, {})
            if definition.get("type") == "object" or "properties" in definition:
                anchor = _slug(self.verb, path)
                while anchor in self.anchor.values():
                    anchor += "-x"
                self.anchor[name] = anchor
                self.queue.append((name, path))
            else:
                return self._type(definition, path)
        return f"[{name}](#{self.anchor[name]})"

    def _type(self, node: dict, path: str) -> str:
        name = self._ref_name(node)
        if name:
            return self._link(name, path)
        for key in ("oneOf", "anyOf"):
            if key in node:
                members = node[key]
                disc = node.get("discriminator", {}).get("propertyName")
                parts = []
                for member in members:
                    member_name = self._ref_name(member)
                    tag = ""
                    if disc and member_name:
                        const = self.defs.get(member_name, {}).get("properties", {}).get(disc, {}).get("const")
                        tag = f" ({disc}: {const})" if const is not None else ""
                    parts.append(self._type(member, f"{path}{tag}"))
                return " | ".join(parts)
        if "allOf" in node and len(node["allOf"]) == 1:
            return self._type(node["allOf"][0], path)
        if "const" in node:
            return f"`{json.dumps(node['const'])}`"
        if "enum" in node:
            return " | ".join(f"`{json.dumps(v)}`" for v in node["enum"])
        kind = node.get("type")
        if kind == "array":
            items = node.get("items")
            if isinstance(items, dict) and items:
                return f"list[{self._type(items, path + '[]')}]"
            prefix = node.get("prefixItems")
            if prefix:
                return "[" + ", ".join(self._type(i, path + "[]") for i in prefix) + "]"
            return "list"
        if kind == "object":
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                return f"dict[str, {self._type(extra, path + '.*')}]"
            return "mapping"
        if isinstance(kind, list):
            return " | ".join(kind)
        text = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}.get(kind, kind or "any")
        bounds = [
            f"{op} {node[key]}"
            for key, op in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
            if key in node
        ]
        return text + (f" ({', '.join(bounds)})" if bounds else "")

    # --- sections ----------------------------------------------------------------------------------------------
    def _table(self, node: dict, path: str) -> None:
        props = node.get("properties", {})
        required = set(node.get("required", []))
        if not props:
            self.out += ["_(no keys)_", ""]
            return
        self.out += ["| key | type | default | description |", "|---|---|---|---|"]
        for key, field in props.items():
            sub = f"{path}.{key}" if path else key
            kind = self._type(field, sub)
            if "default" in field:
                default = f"`{json.dumps(field['default'], ensure_ascii=False)}`"
            elif key in required:
                default = "**required**"
            else:
                default = "(built)"
            desc = field.get("description", "")
            self.out.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(desc)} |")
        self.out.append("")

    def _section(self, title: str, anchor: str, node: dict) -> None:
        self.out += [f"### `{title}` {{#{anchor}}}", ""]
        if node.get("description"):
            self.out += [_cell(node["description"]), ""]
        self._table(node, title if title != self.verb else "")

    def render(self) -> str:
        self.out += [f"## `potstill {self.verb}` {{#{_slug(self.verb)}}}", ""]
        root = self.root
        name = self._ref_name(root)
        if name and "properties" not in root:  # the schema is a reference to one of its $defs
            root = self.defs[name]
        if "properties" in root:
            self._section(self.verb, _slug(self.verb, "top"), root)
        else:  # a union of recipe kinds
            self.out += [f"One of: {self._type(root, self.verb)}", ""]
        while self.queue:
            name, path = self.queue.pop(0)
            self._section(path or name, self.anchor[name], self.defs[name])
        return "\n".join(self.out)


def render_reference() -> str:
    recipes = _import_recipes()
    parts = []
    for verb in recipes.VERBS:
        parts.append(_Renderer(verb, recipes.recipe_schema(verb)).render())
    return "\n\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE or MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render_reference())
