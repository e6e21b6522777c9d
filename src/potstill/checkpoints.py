"""Checkpoints in the middle of a run (``train.save_steps``) and resuming from them.

The Trainer writes its own checkpoints (``checkpoint-<step>``: the model as safetensors, the optimizer, scheduler
and RNG states, which it reads back with ``torch.load(weights_only=True)``, and ``trainer_state.json``) under
``<output_dir>/checkpoints/<run>``. When one is complete, :class:`MarkCheckpoints` writes the run's fingerprint into
it, atomically and last: a checkpoint without that mark was cut short (the process was killed while writing it).
A rerun resumes from the newest marked checkpoint (:func:`resume_point`), falls back past unmarked or unreadable
ones with a one-line warning, and refuses a checkpoint of another recipe. The Trainer's resume restores the
weights, optimizer, schedule, RNG and data position, so the run ends with the student it would have had.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback

from .errors import PotstillError
from .finished import CHECKPOINTS, MARK
from .io import atomic_write_text

log = logging.getLogger(__name__)
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(out: Path, run_name: str) -> Path:
    """Where run ``run_name`` of the recipe writing to ``out`` keeps its checkpoints."""
    return Path(out) / CHECKPOINTS / run_name


STATE = "potstill_state.json"  # a trainer's own state beyond the Trainer's (on-policy sampling), when it has one


class MarkCheckpoints(TrainerCallback):
    """Once the Trainer has written a checkpoint (its ``on_save``): the trainer's own state (``potstill_state()``,
    where it has one), then the run's fingerprint, last."""

    def __init__(self, fingerprint: dict, trainer=None):
        self.text = json.dumps(fingerprint, sort_keys=True)
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                if hasattr(self.trainer, "potstill_state"):
                    atomic_write_text(path / STATE, json.dumps(self.trainer.potstill_state()))
                atomic_write_text(path / MARK, self.text)
        return control


def restore_state(trainer, checkpoint: str) -> None:
    """Give ``trainer`` back the state :class:`MarkCheckpoints` wrote into ``checkpoint`` (a no-op without one)."""
    if hasattr(trainer, "load_potstill_state"):
        trainer.load_potstill_state(json.loads((Path(checkpoint) / STATE).read_text()))


def _complete(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
        if (path / STATE).exists():
            json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("model*.safetensors")) or any(path.glob("adapter_model*.safetensors"))


def resume_point(directory: Path, fingerprint: dict) -> str | None:
    """The newest checkpoint in ``directory`` that is whole and belongs to ``fingerprint``'s run, or None when there
    is no checkpoint. Refuses (one line) a checkpoint of another recipe, and a directory where none is whole."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()), reverse=True
    )
    if not found:
        return None
    want = json.loads(json.dumps(fingerprint))  # as it reads back from a mark
    for _step, path in found:
        try:
            mark = json.loads((path / MARK).read_text())
        except (OSError, ValueError):  # no mark, or an unreadable one: cut short
            mark = None
        if mark is not None and mark != want:
            raise PotstillError(
                f"{path} is a checkpoint of another recipe (its run fingerprint differs); point "
                "output_dir elsewhere or remove that directory to start the run over"
            )
        if mark is not None and _complete(path):
            return str(path)
        log.warning("checkpoint %s is incomplete (cut short when the run was killed?); trying an earlier one", path)
    raise PotstillError(f"no checkpoint in {directory} is complete; remove that directory to start the run over")
