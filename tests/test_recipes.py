"""Every recipe in recipes/ validates, and the embedded default equals recipes/demo.yaml."""

from pathlib import Path

import pytest
import yaml

from potstill.config import Recipe, dump_recipe, load_recipe, recipe_from_dict
from potstill.errors import PotstillError

ALL = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# Recipes of the task verbs (potstill classify | select | synthesize | condense | eval-data) are their own kind.
TASK_PREFIXES = {
    "classify_": ("potstill.kd.classifier", "load_classifier_recipe"),
    "select_": ("potstill.dd.pipeline", "load_select_recipe"),
    "synthesize_": ("potstill.dd.synthesize", "load_synthesis_config"),
    "condense_": ("potstill.dd.condense_recipe", "load_condense_recipe"),
    "eval_data_": ("potstill.dd.eval_data", "load_eval_data_recipe"),
}
TASK_RECIPES = [p for p in ALL if p.name.startswith(tuple(TASK_PREFIXES))]
RECIPES = [p for p in ALL if p not in TASK_RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_its_data_exists(path):
    r = load_recipe(path)
    if r.data.source.kind == "file":
        assert Path(r.data.source.path).is_file(), r.data.source.path


@pytest.mark.parametrize("path", TASK_RECIPES, ids=lambda p: p.name)
def test_task_recipe_validates_with_its_verb(path):
    import importlib

    module, loader = next(v for k, v in TASK_PREFIXES.items() if path.name.startswith(k))
    assert getattr(importlib.import_module(module), loader)(path) is not None
    with pytest.raises(PotstillError):
        getattr(importlib.import_module(module), loader)(path, ["no_such_key=1"])


def test_every_task_verb_has_recipes():
    from potstill.cli import TASKS

    verbs = {next(k for k in TASK_PREFIXES if p.name.startswith(k))[:-1].replace("_", "-") for p in TASK_RECIPES}
    assert verbs == set(TASKS)


def test_embedded_default_is_recipes_demo():
    assert load_recipe(ALL[0].parent / "demo.yaml") == Recipe()


def test_resolved_recipe_round_trips():
    r = recipe_from_dict({}, ["train.max_steps=7", "runs.1.divergence={name: generalized_jsd, beta: 0.3}"])
    assert r.train.max_steps == 7 and r.runs[1].divergence.beta == 0.3
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_override_into_missing_index_is_refused():
    with pytest.raises(PotstillError, match="not an index"):
        recipe_from_dict({}, ["runs.9.alpha=0.5"])
