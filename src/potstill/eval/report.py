"""Write an evaluation report: ``metrics.json``, ``report.md`` and PNG plots.

Plots use matplotlib's Agg canvas on a standalone ``Figure`` (no pyplot global state,
so reports can be written from any thread without a display). Every file is written
atomically (:mod:`potstill.io`).
"""

from __future__ import annotations

import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import PotstillError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["GENERATIONS_KEY", "METRIC_INFO", "PLOTTED", "read_metrics", "write_report"]

GENERATIONS_KEY = "generations"
"""Key of the per-run generations (``list[str]``) in ``evaluate_runs`` results; not written to metrics.json."""

METRIC_INFO: dict[str, tuple[str, str | None]] = {
    "forward_kl": ("forward KL", "lower"),
    "top1_agreement": ("top-1 agreement", "higher"),
    "perplexity": ("perplexity", "lower"),
    "ece": ("ECE", "lower"),
    "rouge_l": ("ROUGE-L", "higher"),
    "distinct_1": ("distinct-1", None),
    "distinct_2": ("distinct-2", None),
    "self_bleu": ("self-BLEU", None),
    "loop_share": ("loop share", "lower"),
    "embedding_spread": ("embedding spread", None),
    "collapsed": ("collapsed", None),
    "exact_match": ("exact match", "higher"),
    "decision_accuracy": ("decision accuracy", "higher"),
    "decision_macro_f1": ("decision macro-F1", "higher"),
    "decision_ece": ("decision ECE", "lower"),
    "params": ("params", None),
    "tokens_per_s": ("tokens/s", "higher"),
}
"""Known metrics: key -> (label, which direction is better; ``None``: neither)."""

PLOTTED = ("forward_kl", "top1_agreement", "perplexity", "rouge_l")
_ARROW = {"lower": " ↓", "higher": " ↑", None: ""}
_CELL_CHARS = 400


def write_report(
    out_dir,
    metrics: Mapping[str, Mapping],
    *,
    loss_curves: Mapping[str, Sequence[tuple[int, float]]] | None,
    title: str,
    notes: Sequence[str] | None = None,
    samples: Sequence[Mapping] | None = None,
) -> list[Path]:
    """Write the report files into ``out_dir`` and return their paths.

    Args:
        out_dir: created if missing.
        metrics: ``{run name: {metric: number}}`` as returned by ``evaluate_runs`` (the
            per-run ``"generations"`` lists are left out of ``metrics.json``; show some via
            ``samples``). Values are numbers or ``None``; non-finite floats are written
            as ``null`` (strict JSON) and read back by :func:`read_metrics` as ``nan``.
        loss_curves: ``{run name: [(step, loss), ...]}``; ``loss_curves.png`` is written only
            when some curve has points.
        title: the report's heading.
        notes: bullet points written under the table.
        samples: ``[{"prompt": str, "reference": str, "outputs": {run name: str}}]``
            (:func:`potstill.eval.run.collect_samples` builds them), shown side by side.

    Files: ``metrics.json`` (``{"runs": {name: {metric: value}}}``), ``metrics.png`` (one
    bar chart per metric of :data:`PLOTTED`, runs side by side), ``loss_curves.png`` (one
    line per run), and ``report.md`` embedding the PNGs by relative path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = _clean_runs(metrics)
    written: list[Path] = []

    json_runs = {name: {k: _json_value(v) for k, v in run.items()} for name, run in runs.items()}
    written.append(atomic_write_json(out / "metrics.json", {"runs": json_runs}))

    images: list[tuple[str, str]] = []
    curves = {name: list(points) for name, points in (loss_curves or {}).items() if len(points)}
    if curves:
        written.append(atomic_write_bytes(out / "loss_curves.png", _plot_loss_curves(curves)))
        images.append(("Training loss", "loss_curves.png"))
    if any(_finite(run.get(k)) for run in runs.values() for k in PLOTTED):
        written.append(atomic_write_bytes(out / "metrics.png", _plot_metrics(runs)))
        images.append(("Metrics", "metrics.png"))

    text = _markdown(title, runs, notes or [], samples or [], images)
    written.append(atomic_write_text(out / "report.md", text))
    return written


def read_metrics(path) -> dict[str, dict]:
    """Read a ``metrics.json`` written by :func:`write_report` -> ``{run name: {metric: value}}``.

    ``null`` values come back as ``nan``. Raises :class:`PotstillError` (one line) when the
    file is missing, not JSON, or not shaped ``{"runs": {name: {metric: number | null}}}``.
    """
    path = Path(path)
    fix = "re-run the evaluation to rewrite it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PotstillError(f"{path}: no such metrics file; run the evaluation first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PotstillError(f"{path}: cannot read metrics ({reason}); {fix}") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict):
        raise PotstillError(f'{path}: expected a JSON object with a "runs" object; {fix}')
    result: dict[str, dict] = {}
    for name, run in runs.items():
        if not isinstance(run, dict):
            raise PotstillError(f"{path}: run {name!r} is not an object of metrics; {fix}")
        clean = {}
        for key, value in run.items():
            if value is None:
                value = float("nan")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PotstillError(f"{path}: metric {key!r} of run {name!r} is not a number; {fix}")
            clean[key] = value
        result[name] = clean
    return result


# -- validation ---------------------------------------------------------------------------


def _clean_runs(metrics: Mapping[str, Mapping]) -> dict[str, dict]:
    if not isinstance(metrics, Mapping) or not metrics:
        raise PotstillError("no runs to report; pass metrics as {run name: {metric: value}}")
    runs: dict[str, dict] = {}
    for name, run in metrics.items():
        if not isinstance(run, Mapping):
            raise PotstillError(f"run {name!r} is a {type(run).__name__}, not a mapping of metrics")
        clean = {}
        for key, value in run.items():
            if key == GENERATIONS_KEY:
                continue
            if hasattr(value, "item") and not isinstance(value, numbers.Number):
                value = value.item()  # 0-d tensors / numpy scalars
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise PotstillError(
                    f"metric {key!r} of run {name!r} is a {type(value).__name__}; metrics must be numbers"
                )
            clean[str(key)] = value if value is None or isinstance(value, int) else float(value)
        runs[str(name)] = clean
    return runs


def _json_value(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


# -- markdown -----------------------------------------------------------------------------


def _markdown(title, runs, notes, samples, images) -> str:
    keys = [k for k in METRIC_INFO if any(k in run for run in runs.values())]
    keys += sorted({k for run in runs.values() for k in run} - set(keys))
    best = _best(runs, keys)

    lines = [f"# {title}", ""]
    header = ["run"] + [METRIC_INFO.get(k, (k, None))[0] + _ARROW[METRIC_INFO.get(k, (k, None))[1]] for k in keys]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(keys)) + "|")
    for name, run in runs.items():
        cells = [_cell(name)]
        for k in keys:
            text = _format(k, run.get(k))
            cells.append(f"**{text}**" if best.get(k) == name else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "↑ higher is better, ↓ lower is better; **bold**: best student."]
    if "forward_kl" in keys or "top1_agreement" in keys:
        lines.append(
            "Forward KL(teacher ‖ run) and top-1 agreement are per reference-response token "
            "(teacher-forced, T=1); ROUGE-L and tokens/s come from greedy generation."
        )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    for caption, file in images:
        lines += ["", f"## {caption}", "", f"![{caption}]({file})"]
    if samples:
        lines += ["", "## Sample generations"]
        for i, sample in enumerate(samples, 1):
            outputs = dict(sample.get("outputs") or {})
            lines += ["", f"**Sample {i}.** Prompt: {_cell(sample.get('prompt', ''))}", ""]
            columns = ["reference"] + list(outputs)
            lines.append("| " + " | ".join(_cell(c) for c in columns) + " |")
            lines.append("|" + "|".join(["---"] * len(columns)) + "|")
            values = [sample.get("reference", "")] + [outputs[c] for c in outputs]
            lines.append("| " + " | ".join(_cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _best(runs, keys) -> dict[str, str]:
    """Metric -> the student (non-teacher run) with the best value, when there are >= 2 students."""
    students = [n for n in runs if n != "teacher"]
    best = {}
    for k in keys:
        direction = METRIC_INFO.get(k, (k, None))[1]
        vals = [(runs[n][k], n) for n in students if _finite(runs[n].get(k))]
        if direction is None or len(vals) < 2:
            continue
        best[k] = (min if direction == "lower" else max)(vals)[1]
    return best


def _format(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "params":
        return _human(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if key in ("tokens_per_s",) or abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4f}"


def _human(n) -> str:
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _cell(text) -> str:
    text = str(text)
    if len(text) > _CELL_CHARS:
        text = text[: _CELL_CHARS - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


# -- plots --------------------------------------------------------------------------------


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _plot_loss_curves(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _plot_metrics(runs: dict[str, dict]) -> bytes:
    names = list(runs)
    fig = _figure(figsize=(4 * len(PLOTTED), 3.8), layout="constrained")
    colors = ["0.55" if name == "teacher" else f"C{i}" for i, name in enumerate(names)]
    for i, key in enumerate(PLOTTED):
        ax = fig.add_subplot(1, len(PLOTTED), i + 1)
        values = [runs[n].get(key) for n in names]
        heights = [v if _finite(v) else 0.0 for v in values]
        bars = ax.bar(range(len(names)), heights, color=colors)
        for bar, v in zip(bars, values):
            label = "n/a" if not _finite(v) else f"{v:.3g}"
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        label, direction = METRIC_INFO[key]
        ax.set_title(label + _ARROW[direction])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    return _png(fig)
