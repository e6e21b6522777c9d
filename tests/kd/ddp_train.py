"""Train one SGD step of KD on a fixed global batch of 8; write the student's weights.

Run single-process (batch 8) or under ``accelerate launch --num_processes 2 --cpu``
(2 processes x 2 examples x 2 accumulation steps = the same global batch of 8).
``python ddp_train.py OUT PER_DEVICE ACCUM [kd|contrastive|minillm [fsdp2]]``: the on-policy methods
get deterministic stand-in samples for each example, so both layouts see the same samples. ``fsdp2``: the
student sharded through accelerate's FSDP2 plugin (``FSDPOnCPU``) and the teacher with ``shard_frozen``, as
``train.distributed: fsdp2`` does, instead of DDP.
A rank still running after 180 s prints every thread's stack and exits 1, so a hang shows where it is.
"""

import faulthandler
import os
import sys

faulthandler.dump_traceback_later(180, exit=True)  # armed until the process ends, its teardown included

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from helpers import kd_cfg, kd_dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from potstill.distributed import end_distributed  # noqa: E402
from potstill.kd import KDTrainer  # noqa: E402


def main(out: str, per_device: int, accum: int, method: str = "kd", engine: str = "ddp") -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    tok = make_tiny_tokenizer()
    teacher = make_tiny_llama(tok, layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    student = make_tiny_llama(tok, layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw = dict(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=1,
        ddp_backend="gloo" if world > 1 else None,
    )
    sharded = engine == "fsdp2" and world > 1
    if sharded:
        import torch.distributed as dist

        from potstill.distributed import fsdp2_trainer_args, shard_frozen

        dist.init_process_group("gloo")  # before the teacher is sharded; the Trainer reuses it
        shard_frozen(teacher)
        kw.update(fsdp2_trainer_args(student))
    if method == "kd":
        trainer_cls, args = KDTrainer, kd_cfg(Path(out), alpha=0.2, **kw)
    else:
        from helpers import contrastive_cfg, fake_samples, minillm_cfg

        from potstill.kd import ContrastiveKDTrainer, MiniLLMKDTrainer

        if method == "contrastive":
            trainer_cls, args = ContrastiveKDTrainer, contrastive_cfg(Path(out), alpha=0.2, beta=1.4, **kw)
        else:
            trainer_cls, args = MiniLLMKDTrainer, minillm_cfg(Path(out), **kw)
        trainer_cls._student_batch = lambda self, b: self._collate(fake_samples(b, tok))
    if sharded:
        from potstill.distributed import FSDPOnCPU

        trainer_cls = type(trainer_cls.__name__, (FSDPOnCPU, trainer_cls), {})
    tr = trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=kd_dataset(tok), processing_class=tok
    )
    tr.train()
    state = tr.accelerator.get_state_dict(tr.model) if sharded else tr.accelerator.unwrap_model(tr.model).state_dict()
    if tr.accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "student.safetensors"))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
