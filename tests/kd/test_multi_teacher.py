"""Multi-teacher KD through KDTrainer (the combination itself is tested in tests/signals/test_multi.py)."""

from __future__ import annotations

import torch
from helpers import kd_cfg, kd_dataset

from potstill.signals import MultiTeacher


def test_multi_teacher_trains_a_student_end_to_end(tiny_llama_pair, tmp_path):
    """Two live teachers through KDTrainer: the student's loss goes down on a repeated batch."""
    import copy

    from potstill.kd import KDTrainer
    from potstill.signals import OnlineTeacher

    teacher, student, tok = tiny_llama_pair
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = MultiTeacher([OnlineTeacher(teacher), OnlineTeacher(other)], mode="confidence")
    tr = KDTrainer(
        model=student,
        signal_source=src,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=kd_cfg(tmp_path, max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3, optim="adamw_torch"),
    )
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
