"""Watching a run: ``train.report_to`` (the Trainer's trackers) and ``train.eval_steps`` (held-out figures during
training), through ``potstill distill`` on the tiny teacher."""

import json
import os

import pytest
from helpers import recipe, write

from potstill.cli import main


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_loss_and_the_held_out_figures(assets, tmp_path):
    """Every 2 steps (and after the last, step 5) the student is measured on the held-out examples; the figures
    reach tensorboard, train_info.json, and the last one is what the final evaluation reports."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    rp = write(
        tmp_path / "r.yaml",
        recipe(assets, out, **{"train.max_steps": 5, "train.eval_steps": 2, "train.report_to": ["tensorboard"]}),
    )
    assert main(["distill", str(rp)]) == 0
    for run in ("sft", "kd"):
        tb = _scalars(out / "logs" / run)
        assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5]
        assert [s for s, _ in tb["eval/forward_kl"]] == [2, 4, 5]
        info = json.loads((out / "runs" / run / "train_info.json").read_text())
        assert [row[0] for row in info["eval_history"]] == [2, 4, 5]
        # the tracker saw the same numbers (float32 in the event file)
        assert [v for _, v in tb["eval/forward_kl"]] == pytest.approx(
            [row[1] for row in info["eval_history"]], rel=1e-6
        )
        assert [v for _, v in tb["eval/top1_agreement"]] == pytest.approx(
            [row[2] for row in info["eval_history"]], rel=1e-6
        )
        final = json.loads((out / "metrics.json").read_text())["runs"][run]
        # measured after the last step on the student that was then saved and evaluated: the same figures
        assert info["eval_history"][-1][1] == pytest.approx(final["forward_kl"], rel=1e-5)
        assert info["eval_history"][-1][2] == pytest.approx(final["top1_agreement"], rel=1e-9)
    kd_info = json.loads((out / "runs" / "kd" / "train_info.json").read_text())
    kd = kd_info["eval_history"]
    assert kd[-1][1] < kd[0][1], "the KD student moves towards its teacher"
    # Throughput: loss tokens per second in every loss log (the tracker and the progress bar get it), and the
    # run's loss tokens in train_info.json: what the per-token figures are averaged over.
    rates = _scalars(out / "logs" / "kd")["train/loss_tokens_per_s"]
    assert [s for s, _ in rates] == [1, 2, 3, 4, 5] and all(v > 0 for _, v in rates)
    assert kd_info["loss_tokens"] > 0
    assert kd_info["loss_tokens_per_s"] == pytest.approx(kd_info["loss_tokens"] / kd_info["train_seconds"], rel=1e-2)


def test_no_tracker_writes_nothing_outside_the_output_directory(assets, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **{"runs": [{"name": "kd", "alpha": 0.5}]}))
    assert main(["distill", str(rp)]) == 0
    assert os.listdir(work) == []
    assert not (out / "logs").exists()


def test_a_tracker_that_is_not_installed_is_refused_in_one_line(assets, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **{"train.report_to": ["wandb"]}))
    assert main(["distill", str(rp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.report_to wandb needs the wandb package" in err[0], err
    assert not out.exists()
