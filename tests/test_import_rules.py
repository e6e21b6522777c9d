"""The package's three bands hold: recipes (schemas) -> runners (orchestration) -> algorithms, never upward.

Every ``import`` counts, also one inside a function (which is how a circle hides). Rules:

* ``potstill.recipes`` imports nothing of potstill but itself, :mod:`potstill.errors`, :mod:`potstill.paths` and
  the divergences' parameter checks (:mod:`potstill.divergences.params`), so it loads without torch;
* algorithms (every other module but ``runners``, ``cli``, ``__main__`` and the package's ``__init__``) never
  import a recipe, a runner or the command line: they take plain arguments;
* runners never import the command line;
* no import circle between modules;
* no ``from module import _private`` across modules.

The checker is run on a planted tree too, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
RECIPES_MAY_IMPORT = ("potstill.recipes", "potstill.errors", "potstill.paths", "potstill.divergences.params")
TOP = ("potstill", "potstill.__main__", "potstill.cli")


def modules(src: Path, package: str = "potstill") -> dict[str, Path]:
    out = {}
    for p in (src / package).rglob("*.py"):
        parts = p.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int, bool]]:
    """(imported module, imported name or None, line, whether it runs) for every import in the file, relative
    ones resolved; a ``from package import submodule`` counts as importing the submodule. An import under
    ``if TYPE_CHECKING:`` does not run (it cannot close a circle) but still counts for the bands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    found = []
    for node in ast.walk(tree):
        runs = id(node) not in typing_only
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno, runs) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub, None, node.lineno, runs) if sub in known else (base, a.name, node.lineno, runs))
    return found


def band(module: str) -> str:
    if module.startswith("potstill.recipes"):
        return "recipes"
    if module.startswith("potstill.runners"):
        return "runners"
    return "top" if module in TOP else "algorithms"


def violations(src: Path, package: str = "potstill") -> list[str]:
    known = modules(src, package)
    edges: dict[str, set[str]] = {m: set() for m in known}
    bad = []
    for mod, path in known.items():
        for target, name, line, runs in imports(mod, path, known):
            if not (target == package or target.startswith(package + ".")):
                continue
            where = f"{path.relative_to(src)}:{line}"
            if target in known and target != mod and runs:
                edges[mod].add(target)
            if name and name.startswith("_") and not name.startswith("__") and target != mod:
                bad.append(f"{where}: private name {name} imported from {target}")
            src_band, dst_band = band(mod.replace(package, "potstill", 1)), band(target.replace(package, "potstill", 1))
            generic = "potstill" + target[len(package) :]
            if src_band == "recipes" and not generic.startswith(RECIPES_MAY_IMPORT) and generic != "potstill":
                bad.append(f"{where}: recipes import {target}")
            if src_band == "algorithms" and (dst_band in ("recipes", "runners") or generic == "potstill.cli"):
                bad.append(f"{where}: algorithm module {mod} imports {target} ({dst_band})")
            if src_band == "runners" and generic == "potstill.cli":
                bad.append(f"{where}: runner {mod} imports the command line")
    return bad + [f"import circle: {' -> '.join(c)}" for c in circles(edges)]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_potstill_keeps_its_import_rules():
    assert violations(SRC) == []


def test_the_checker_catches_each_planted_violation(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/errors.py": "",
        "pkg/recipes/__init__.py": "",
        "pkg/recipes/a.py": "from pkg.errors import x\nfrom pkg.kd import trainer\n",
        "pkg/runners/__init__.py": "",
        "pkg/runners/run.py": "def f():\n    from pkg import cli\n",
        "pkg/cli.py": "from pkg.runners import run\n",
        "pkg/kd/__init__.py": "",
        "pkg/kd/trainer.py": "def f():\n    from ..recipes.a import Recipe\n",
        "pkg/dd/__init__.py": "",
        "pkg/dd/one.py": "from . import two\n",
        "pkg/dd/two.py": "def g():\n    from pkg.dd.one import _helper\n",
        "pkg/dd/three.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.dd.four import A\n",
        "pkg/dd/four.py": "from pkg.dd import three\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    found = violations(tmp_path, "pkg")
    expect = [
        "pkg/recipes/a.py:2: recipes import pkg.kd.trainer",
        "pkg/runners/run.py:2: runner pkg.runners.run imports the command line",
        "pkg/kd/trainer.py:2: algorithm module pkg.kd.trainer imports pkg.recipes.a (recipes)",
        "pkg/dd/two.py:2: private name _helper imported from pkg.dd.one",
        "import circle: pkg.dd.one -> pkg.dd.two",
        "import circle: pkg.cli -> pkg.runners.run",
        "import circle: pkg.kd.trainer -> pkg.recipes.a",
    ]
    assert sorted(found) == sorted(expect)
