"""Watching a run: trackers (``train.report_to``) and held-out measurements during training (``train.eval_steps``).

Both go through the Trainer's own machinery: ``report_to`` is ``TrainingArguments.report_to`` (the Trainer's
tensorboard / wandb / mlflow / trackio callbacks; nothing is sent anywhere when the recipe names none), and the
held-out figures are logged with ``Trainer.log``, so they reach the same trackers and the log history that
``train_info.json`` is written from.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback


def place_tracker_logs(trainer, log_dir: Path) -> None:
    """Point the Trainer's tensorboard callback at ``log_dir`` (inside the run's output directory): by default it
    writes under the Trainer's ``output_dir``, which here is scratch space removed after the run."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(log_dir)


class HeldOutEval(TrainerCallback):
    """Every ``every`` optimizer steps (and after the last): the student's forward KL(teacher || student) and top-1
    agreement with the teacher per response token of the held-out ``examples`` (the figures ``metrics.json``
    reports at the end, :func:`potstill.eval.run.evaluate_runs`, teacher-forced, no generation).

    Logged as ``eval_forward_kl`` / ``eval_top1_agreement`` through ``Trainer.log``; ``history`` keeps
    ``[step, forward_kl, top1_agreement]`` rows. Under DDP the first process measures alone, with its whole
    student (no collective is involved); the others go on to the next step's synchronisation."""

    def __init__(
        self, trainer, teacher, tokenizer, examples, *, every: int, vocab_size: int | None, batch_size: int = 8
    ):
        self.trainer, self.teacher, self.tokenizer, self.examples = trainer, teacher, tokenizer, list(examples)
        self.every, self.vocab_size, self.batch_size = int(every), vocab_size, int(batch_size)
        self.history: list[list] = []

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.every == 0 or state.global_step >= state.max_steps
        if not due or not state.is_world_process_zero or (self.history and self.history[-1][0] == state.global_step):
            return control
        from .eval.run import evaluate_runs

        student = self.trainer.accelerator.unwrap_model(self.trainer.model)
        row = evaluate_runs(
            {"student": student},
            self.teacher,
            self.tokenizer,
            self.examples,
            vocab_size=self.vocab_size,
            batch_size=self.batch_size,
            max_new_tokens=0,
            progress=False,
        )["student"]
        self.history.append([state.global_step, row["forward_kl"], row["top1_agreement"]])
        due_log = control.should_log  # Trainer.log clears it, and the step's own loss would go unlogged
        self.trainer.log({"eval_forward_kl": row["forward_kl"], "eval_top1_agreement": row["top1_agreement"]})
        control.should_log = due_log
        return control
