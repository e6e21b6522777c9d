"""Every recipe in recipes/ validates, and the embedded default equals recipes/demo.yaml."""

from pathlib import Path

import pytest
import yaml

from potstill.config import Recipe, dump_recipe, load_recipe, recipe_from_dict
from potstill.errors import PotstillError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_its_data_exists(path):
    r = load_recipe(path)
    if r.data.source.kind == "file":
        assert Path(r.data.source.path).is_file(), r.data.source.path


def test_embedded_default_is_recipes_demo():
    assert load_recipe(RECIPES[0].parent / "demo.yaml") == Recipe()


def test_resolved_recipe_round_trips():
    r = recipe_from_dict({}, ["train.max_steps=7", "runs.1.divergence={name: generalized_jsd, beta: 0.3}"])
    assert r.train.max_steps == 7 and r.runs[1].divergence.beta == 0.3
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_override_into_missing_index_is_refused():
    with pytest.raises(PotstillError, match="not an index"):
        recipe_from_dict({}, ["runs.9.alpha=0.5"])
