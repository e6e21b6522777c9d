"""Recipe options of issue 5 through `potstill distill`: token weighting, schedules, feature KD,
multi-teacher, curriculum; and the refusals that go with them."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import recipe, write

from potstill.cli import main


def test_every_method_runs_as_a_recipe(assets, tmp_path):  # noqa: F811
    root, teacher, *_ = assets
    out = tmp_path / "out"
    runs = [
        {"name": "plain", "alpha": 0.0},
        {"name": "conf", "alpha": 0.0, "token_weighting": "teacher_confidence"},
        {"name": "selective", "alpha": 0.0, "token_weighting": "student_entropy", "token_weighting_ratio": 0.5},
        {
            "name": "sched",
            "alpha": 0.5,
            "temperature": 2.0,
            "schedule": {"kind": "cosine", "alpha_end": 0.0, "temperature_end": 1.0},
        },
        {"name": "feat", "alpha": 0.0, "feature": {"layers": [[1, 2], [0, 0]], "loss": "cosine", "weight": 0.5}},
        {"name": "rel", "alpha": 0.0, "feature": {"relations": {"layers": [[1, 2]], "heads": 2}}},
        {"name": "multi", "alpha": 0.0, "multi_teacher": {"mode": "confidence", "confidence": "maxprob"}},
        {"name": "pick", "alpha": 0.0, "multi_teacher": {"mode": "select"}},
        {"name": "aware", "alpha": 0.0, "multi_teacher": {"mode": "student_aware", "tau": 0.5}},
        {"name": "curr", "alpha": 0.0, "curriculum": "easy_to_hard"},
    ]
    r = recipe(assets, out, runs=runs, extra_teachers=[{"model": str(teacher)}])
    r["eval"]["include_untrained"] = False
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(metrics) == {"teacher"} | {x["name"] for x in runs}
    for name, m in metrics.items():
        assert 0.0 <= m["ece"] <= 1.0, name
    info = json.loads((out / "runs" / "pick" / "train_info.json").read_text())
    # The extra teacher is the main teacher's own checkpoint, so the two teachers' mean CEs tie exactly on
    # every example and "select" (argmin, ties to the first) must credit all 3 steps x 2 examples to teacher 0;
    # which teacher wins on real differences is tested in tests/signals/test_multi.py.
    assert info["teacher_selected_examples"] == [6, 0]
    # student_aware: two copies of one teacher are understood equally well, so each gets half the weight
    aware = json.loads((out / "runs" / "aware" / "train_info.json").read_text())
    assert aware["teacher_mean_weights"] == pytest.approx([0.5, 0.5], abs=1e-6)
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["runs"][4]["method"] == {
        **resolved["runs"][4]["method"],
        "kind": "feature",
        "layers": [[1, 2], [0, 0]],
    }


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"runs": [{"name": "m", "alpha": 0.0, "multi_teacher": {"mode": "mean"}}]}, "extra_teachers is empty"),
        ({"runs": [{"name": "w", "alpha": 1.0, "token_weighting": "teacher_confidence"}]}, "act on the KD term"),
        ({"runs": [{"name": "f", "alpha": 0.0, "feature": {"layers": []}}]}, "runs.0.feature.layers"),
        ({"runs": [{"name": "c", "alpha": 0.0, "curriculum": "random"}]}, "runs.0.curriculum"),
        (
            {
                "runs": [{"name": "f", "alpha": 0.0, "feature": {"layers": [[0, 0]]}}],
                "cache": {"signal": {"kind": "topk"}},
            },
            "need live teachers",
        ),
        (
            {
                "runs": [{"name": "s", "alpha": 0.0, "schedule": {"temperature_end": 2.0}}],
                "cache": {"signal": {"kind": "topk"}},
            },
            "schedule the temperature",
        ),
        (
            {
                "runs": [{"name": "m", "alpha": 0.0, "multi_teacher": {"weights": [1, 2, 3]}}],
                "extra_teachers": [{"model": "x"}],
            },
            "3 entries for 2 teachers",
        ),
    ],
)
def test_bad_options_are_refused_at_load(assets, tmp_path, capsys, patch, message):  # noqa: F811
    r = recipe(assets, tmp_path / "out", **patch)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
