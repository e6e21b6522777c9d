"""A run's method is one tagged choice (``method: {kind: ...}``): each kind takes only its own options, one table
maps it to its trainer, recipes written before ``method:`` still load (with a FutureWarning) to the same run, and
the fingerprints of runs finished before the change are unchanged."""

import subprocess
import sys
import typing
import warnings

import pytest

from potstill.errors import PotstillError
from potstill.recipes.distill import recipe_from_dict
from potstill.recipes.methods import MethodConfig, RunConfig
from potstill.runners.train import METHODS, method_classes

# (old flat run keys, the same run as a method); the old shapes are those of recipes before `method:`.
PAIRS = [
    (
        {"on_policy": {"lmbda": 0.7, "replay_size": 8, "replay_reuse": 0.5}},
        {"kind": "on_policy", "lmbda": 0.7, "replay_size": 8, "replay_reuse": 0.5},
    ),
    (
        {
            "divergence": {"name": "skew_forward_kl", "alpha": 0.1},
            "on_policy": {"max_new_tokens": 16, "contrastive": {"beta_end": 1.5, "adaptive_skew": True}},
        },
        {"kind": "distillm2", "max_new_tokens": 16, "beta_end": 1.5, "adaptive_skew": True},
    ),
    ({"divergence": {"name": "reverse_kl"}, "on_policy": {"minillm": {"mix": 0.3}}}, {"kind": "minillm", "mix": 0.3}),
    (
        {"feature": {"layers": [[1, 2]], "loss": "cosine"}, "multi_teacher": {"mode": "select"}},
        {"kind": "feature", "layers": [[1, 2]], "loss": "cosine", "multi_teacher": {"mode": "select"}},
    ),
    (
        {"cross_tokenizer": {"method": "uld", "max_teacher_length": 64}},
        {"kind": "cross_tokenizer", "align": "uld", "max_teacher_length": 64},
    ),
    (
        {"token_weighting": "student_entropy", "curriculum": "easy_to_hard"},
        {"kind": "kd", "token_weighting": "student_entropy", "curriculum": "easy_to_hard"},
    ),
]


@pytest.mark.parametrize("old,method", PAIRS, ids=[m["kind"] for _, m in PAIRS])
def test_old_flat_keys_translate_to_the_same_run_with_a_warning(old, method):
    rest = {k: v for k, v in old.items() if k == "divergence"}
    with pytest.warns(FutureWarning, match=f"method: {{kind: {method['kind']}"):
        translated = RunConfig(name="r", **old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new shape loads without a warning
        new = RunConfig(name="r", method=method, **rest)
    assert translated == new and new.method.kind == method["kind"]
    assert RunConfig.model_validate(new.model_dump(mode="json")) == new  # the written recipe reads back


def test_fingerprint_shape_of_runs_finished_before_the_method_key():
    """The run part of a fingerprint, as the code before ``method:`` wrote it (pinned here, field by field)."""
    run = RunConfig(name="g", method={"kind": "on_policy", "lmbda": 0.7, "replay_size": 8, "replay_reuse": 0.5})
    on_policy = {
        "lmbda": 0.7,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 32,
        "replay_size": 8,
        "replay_reuse": 0.5,
        "adaptive": False,
        "adaptive_step": 0.1,
        "adaptive_max": 1.0,
        "adaptive_every": 10,
        "validation_size": 16,
        "contrastive": None,
        "minillm": None,
    }
    assert run.flat_dump() == {
        "name": "g",
        "alpha": 0.0,
        "divergence": {"name": "forward_kl"},
        "temperature": 1.0,
        "scale_t2": False,
        "on_policy": on_policy,
        "token_weighting": "none",
        "token_weighting_ratio": 0.5,
        "schedule": None,
        "feature": None,
        "multi_teacher": None,
        "curriculum": "none",
        "cross_tokenizer": None,
    }
    plain = RunConfig(name="sft", alpha=1.0).flat_dump()
    assert plain["on_policy"] is None and plain["cross_tokenizer"] is None and plain["feature"] is None
    cross = RunConfig(name="c", method={"kind": "cross_tokenizer", "align": "uld"}).flat_dump()["cross_tokenizer"]
    assert cross == {"method": "uld", "kinds": ["exact", "normalized", "mined"], "max_teacher_length": None}


@pytest.mark.parametrize(
    "method,key",
    [
        ({"kind": "minillm", "token_weighting": "teacher_confidence"}, "token_weighting"),
        ({"kind": "distillm2", "multi_teacher": {"mode": "mean"}}, "multi_teacher"),
        ({"kind": "distillm2", "lmbda": 0.5}, "lmbda"),
        ({"kind": "cross_tokenizer", "curriculum": "easy_to_hard"}, "curriculum"),
        ({"kind": "kd", "lmbda": 0.5}, "lmbda"),
        ({"kind": "feature", "layers": [[1, 1]], "replay_size": 4}, "replay_size"),
    ],
)
def test_a_method_refuses_the_options_of_another_naming_the_key(method, key):
    runs = [{"name": "r", "divergence": {"name": "reverse_kl"}, "method": method}]
    with pytest.raises(PotstillError, match=rf"^recipe key 'runs\.0\.method\.{key}' is not a known option"):
        recipe_from_dict({"runs": runs})


def test_old_combinations_keep_their_messages():
    with pytest.raises(PotstillError, match="cross_tokenizer cannot be combined with on_policy"):
        recipe_from_dict({"runs": [{"name": "r", "cross_tokenizer": {}, "on_policy": {}}]})
    with pytest.raises(PotstillError, match="on_policy and feature cannot be combined"):
        recipe_from_dict({"runs": [{"name": "r", "feature": {"layers": [[1, 1]]}, "on_policy": {}}]})
    with pytest.raises(PotstillError, match="states its method once"):
        recipe_from_dict({"runs": [{"name": "r", "on_policy": {}, "method": {"kind": "on_policy"}}]})


def test_every_method_kind_has_its_trainer():
    from potstill.kd import KDConfig, KDTrainer

    kinds = {typing.get_args(m.model_fields["kind"].annotation)[0] for m in typing.get_args(MethodConfig)[0].__args__}
    assert kinds == set(METHODS)
    for kind in METHODS:
        extra = {"divergence": {"name": "reverse_kl"}} if kind == "minillm" else {}
        method = {"kind": kind, **({"layers": [[1, 1]]} if kind == "feature" else {})}
        config, trainer = method_classes(RunConfig(name="r", method=method, **extra))
        assert issubclass(config, KDConfig) and issubclass(trainer, KDTrainer), kind
    assert method_classes(RunConfig(name="r"))[1] is KDTrainer


def test_bad_method_kind_on_the_command_line_is_one_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "potstill",
        "distill",
        "recipes/demo.yaml",
        f"output_dir={tmp_path}/o",
        "runs.1.method={kind: bogus}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "recipe key 'runs.1.method.kind' is 'bogus'; use one of" in out.stderr
    assert not (tmp_path / "o").exists()


def test_the_command_line_prints_a_deprecation_once_and_only_for_a_recipe_that_loads(tmp_path, capsys):
    from potstill.cli import _load_recipe

    old = tmp_path / "old.yaml"
    old.write_text("runs:\n  - {name: g, on_policy: {lmbda: 0.5}}\n  - {name: h, on_policy: {lmbda: 0.5}}\n")
    recipe = _load_recipe(old, [], verb="distill")
    assert recipe.runs[0].method.kind == "on_policy"
    err = capsys.readouterr().err.splitlines()
    assert err == [err[0]] and err[0].startswith("warning: run keys ['on_policy'] are deprecated"), err
    with pytest.raises(PotstillError, match="less than or equal to 1"):
        _load_recipe(old, ["runs.0.on_policy.lmbda=2"], verb="distill")
    assert capsys.readouterr().err == ""  # a bad recipe gets its one error line alone
