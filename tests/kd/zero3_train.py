"""Three SGD steps of ``KDTrainer`` (forward KL + CE, alpha 0.2, a live teacher) on a global batch of 8.

``python zero3_train.py OUT [tied]``: one process, no engine (the reference). Under ``accelerate launch`` with 2
processes: DeepSpeed ZeRO-3 through the Trainer's ``deepspeed=`` configuration (potstill's built-in one, with the
persistence threshold at 0 so that every parameter, the tied embedding/head included, is partitioned), 4 rows
per process. ``tied`` ties the student's head to its input embeddings: one parameter that DeepSpeed gathers for
the embedding's forward and backward and the reducer gathers for the loss. Rank 0 writes ``student.safetensors``
(the consolidated state) and ``info.json`` (per step: whether the head was partitioned when the loss read it).
"""

import faulthandler
import json
import os
import sys
from pathlib import Path

faulthandler.dump_traceback_later(180, exit=True)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from helpers import kd_cfg, kd_dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kd.fsdp_train import make_student  # noqa: E402
from potstill.distributed import end_distributed, is_zero3_partitioned, zero3_config  # noqa: E402
from potstill.kd import KDTrainer  # noqa: E402
from potstill.models import output_head  # noqa: E402


class Recording(KDTrainer):
    partitioned: list = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.partitioned.append(is_zero3_partitioned(output_head(self.accelerator.unwrap_model(model)).weight))
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out: str, tied: str = "") -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = make_tiny_tokenizer()
    teacher = make_tiny_llama(tok, layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    student = make_student(tok, tied == "tied")
    kw = {}
    if world > 1:
        ds = zero3_config()
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        kw = {"deepspeed": ds, "ddp_backend": "gloo"}
    args = kd_cfg(Path(out), alpha=0.2, per_device_train_batch_size=8 // world, max_steps=3, **kw)
    trainer = Recording(
        model=student, teacher_model=teacher, args=args, train_dataset=kd_dataset(tok), processing_class=tok
    )
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        # clone: tied weights are one tensor under two names, which safetensors refuses
        save_file(
            {k: v.detach().clone().contiguous() for k, v in state.items()}, os.path.join(out, "student.safetensors")
        )
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(out, "info.json").write_text(json.dumps({"partitioned": Recording.partitioned, "loss": losses}))
    end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:3])
