"""Process-group lifetime for runs under ``accelerate launch`` / ``torchrun``.

Why the group is not simply destroyed and forgotten: a gloo worker thread can still hold the last
reference to a collective's tensors for a moment after the collective has returned (the op is marked
done before the thread drops its work item). If those tensors were made in Python, dropping them
needs the GIL. ``~ProcessGroupGloo`` joins its worker threads, so it must run while the GIL is free:

* left to interpreter shutdown, the thread asks for the GIL of a dying interpreter and the process
  aborts (SIGABRT, "terminate called without an active exception") after its work is done;
* destroyed when DDP's ``Reducer`` (which holds the group and is freed with the GIL held, torch
  issue #56297) is garbage-collected after ``destroy_process_group()``, the join waits for a
  thread that waits for the GIL: the rank hangs forever at exit (seen under CPU load: the
  2-process test of issue 14, about 1 run in 40).

So :func:`end_distributed` keeps a reference to the destroyed group (and its backend) and lets it go
in an ``atexit`` hook, after a garbage collection has freed the trainer's DDP wrapper: the last
reference is then a Python handle whose destructor releases the GIL while the threads are joined.
"""

from __future__ import annotations

import atexit
import gc

_RETIRED: list = []  # destroyed groups and their backends, released at exit (module docstring)


@atexit.register
def _release_retired() -> None:
    if not _RETIRED:
        return
    gc.collect()  # DDP wrappers in reference cycles go now, while the group is still held here
    while _RETIRED:
        _RETIRED.pop(0)  # a group before its backend: the backend's handle frees it and joins without the GIL


def end_distributed() -> None:
    """Wait for every process, then tear the process group down; a no-op in a single process.

    The group's threads are joined at interpreter exit, not here (module docstring): left to
    interpreter shutdown, or to DDP's garbage collection, a gloo group can abort or hang the process
    after its work is done and its files are written. Call it on the success path only: the barrier
    would wait forever for a process that died.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    group = dist.group.WORLD
    held = [group]
    try:
        held.append(group._get_backend(torch.device("cpu")))  # gloo: released last, by its own handle
    except (AttributeError, RuntimeError, ValueError):
        pass  # no CPU backend (NCCL only), or a torch without _get_backend: the group handle alone
    dist.destroy_process_group()
    _RETIRED.extend(held)


def full_tensor(t):
    """``t`` whole: a sharded ``DTensor`` (an FSDP2 ``fully_shard`` parameter) gathered, anything else as is.

    A plain tensor comes back unchanged (the same object), so a single-process run takes exactly the path
    it took before. A ``DTensor`` is all-gathered across its mesh; call this on every rank, once per use
    (it is a collective). Its gradient:

    * without grad (a frozen teacher, or grad disabled) the gather runs under ``no_grad`` and keeps no graph;
    * with grad (a trainable student head read while sharded) the gradient of the full tensor flows back
      as a reduce-scatter *sum* to each rank's shard, divided by the mesh size: the mean over the
      data-parallel ranks, which is how FSDP2 reduces every other gradient by default, so a loss scaled
      for FSDP's mean (multiplied by the number of processes, as for DDP) trains the head like the rest.
    """
    import torch

    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # a torch without DTensor: nothing can be sharded
        return t
    if not isinstance(t, DTensor):
        return t
    if not (t.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            return t.full_tensor()
    full = t.full_tensor(grad_placements=[Partial("sum")] * t.device_mesh.ndim)
    n = t.device_mesh.size()
    if n > 1:
        full.register_hook(lambda g: g / n)
    return full
