"""``teacher.device`` / ``teacher.device_map``: a teacher placed on its own gives the student of one that is not.

On this CPU machine the offload path is the one to test for real: accelerate keeps some of the teacher's
modules on disk (their parameters on ``meta`` outside their forward), the output head among them, which
the chunked reducer reads directly and so must get from the offload store.
"""

import json

import pytest
import torch
from helpers import recipe, write
from safetensors.torch import load_file

from potstill.cli import main
from potstill.fingerprints import weights_fingerprint
from potstill.models import load_model
from potstill.models.placement import head_on, input_device

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny 2-layer Llama teacher: its second layer and its output head on disk, the rest in CPU RAM
OFFLOAD = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def test_an_offloaded_teacher_reads_like_the_whole_one(assets, tmp_path):
    _, teacher_dir, *_ = assets
    whole, _ = load_model(teacher_dir)
    spread, _ = load_model(teacher_dir, device_map=OFFLOAD, offload_folder=str(tmp_path / "offload"))
    assert spread.lm_head.weight.device.type == "meta"  # offloaded: not readable as a parameter
    head = head_on(spread, torch.device("cpu"))
    assert torch.equal(head.weight, whole.lm_head.weight)
    assert input_device(spread) == torch.device("cpu")
    assert weights_fingerprint(spread) == weights_fingerprint(whole)  # a cache keyed by it stays valid
    ids = torch.tensor([[5, 9, 17, 3, 44]])
    assert torch.equal(spread(ids).logits, whole(ids).logits)


@pytest.mark.parametrize("placement", [{"device_map": OFFLOAD}, {"device": "cpu"}], ids=["offloaded", "device"])
def test_a_placed_teacher_trains_and_evaluates_the_same_student(assets, tmp_path, placement):
    """The whole distill verb (live-teacher KD, eval_steps during training, the final evaluation): the same loss
    curve, the same held-out figures and the same student as with the teacher loaded whole on the student's
    device."""
    outs = {}
    for name, extra in (("plain", {}), ("placed", placement)):
        out = tmp_path / name
        teacher = {"model": str(assets[1]), **extra}
        if "device_map" in extra:
            teacher["offload_folder"] = str(tmp_path / "offload")
        r = recipe(
            assets,
            out,
            teacher=teacher,
            **{"train.eval_steps": 2, "runs": [{"name": "kd", "alpha": 0.2, "divergence": {"name": "forward_kl"}}]},
        )
        assert main(["distill", str(write(tmp_path / f"{name}.yaml", r))]) == 0
        outs[name] = out
    a, b = (json.loads((outs[n] / "runs" / "kd" / "train_info.json").read_text()) for n in ("plain", "placed"))
    assert a["loss_curve"] == b["loss_curve"] and a["eval_history"] == b["eval_history"]
    ma, mb = (json.loads((outs[n] / "metrics.json").read_text())["runs"] for n in ("plain", "placed"))
    for run in ("teacher", "kd"):
        for key in ("forward_kl", "top1_agreement", "perplexity"):
            assert ma[run][key] == pytest.approx(mb[run][key], rel=1e-6), (run, key)
    wa, wb = (load_file(outs[n] / "runs" / "kd" / "model.safetensors") for n in ("plain", "placed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "patch,words",
    [
        ({"teacher.device": "cpu", "teacher.device_map": "auto"}, "both place the teacher"),
        ({"teacher.offload_folder": "x"}, "go with teacher.device_map"),
        ({"teacher.device": "cuda:1"}, "CUDA is not available"),
        ({"teacher.device_map": "auto", "train.distributed": "fsdp2"}, "sharded over the processes instead"),
    ],
)
def test_bad_placement_is_one_line_exit_2(assets, tmp_path, capsys, patch, words):
    r = recipe(assets, tmp_path / "out", **patch)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_where_the_teacher_runs_does_not_change_the_run_fingerprint():
    """A finished student stays valid when only the teacher's placement changes; keys left at their defaults
    (packing off, the hf generation backend) leave the fingerprints of earlier versions as they were."""
    from potstill.finished import run_fingerprint
    from potstill.recipes.distill import Recipe

    plain = Recipe()
    placed = Recipe(teacher={"device_map": "auto", "max_memory": {0: "10GiB", "cpu": "30GiB"}})
    fp = run_fingerprint(plain, plain.runs[0])
    assert fp == run_fingerprint(placed, placed.runs[0])
    assert "packing" not in fp["data"] and "generation" not in fp
    packed = Recipe(data={"packing": True})
    assert run_fingerprint(packed, packed.runs[0])["data"]["packing"] is True
    vllm = Recipe(generation={"backend": "vllm"})
    assert run_fingerprint(vllm, vllm.runs[0])["generation"] == {"backend": "vllm", "mode": "colocate"}
