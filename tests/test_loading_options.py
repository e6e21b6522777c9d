"""Loading options for teacher and student: the attention kernel, and a quantized teacher (refused off CUDA)."""

import json

import pytest
import torch
from helpers import recipe, write

from potstill.cli import main
from potstill.finished import run_fingerprint
from potstill.recipes.distill import Recipe
from potstill.runners.prepare import Prepared


def test_attention_kernel_reaches_teacher_and_student_and_changes_no_logit(assets, tmp_path):
    """eager and sdpa are two kernels for one function: the teacher's logits agree to float32 rounding."""
    base = recipe(assets, tmp_path / "out")
    eager = Recipe.model_validate(
        recipe(
            assets, tmp_path / "out", **{"teacher.attn_implementation": "eager", "student.attn_implementation": "eager"}
        )
    )
    prep = Prepared(eager)
    assert prep.teacher.config._attn_implementation == "eager"
    assert prep.student0.config._attn_implementation == "eager"
    plain = Prepared(Recipe.model_validate(base))
    assert plain.teacher.config._attn_implementation == "sdpa"
    ids = torch.tensor([prep.train_examples[0]["input_ids"]])
    with torch.no_grad():
        a = prep.teacher(input_ids=ids).logits
        b = plain.teacher(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # An unset option leaves the run's fingerprint as it was before the option existed; a set one enters it.
    run = eager.runs[0]
    assert "attn_implementation" not in run_fingerprint(plain.recipe, plain.recipe.runs[0])["teacher"]
    assert run_fingerprint(eager, run)["teacher"]["attn_implementation"] == "eager"


@pytest.mark.parametrize(
    "patch, expected",
    [
        (
            {"teacher.quantization": {"bits": 4}},
            "teacher: quantization 4-bit runs on CUDA through bitsandbytes, not on cpu",
        ),
        (
            {"teacher.attn_implementation": "flash_attention_2"},
            "attn_implementation flash_attention_2 cannot be used here",
        ),
        (
            {"student.attn_implementation": "flash_attention_2"},
            "student: attn_implementation flash_attention_2 cannot be used here",
        ),
    ],
    ids=["quantized teacher on cpu", "flash attention teacher", "flash attention student"],
)
def test_a_loading_option_this_machine_cannot_run_is_refused_in_one_line(assets, tmp_path, capsys, patch, expected):
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **patch))
    assert main(["distill", str(rp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_a_recipe_with_an_attention_kernel_distills(assets, tmp_path):
    out = tmp_path / "out"
    rp = write(
        tmp_path / "r.yaml",
        recipe(
            assets,
            out,
            **{
                "teacher.attn_implementation": "eager",
                "student.attn_implementation": "eager",
                "runs": [{"name": "kd", "alpha": 0.5}],
            },
        ),
    )
    assert main(["distill", str(rp)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(metrics) >= {"teacher", "kd"} and metrics["kd"]["forward_kl"] > 0
