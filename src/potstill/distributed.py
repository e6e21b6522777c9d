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
    """``t`` whole: a sharded ``DTensor`` (an FSDP2 ``fully_shard`` parameter) or a parameter DeepSpeed ZeRO-3
    partitioned (see :func:`_zero3_full`) gathered, anything else as is.

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

    if is_zero3_partitioned(t):
        return _zero3_full(t)
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


def global_rows(t) -> int:
    """The number of rows of a possibly sharded parameter (a ZeRO-3 partition's local data is empty; a DTensor
    reports its global shape already)."""
    shape = getattr(t, "ds_shape", None)
    return int(shape[0]) if getattr(t, "ds_id", None) is not None and shape is not None else int(t.shape[0])


def is_zero3_partitioned(t) -> bool:
    """Whether ``t`` is a parameter DeepSpeed ZeRO-3 has partitioned away (its local data is empty). One it
    keeps whole (below its persistence threshold, or held by a module that is using it, as a tied embedding
    can be) is used as it is, like any tensor."""
    return getattr(t, "ds_id", None) is not None and t.numel() == 0 and not getattr(t, "ds_active_sub_modules", None)


_ZERO_GATHER = None


def _zero3_full(p):
    """A ZeRO-3-partitioned parameter whole, as a new tensor whose gradient reaches ``p`` (every rank calls it).

    DeepSpeed gathers a parameter inside its module's forward and backward only; the chunked reducer reads the
    output head *after* the model's forward. So the weight is gathered here (``GatheredParameters``, read-only)
    and copied, and autograd records ``p`` at its whole shape. In backward the copy's gradient goes back to
    ``p`` unchanged, with ``p`` gathered again for the moment its gradient is accumulated (autograd lays the
    gradient out like the parameter's data), as DeepSpeed does around a module's backward: its own gradient
    hook on ``p`` then averages and partitions the gradient like every other parameter's, and a second hook,
    run after it, partitions ``p`` again."""
    import deepspeed
    import torch

    global _ZERO_GATHER
    if _ZERO_GATHER is None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        def release(param):
            if getattr(param, "_potstill_regathered", False):
                param._potstill_regathered = False
                if not param.ds_active_sub_modules:  # else a module (a tied embedding) holds it and frees it after
                    param.partition()

        class _ZeroGather(torch.autograd.Function):
            @staticmethod
            def forward(ctx, param):
                ctx.param = param
                if not getattr(param, "_potstill_release_hook", False):  # after DeepSpeed's reduce hook
                    param.register_post_accumulate_grad_hook(release)
                    param._potstill_release_hook = True
                return param.detach().clone()

            @staticmethod
            def backward(ctx, grad):
                param = ctx.param
                if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    param.all_gather()
                    param._potstill_regathered = True
                return grad

        _ZERO_GATHER = _ZeroGather
    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        if p.requires_grad and torch.is_grad_enabled():
            return _ZERO_GATHER.apply(p)
        return p.detach().clone()


# ----------------------------------------------------------------------------- engines (``train.distributed``)

DISTRIBUTED_KINDS = ("none", "ddp", "fsdp2", "zero3")


def world_size() -> int:
    """The number of processes ``accelerate launch`` / ``torchrun`` started (``$WORLD_SIZE``, 1 without them)."""
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_rank() -> int:
    """This process's rank (``$RANK``, 0 without a launcher)."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    return process_rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def layer_classes(model) -> list[str]:
    """The names of ``model``'s repeated blocks that FSDP2 shards one by one (Hugging Face's ``_no_split_modules``:
    the decoder layer classes), through a PEFT wrapper too; empty when the model declares none."""
    base = model
    while hasattr(base, "base_model") and base.base_model is not base:  # PeftModel -> LoraModel -> the model
        base = base.base_model
    for m in (base, getattr(base, "model", None)):
        names = getattr(m, "_no_split_modules", None)
        if names:
            return sorted(set(names))
    return []


def fsdp2_trainer_args(model) -> dict:
    """``TrainingArguments`` that make the Trainer shard the student with accelerate's FSDP2 plugin.

    Each decoder layer is one ``fully_shard`` unit (accelerate 1.16 also makes the input embeddings one,
    and the final norm with the output head another, which stays gathered from its forward to its
    backward; at the loss the student's head is then a whole tensor and ``full_head`` passes it through);
    the full state dict is gathered for saving. ``reshard_after_forward`` frees each layer's gathered
    weights after its forward (ZeRO-3's memory; the weights are gathered again for backward)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "fsdp_version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layer_classes(model),
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
    }


def require_deepspeed() -> None:
    """Refuse, in one line, ``train.distributed zero3`` where DeepSpeed is not installed."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        from .errors import PotstillError

        raise PotstillError(
            "train.distributed zero3 runs on DeepSpeed, which is not installed; pip install "
            "'potstill[deepspeed]', or set train.distributed fsdp2"
        ) from None


def zero3_config(path: str | None = None) -> dict:
    """The DeepSpeed configuration of ``train.distributed zero3``: the file at ``path`` (DeepSpeed's own JSON,
    for offloading or bucket sizes), else ZeRO stage 3 with every size left to the Trainer (``"auto"``).

    No ``optimizer`` or ``scheduler`` block: the Trainer builds the recipe's own (AdamW, its schedule) and
    DeepSpeed partitions their state, so one recipe trains the same under every engine. The student is saved
    from its float32 master weights (:func:`zero3_full_state`); DeepSpeed's own 16-bit gather stays on for
    Trainer checkpoints. Parameters below the persistence threshold
    (``"auto"``: 10 x hidden size, the norms and biases) stay whole on every process."""
    if path is not None:
        import json
        from pathlib import Path

        return json.loads(Path(path).read_text())
    return {
        "zero_optimization": {
            "stage": 3,
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "reduce_bucket_size": "auto",
        },
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def zero3_full_state(engine) -> dict:
    """The whole state of a module DeepSpeed ZeRO-3 trained (``engine.module``), for saving; every process takes
    part (each parameter is a collective) and gets it.

    Trainable parameters come as their float32 master weights from DeepSpeed's optimizer: under bf16 / fp16
    the module itself holds 16-bit copies, which is what DeepSpeed's own consolidated state dict gathers
    (the student would then be saved rounded to bf16). Frozen parameters are gathered as they are; tied
    parameters appear under each of their names, as in ``state_dict()``."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keys = set(module.state_dict().keys())
    state = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.detach().clone()
        state[name] = full.detach().cpu()
    for name, b in module.named_buffers():
        if name in keys:
            state[name] = b.detach().cpu()
    return state


_FROZEN_ENGINES: list = []  # DeepSpeed engines of frozen teachers: their hooks live as long as the run


def shard_frozen_zero3(model) -> None:
    """Partition a frozen model (a teacher) with DeepSpeed ZeRO-3, in place, for inference (no optimizer).

    Each process then holds 1/world of its weights; DeepSpeed's hooks gather each module's weights for its
    forward and free them after. Call it on every process, after the process group exists."""
    import deepspeed
    import torch

    dtype = next(model.parameters()).dtype
    hidden = getattr(model.config, "hidden_size", None) or 0
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    _FROZEN_ENGINES.append(engine)


class FSDPOnCPU:
    """Trainer mixin: accelerate's FSDP2 plugin on CPU processes too.

    accelerate (1.16) turns its FSDP plugin on only for GPU-class devices; on CPU processes it keeps the
    plugin aside and wraps the model in DDP, silently. This mixin, after the Trainer made its accelerator,
    gives the CPU processes' state the plugin the Trainer asked for, so ``accelerator.prepare`` takes the
    very code path it takes on GPUs (``fully_shard`` per decoder layer, the optimizer re-pointed at the
    sharded parameters, the full state dict gathered for saving). Nothing changes when FSDP was not asked
    for, or when accelerate already turned it on (GPUs)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin_args = getattr(self.args, "fsdp_plugin_args", None)
        state = self.accelerator.state
        if plugin_args is None or getattr(state, "fsdp_plugin", None) is not None:
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
        if state.mixed_precision != "no":  # what accelerate's state does for FSDP: bf16/fp16 params, gradients
            state.fsdp_plugin.set_mixed_precision(state.mixed_precision)  # (left out, the run was silently fp32)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def shard_frozen(model) -> None:
    """Shard a frozen model (a teacher) with FSDP2 ``fully_shard``, in place: each decoder layer, then the root.

    Each process then holds 1/world of its weights between forwards. The root's weights (embeddings, head)
    are freed again after every forward: FSDP2 keeps a root's weights gathered after its forward for the
    backward that follows, and a frozen teacher has none. Call it on every process, after the process
    group exists, with the same model; a model that declares no decoder-layer classes is refused."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from .errors import PotstillError

    names = set(layer_classes(model))
    if not names:
        raise PotstillError(
            f"{type(model).__name__} declares no decoder-layer classes (_no_split_modules), so "
            "FSDP2 cannot shard it layer by layer; set train.distributed ddp"
        )
    for module in model.modules():
        if type(module).__name__ in names and not isinstance(module, FSDPModule):
            fully_shard(module)
    # The input embeddings and the output head as units of their own (unless tied: one parameter cannot be in
    # two units): in the root together they are gathered together for the whole forward, the largest
    # transient of a big-vocabulary teacher (benchmarks/fsdp.py: 2069 -> 1997 MB per process). The head's
    # module never runs its forward here (the chunked reducer gathers its weight itself), so it stays sharded.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and out is not None and out.weight is not emb.weight:
        for module in (emb, out):
            if not isinstance(module, FSDPModule):
                fully_shard(module)
    fully_shard(model)
    model.register_forward_hook(lambda module, args, output: module.reshard())


def _is_fsdp_unit(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing is sharded
        return False
    return isinstance(module, FSDPModule)


def is_sharded(model) -> bool:
    """Whether ``model`` (or a module inside it) is an FSDP2 ``fully_shard`` module, or has parameters DeepSpeed
    ZeRO-3 partitions."""
    return any(_is_fsdp_unit(m) for m in model.modules()) or any(
        getattr(p, "ds_id", None) is not None for p in model.parameters()
    )


class gathered_for_generation:
    """Context manager: an FSDP2-sharded model's weights gathered once, for generation; a no-op otherwise.

    Sampling runs one forward per new token, and each process stops when its own sequences end, so the
    processes run different numbers of forwards. A sharded model's forward all-gathers its weights, a
    collective every process must join: a process that stopped early would leave the others waiting.
    Here every unit is gathered once on entry (the same collectives, in the same order, on every
    process) and kept gathered through the forwards (``reshard_after_forward`` off), so generation needs
    no collective at all; on exit the units are resharded and get back exactly the resharding they had
    (restoring it through the public ``set_reshard_after_forward(True)`` also turns it on for the root,
    which FSDP2 leaves gathered after forward, and the next backward crashed on CPU). Costs one whole copy of the model per process for
    the length of the generation: the price of sampling from a sharded model without a separate engine."""

    def __init__(self, model):
        self.units = [m for m in model.modules() if _is_fsdp_unit(m)]

    def __enter__(self):
        self.saved = []
        for unit in self.units:
            group = _param_group(unit)
            self.saved.append(None if group is None else group.post_forward_mesh_info)
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        return self

    def __exit__(self, *exc) -> None:
        for unit, info in zip(self.units, self.saved):
            unit.reshard()
            group = _param_group(unit)
            if group is not None:
                group.post_forward_mesh_info = info


def _param_group(unit):
    """The FSDP2 parameter group of a ``fully_shard`` unit (torch's private state: its resharding setting
    has no public getter), or ``None`` for a unit that owns no parameters."""
    return getattr(unit._get_fsdp_state(), "_fsdp_param_group", None)
