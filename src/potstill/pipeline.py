"""Temporary: the distill runner moved to :mod:`potstill.runners`; this module goes once every importer moved."""

from potstill.runners.prepare import (
    resolve_device,
    load_pairs,
    rationale_split,
    split_pairs,
    encode_pairs,
    load_teacher,
    build_student,
    check_precision,
    ExtraTeacher,
    Prepared,
    cache_spec,
    check_teacher_finite,
    train_eval_split,
    log,
)  # noqa: F401
from potstill.runners.train import (
    _checkpointing_args,
    kd_config,
    train_run,
    _consolidated,
    _multi_source,
    _watch,
    _train_cross,
    log,
)  # noqa: F401
from potstill.runners.checks import (
    preflight,
    check_packing_models,
    check_distributed,
    check_watch,
    _check_deepspeed_config,
    start_processes,
    log,
    TRACKER_MODULES,
)  # noqa: F401
from potstill.runners.cache import cache, log  # noqa: F401
from potstill.runners.distill import evaluate_and_report, distill, _distill_runs, evaluate_only, log  # noqa: F401
