"""Two CPU processes under ``accelerate launch`` (gloo) equal one process on the same global batch."""

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch
from helpers_proc import launch_env, run, run_all
from safetensors.torch import load_file

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, engine", [("kd", "ddp"), ("contrastive", "ddp"), ("minillm", "ddp"), ("minillm", "fsdp2")]
)
def test_two_process_ddp_equals_single_process(tmp_path, method, engine):
    """And MiniLLM with student and teacher sharded by FSDP2: its loss reads both (gathered) heads directly."""
    env = launch_env()
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    # `run` kills every process of the command on timeout (torchrun's ranks have sessions of their own) and fails
    # the test if one outlives it; ddp_train.py dumps its stacks and exits first if a rank hangs (180 s).
    r1 = run([sys.executable, str(HERE / "ddp_train.py"), str(single), "8", "1", method], env=env, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # `--multi_gpu` is accelerate's torchrun path; on a machine without GPUs the script's `use_cpu=True` and
    # `ddp_backend="gloo"` make it 2 CPU processes (accelerate's `--cpu` multi-process path needs MPI).
    launch = accelerate_launch(str(HERE / "ddp_train.py"), str(multi), "2", "2", method, engine)
    r2 = run(launch, env=env, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = load_file(single / "student.safetensors")
    b = load_file(multi / "student.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs between 1 and 2 processes")
    sys.path.insert(0, str(HERE.parent))
    from conftest import make_tiny_llama, make_tiny_tokenizer

    init = make_tiny_llama(make_tiny_tokenizer(), layers=1, hidden=32, heads=2, kv_heads=1, seed=1).state_dict()
    moved = [k for k in a if not torch.equal(a[k], init[k])]
    assert len(moved) >= len(a) // 2, "the step must actually train the student"


def test_end_distributed_tears_the_group_down_and_is_a_no_op_without_one(tmp_path):
    """The CLI ends its process group itself: left to interpreter shutdown, gloo aborted ~1 run in 4 (SIGABRT)."""
    import torch.distributed as dist

    from potstill.distributed import end_distributed

    end_distributed()  # no group: nothing to do, and no error
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# One rank of a 2-process gloo job that, round after round, does what the end of a training run does: a DDP step,
# an all_gather of tensors made in Python (Trainer's last collective is one), end_distributed(), and only then
# drops the DDP model. Before end_distributed() kept the group until exit, the Reducer (freed with the GIL held)
# was the group's last owner: ~ProcessGroupGloo joined a gloo thread that was waiting for the GIL to free those
# tensors, and the rank hung for good (the hang of issue 14; here within a few rounds).
_TEARDOWN_RANK = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from potstill.distributed import end_distributed
    rank, store, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    for i in range(rounds):
        dist.init_process_group("gloo", init_method=f"file://{store}{i}", rank=rank, world_size=2)
        model = DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()
        gathered = [torch.zeros(3) for _ in range(2)]
        dist.all_gather(gathered, torch.ones(3))
        del gathered
        end_distributed()
        del model
    print("ok", flush=True)
""")


@pytest.mark.slow
def test_a_ddp_model_freed_after_end_distributed_does_not_hang_the_exit(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [[sys.executable, "-c", _TEARDOWN_RANK, str(r), str(tmp_path / "store"), "20"] for r in (0, 1)]
    for r in run_all(ranks, env=env, timeout=120):
        assert r.returncode == 0 and r.stdout == "ok\n", r.stderr[-2000:]
