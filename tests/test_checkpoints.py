"""``train.save_steps``: a run killed with SIGKILL and rerun ends with the student of a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import recipe, write
from helpers_proc import launch_env
from safetensors.torch import load_file

from potstill.cli import main

STEPS = {
    "train.max_steps": 12,
    "train.save_steps": 2,
    "train.logging_steps": 1,
    "runs": [{"name": "kd", "alpha": 0.2, "divergence": {"name": "forward_kl"}}],
}
# GKD with a replay buffer: a share of the steps on fresh student samples, some on replayed ones; the choices come
# from the trainer's own RNG and the samples from a seed that counts the steps, both restored from the checkpoint.
ON_POLICY = {
    **STEPS,
    "runs": [
        {
            "name": "kd",
            "alpha": 0.0,
            "divergence": {"name": "generalized_jsd", "beta": 0.5},
            "on_policy": {"lmbda": 0.8, "replay_size": 4, "replay_reuse": 0.7, "max_new_tokens": 6},
        }
    ],
}

# DistiLLM-2 with adaptive skews and a beta ramp: its frozen skew anchors, set at the first step, drive every later
# step's loss; MiniLLM: teacher-mixed samples every step, its reward statistics logged per interval.
DISTILLM2 = {
    **STEPS,
    "runs": [
        {
            "name": "kd",
            "alpha": 0.0,
            "divergence": {"name": "skew_forward_kl", "alpha": 0.1},
            "on_policy": {
                "max_new_tokens": 6,
                "replay_size": 4,
                "replay_reuse": 0.5,
                "contrastive": {"adaptive_skew": True, "beta_end": 1.5},
            },
        }
    ],
}
MINILLM = {
    **STEPS,
    "runs": [
        {
            "name": "kd",
            "alpha": 0.0,
            "divergence": {"name": "reverse_kl"},
            "on_policy": {"max_new_tokens": 6, "minillm": {}},
        }
    ],
}
# Cross-tokenizer KD (vocabulary map) into a student with its own tokenizer: its coverage sums carry over.
CROSS = {**STEPS, "runs": [{"name": "kd", "alpha": 0.2, "cross_tokenizer": {"method": "vocab_map"}}]}


@pytest.mark.slow
@pytest.mark.parametrize(
    "steps",
    [STEPS, ON_POLICY, DISTILLM2, MINILLM, CROSS],
    ids=["live-teacher", "on-policy-replay", "distillm2", "minillm", "cross-tokenizer"],
)
def test_a_killed_run_resumes_and_ends_bit_identical(assets, tmp_path, steps):
    """A live teacher, AdamW with a linear schedule: killed right after a checkpoint, the newest checkpoint then
    broken (as if the kill had cut its writing short), rerun: the run falls back to the one before, resumes, and
    its student and loss curve equal the uninterrupted run's bit for bit (CPU, float32)."""
    if steps is CROSS:  # the CLI tests' student with a word-level tokenizer of its own
        steps = {**steps, "student": {"kind": "pretrained", "model": str(assets[3])}}
    ref = tmp_path / "ref"
    # every run in a child process of the same environment (one thread each): the same summation order
    r = subprocess.run(
        [sys.executable, "-m", "potstill", "distill", str(write(tmp_path / "ref.yaml", recipe(assets, ref, **steps)))],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (ref / "checkpoints" / "kd").exists(), "checkpoints go once the student is written"

    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **steps))
    ckpts = out / "checkpoints" / "kd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "potstill", "distill", str(rp)],
        env=launch_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while (
            not (ckpts / "checkpoint-6" / "potstill_run.json").exists()
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "runs" / "kd" / "POTSTILL_DONE").exists(), "killed before the run finished"
    saved = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert saved and saved[-1] >= 6 and len(saved) <= 2 + 1, saved  # save_total_limit 2 (+1 being written)
    newest = ckpts / f"checkpoint-{saved[-1]}"
    (newest / "trainer_state.json").write_text("{ cut short")

    r = subprocess.run(
        [sys.executable, "-m", "potstill", "distill", str(rp)],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is incomplete" in r.stderr
    info = json.loads((out / "runs" / "kd" / "train_info.json").read_text())
    assert info["resumed_from"] == f"checkpoint-{saved[-2]}"
    ref_info = json.loads((ref / "runs" / "kd" / "train_info.json").read_text())
    assert info["loss_curve"] == ref_info["loss_curve"]
    if "cross_tokenizer" in ref_info:  # the coverage sums carried over the kill
        assert info["cross_tokenizer"] == ref_info["cross_tokenizer"]
    if "on_policy" in ref_info:  # the same modes, anchors, skews and statistics step by step
        timeless = [{k: v for k, v in i["on_policy"].items() if k != "gen_seconds"} for i in (info, ref_info)]
        assert timeless[0] == timeless[1]
    if steps is ON_POLICY:
        assert {"data", "student", "replay"} <= set(ref_info["on_policy"]["modes"])
    if steps is DISTILLM2:
        assert ref_info["on_policy"]["skew_anchors"]["data"] is not None and ref_info["on_policy"]["skew_history"]
    a, b = load_file(ref / "runs" / "kd" / "model.safetensors"), load_file(out / "runs" / "kd" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoints").exists(), "nothing of the checkpoints is left once the student is saved"


def test_a_checkpoint_of_another_recipe_is_refused_in_one_line(assets, tmp_path, capsys):
    out = tmp_path / "out"
    fake = out / "checkpoints" / "kd" / "checkpoint-2"
    fake.mkdir(parents=True)
    (fake / "potstill_run.json").write_text(json.dumps({"run": {"name": "kd", "alpha": 0.9}}))
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **STEPS))
    assert main(["distill", str(rp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a checkpoint of another recipe" in err[0], err
    assert not (out / "runs").exists()


def test_resume_point_passes_over_a_checkpoint_whose_mark_is_unreadable(tmp_path):
    """The newest checkpoint's mark is garbled (a disk that failed mid-write): the one before is taken."""
    from potstill.checkpoints import resume_point

    fingerprint = {"run": {"name": "kd"}}
    for step, mark in ((2, json.dumps(fingerprint)), (4, "{ garbled")):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text("{}")
        (ck / "model.safetensors").write_bytes(b"")
        (ck / "potstill_run.json").write_text(mark)
    assert resume_point(tmp_path, fingerprint) == str(tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "potstill_run.json").write_text("{ garbled too")
    from potstill.errors import PotstillError

    with pytest.raises(PotstillError, match="no checkpoint in .* is complete"):
        resume_point(tmp_path, fingerprint)
