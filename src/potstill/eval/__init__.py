"""Evaluation: metrics as pure functions, a teacher-vs-students run, reports with plots.

``evaluate_runs`` -> ``{name: metrics + generations}``; ``write_report`` ->
``metrics.json``, ``report.md``, ``metrics.png``, ``loss_curves.png``.
"""

from .metrics import (
    count_parameters,
    distinct_n,
    expected_calibration_error,
    perplexity,
    rouge_l,
    teacher_forced_stats,
)
from .report import GENERATIONS_KEY, METRIC_INFO, read_metrics, write_report
from .run import METRIC_KEYS, TEACHER, collect_samples, evaluate_runs, metrics_only, per_example_scores

__all__ = [
    "per_example_scores",
    "GENERATIONS_KEY",
    "METRIC_INFO",
    "METRIC_KEYS",
    "TEACHER",
    "collect_samples",
    "count_parameters",
    "distinct_n",
    "evaluate_runs",
    "expected_calibration_error",
    "metrics_only",
    "perplexity",
    "read_metrics",
    "rouge_l",
    "teacher_forced_stats",
    "write_report",
]
