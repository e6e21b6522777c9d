"""Temporary: the distill recipe moved to :mod:`potstill.recipes`; this module goes once every importer moved."""

from potstill.paths import DATA_VAR  # noqa: F401
from potstill.recipes.base import *  # noqa: F401,F403
from potstill.recipes.base import Strict as _Strict  # noqa: F401
from potstill.recipes.base import apply_overrides, key_path as _key_path, override_value as _override_value  # noqa: F401
from potstill.recipes.distill import *  # noqa: F401,F403
from potstill.recipes.divergences import *  # noqa: F401,F403
from potstill.recipes.divergences import _Div  # noqa: F401
from potstill.recipes.methods import *  # noqa: F401,F403
from potstill.recipes.options import *  # noqa: F401,F403
from potstill.recipes.train import *  # noqa: F401,F403
from potstill.recipes.methods import default_runs as _default_runs  # noqa: F401
from potstill.recipes.models import *  # noqa: F401,F403
from potstill.recipes.models import _ATTN, check_temperature as _check_temperature  # noqa: F401


def apply_plain_overrides(data, overrides, example="train.steps=10"):
    return apply_overrides(data, overrides, example=example)
