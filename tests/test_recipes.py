"""Every recipe in recipes/ names its verb and loads through ``potstill.load_recipe``; the embedded default equals
recipes/demo.yaml; every verb exports a JSON schema with its fields' descriptions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import potstill
from potstill.errors import PotstillError
from potstill.recipes import VERBS, recipe_schema
from potstill.recipes.distill import Recipe, dump_recipe, recipe_from_dict

ALL = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _verb(path: Path) -> str:
    return yaml.safe_load(path.read_text())["verb"]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_recipe_names_its_verb_and_loads(path):
    verb = _verb(path)
    assert verb in VERBS
    r = potstill.load_recipe(path, verb=verb)
    assert r.verb == verb and isinstance(r, potstill.recipes.base.RecipeFile)
    if verb == "distill" and r.data.source.kind == "file":
        assert Path(r.data.source.path).is_file(), r.data.source.path
    with pytest.raises(PotstillError, match="no_such_key"):
        potstill.load_recipe(path, ["no_such_key=1"])


def test_a_recipe_run_by_another_verb_is_refused_naming_both():
    other = next(p for p in ALL if _verb(p) != "distill")
    with pytest.raises(PotstillError, match=f"`potstill {_verb(other)}`"):
        potstill.load_recipe(other, verb="distill")
    with pytest.raises(PotstillError, match="recipe key 'verb' is 'nope'"):
        potstill.load_recipe(ALL[0].parent / "demo.yaml", ["verb=nope"])


def test_every_task_verb_has_a_recipe_and_a_cli_verb():
    from potstill.cli import TASKS

    assert {_verb(p) for p in ALL} == set(VERBS) == {"distill", *TASKS}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_schema_of_every_verb_carries_field_descriptions(verb):
    schema = recipe_schema(verb)
    text = json.dumps(schema)
    assert '"description"' in text and '"verb"' in text
    json.loads(text)


def test_schema_cli_prints_json_and_refuses_an_unknown_verb():
    ok = subprocess.run([sys.executable, "-m", "potstill", "schema", "distill"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["properties"]["verb"]["const"] == "distill"
    bad = subprocess.run([sys.executable, "-m", "potstill", "schema", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'nope' is not a verb" in bad.stderr


def test_recipes_import_without_torch():
    code = "import sys, potstill.recipes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_embedded_default_is_recipes_demo():
    assert potstill.load_recipe(ALL[0].parent / "demo.yaml") == Recipe()


def test_resolved_recipe_round_trips():
    r = recipe_from_dict({}, ["train.max_steps=7", "runs.1.divergence={name: generalized_jsd, beta: 0.3}"])
    assert r.train.max_steps == 7 and r.runs[1].divergence.beta == 0.3
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_override_into_missing_index_is_refused():
    with pytest.raises(PotstillError, match="not an index"):
        recipe_from_dict({}, ["runs.9.alpha=0.5"])
