"""``train.save_steps``: a run killed with SIGKILL and rerun ends with the student of a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import test_cli
from helpers_proc import launch_env
from potstill.cli import main
from test_cli import recipe, write

assets = test_cli.assets  # the tiny teacher and data files of the CLI tests (a module-scoped fixture)
STEPS = {"train.max_steps": 12, "train.save_steps": 2, "train.logging_steps": 1,
         "runs": [{"name": "kd", "alpha": 0.2, "divergence": {"name": "forward_kl"}}]}


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_bit_identical(assets, tmp_path, caplog):
    """A live teacher, AdamW with a linear schedule: killed right after a checkpoint, the newest checkpoint then
    broken (as if the kill had cut its writing short), rerun: the run falls back to the one before, resumes, and
    its student and loss curve equal the uninterrupted run's bit for bit (CPU, float32)."""
    ref = tmp_path / "ref"
    assert main(["distill", str(write(tmp_path / "ref.yaml", recipe(assets, ref, **STEPS)))]) == 0
    assert not (ref / "checkpoints" / "kd").exists(), "checkpoints go once the student is written"

    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **STEPS))
    ckpts = out / "checkpoints" / "kd"
    proc = subprocess.Popen([sys.executable, "-m", "potstill", "distill", str(rp)], env=launch_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (ckpts / "checkpoint-6" / "potstill_run.json").exists() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "runs" / "kd" / "POTSTILL_DONE").exists(), "killed before the run finished"
    saved = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert saved and saved[-1] >= 6 and len(saved) <= 2 + 1, saved  # save_total_limit 2 (+1 being written)
    newest = ckpts / f"checkpoint-{saved[-1]}"
    (newest / "trainer_state.json").write_text("{ cut short")

    with caplog.at_level("WARNING"):
        assert main(["distill", str(rp)]) == 0
    assert any("incomplete" in r.getMessage() for r in caplog.records)
    info = json.loads((out / "runs" / "kd" / "train_info.json").read_text())
    assert info["resumed_from"] == f"checkpoint-{saved[-2]}"
    ref_info = json.loads((ref / "runs" / "kd" / "train_info.json").read_text())
    assert info["loss_curve"] == ref_info["loss_curve"]
    a, b = load_file(ref / "runs" / "kd" / "model.safetensors"), load_file(out / "runs" / "kd" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpts.exists()


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


def test_checkpoints_are_refused_for_on_policy_runs(assets, tmp_path, capsys):
    rp = write(tmp_path / "r.yaml", recipe(assets, tmp_path / "out", **{
        "train.save_steps": 2, "runs": [{"name": "gkd", "on_policy": {"lmbda": 0.5}}]}))
    assert main(["distill", str(rp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampler, replay buffer and adaptive state are not checkpointed yet" in err[0], err
