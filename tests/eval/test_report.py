"""write_report / read_metrics: files, round trip, valid PNGs, one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from potstill.errors import PotstillError
from potstill.eval.report import read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "teacher": {
        "forward_kl": 0.0,
        "top1_agreement": 1.0,
        "perplexity": 12.5,
        "rouge_l": 0.41,
        "params": 1_230_000,
        "tokens_per_s": 150.0,
    },
    "logit_kd": {
        "forward_kl": 0.31,
        "top1_agreement": 0.72,
        "perplexity": 15.0,
        "rouge_l": 0.35,
        "params": 120_000,
        "tokens_per_s": 900.0,
    },
    "sft": {
        "forward_kl": 0.52,
        "top1_agreement": 0.61,
        "perplexity": 16.2,
        "rouge_l": 0.38,
        "params": 120_000,
        "tokens_per_s": 905.5,
    },
}


def test_report_files_and_round_trip(tmp_path, monkeypatch):
    """The files, the metrics round trip, the markdown, and the plots: PNGs of the figure's size with
    content (not blank), whose figures plot exactly the loss curves and, per metric, the runs' values."""
    from potstill.eval import report

    figures = {}
    real_png = report._png

    def capture(fig):
        figures["loss" if fig.axes[0].get_title() == "Training loss" else "metrics"] = fig
        return real_png(fig)

    monkeypatch.setattr(report, "_png", capture)
    runs = {name: dict(run, generations=["a", "b"]) for name, run in METRICS.items()}
    samples = [{"prompt": "What | is\nthis?", "reference": "a ref", "outputs": {"teacher": "t out", "sft": "s out"}}]
    paths = write_report(
        tmp_path / "out",
        runs,
        loss_curves={"logit_kd": [(0, 3.0), (10, 2.0)], "sft": [(0, 3.1), (10, 2.4)]},
        title="Tiny report",
        notes=["seeded run", "CPU only"],
        samples=samples,
    )
    names = sorted(p.name for p in paths)
    assert names == ["loss_curves.png", "metrics.json", "metrics.png", "report.md"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC
            pixels = np.asarray(Image.open(p).convert("L"), dtype=np.float64)
            width, height = (700, 400) if p.name == "loss_curves.png" else (1600, 380)  # figsize x 100 dpi
            assert pixels.shape == (height, width), (p.name, pixels.shape)
            assert pixels.std() > 10 and (pixels < 128).mean() > 0.01, p.name  # drawn on, not a blank canvas
    lines = {line.get_label(): line.get_xydata().tolist() for line in figures["loss"].axes[0].get_lines()}
    assert lines == {"logit_kd": [[0, 3.0], [10, 2.0]], "sft": [[0, 3.1], [10, 2.4]]}
    axes = figures["metrics"].axes
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["forward", "top-1", "perplexity", "ROUGE-L"]
    for ax, key in zip(axes, ("forward_kl", "top1_agreement", "perplexity", "rouge_l")):
        assert [t.get_text() for t in ax.get_xticklabels()] == list(METRICS)
        assert [bar.get_height() for bar in ax.patches] == pytest.approx([m[key] for m in METRICS.values()]), key
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]

    raw = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(raw) == {"runs"} and "generations" not in raw["runs"]["sft"]
    assert read_metrics(tmp_path / "out" / "metrics.json") == METRICS

    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Tiny report\n")
    assert "forward KL ↓" in md and "top-1 agreement ↑" in md and "ROUGE-L ↑" in md and "perplexity ↓" in md
    assert "![Training loss](loss_curves.png)" in md and "![Metrics](metrics.png)" in md
    assert "- seeded run" in md and "1.23M" in md
    assert "What \\| is<br>this?" in md and "| a ref | t out | s out |" in md
    # best student per metric in bold: logit_kd has the lower KL, sft the higher ROUGE-L
    row = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "**0.3100**" in row["logit_kd"] and "**0.3800**" in row["sft"]


def test_no_loss_curves_and_nan_values(tmp_path):
    metrics = {"teacher": {"forward_kl": 0.0, "perplexity": float("nan")}, "s": {"forward_kl": float("inf")}}
    paths = write_report(tmp_path, metrics, loss_curves=None, title="t")
    assert sorted(p.name for p in paths) == ["metrics.json", "metrics.png", "report.md"]
    assert "loss_curves" not in (tmp_path / "report.md").read_text()
    raw = json.loads((tmp_path / "metrics.json").read_text())
    assert raw["runs"]["teacher"]["perplexity"] is None and raw["runs"]["s"]["forward_kl"] is None
    back = read_metrics(tmp_path / "metrics.json")
    assert math.isnan(back["teacher"]["perplexity"]) and back["teacher"]["forward_kl"] == 0.0


def test_bad_metrics_input(tmp_path):
    with pytest.raises(PotstillError, match="no runs"):
        write_report(tmp_path, {}, loss_curves=None, title="t")
    with pytest.raises(PotstillError, match="must be numbers"):
        write_report(tmp_path, {"s": {"rouge_l": "high"}}, loss_curves=None, title="t")


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no such metrics file"),
        ("{not json", "cannot read metrics"),
        ("[1, 2]", '"runs"'),
        ('{"runs": {"a": 3}}', "run 'a' is not an object"),
        ('{"runs": {"a": {"kl": "x"}}}', "metric 'kl' of run 'a' is not a number"),
        ('{"runs": {"a": {"kl": true}}}', "not a number"),
    ],
)
def test_read_metrics_errors_are_one_line(tmp_path, content, match):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PotstillError, match=match) as info:
        read_metrics(path)
    assert "\n" not in str(info.value)
