"""Process-group lifetime for runs under ``accelerate launch`` / ``torchrun``."""

from __future__ import annotations


def end_distributed() -> None:
    """Wait for every process, then tear the process group down; a no-op in a single process.

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable:
    the process then aborts ("terminate called without an active exception", SIGABRT) after its
    work is done and its files are written, and the launcher reports the whole job as failed.
    Call it on the success path only: the barrier would wait forever for a process that died.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
