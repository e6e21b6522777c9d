"""Two CPU processes with FSDP2 ``fully_shard`` (gloo) train the student exactly as one process on the same batch.

The student's and the teacher's lm_head are sharded DTensors when the chunked reducer runs (checked inside the
ranks), so the test cannot pass on an unsharded model, nor if the reducer used a rank's shard of the head (the
shard has half the vocabulary rows: a wrong loss, or a refused one).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch
from helpers_proc import free_port, launch_env, run, run_all
from safetensors.torch import load_file

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("divergence, tied", [("forward_kl", ""), ("generalized_jsd", ""), ("forward_kl", "tied")])
def test_fsdp2_two_processes_equal_one_process(tmp_path, divergence, tied):
    env = launch_env()
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    script = str(HERE / "fsdp_train.py")
    # `run` / `run_all` kill every process of the commands on timeout and fail the test if one outlives them;
    # fsdp_train.py dumps its stacks and exits first if a rank hangs (180 s).
    r1 = run([sys.executable, script, str(single), divergence, tied], env=env, timeout=240)
    assert r1.returncode == 0, r1.stderr[-3000:]
    port = str(free_port())
    ranks = [
        {
            **env,
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        for r in range(2)
    ]
    # run_all takes one environment: each rank gets its own through `env` on the command line.
    cmds = [
        [
            "env",
            *(
                f"{k}={v}"
                for k, v in e.items()
                if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            ),
            sys.executable,
            script,
            str(multi),
            divergence,
            tied,
        ]
        for e in ranks
    ]
    results = run_all(cmds, env=env, timeout=240)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]

    infos = json.loads((multi / "info.json").read_text())
    ref_info = json.loads((single / "info.json").read_text())[0]
    assert [i["rank"] for i in infos] == [0, 1]
    full_rows = ref_info["head_shape"][0][0]
    for info in infos:
        # Sharded when the reducer ran: each rank held half of the head's rows, so using the shard would be wrong.
        assert info["student_head"] == ["DTensor"] * 3 and info["teacher_head"] == "DTensor", info
        assert all(shape[0] < full_rows for shape in info["head_shape"]), info
    # The global normalization makes the ranks' losses add up to the one-process loss, step by step.
    torch.testing.assert_close(
        torch.tensor([sum(v) for v in zip(*(i["loss"] for i in infos))]),
        torch.tensor(ref_info["loss"]),
        rtol=1e-5,
        atol=1e-6,
    )

    a = load_file(single / "student.safetensors")
    b = load_file(multi / "student.safetensors")
    assert a.keys() == b.keys()
    # fp32 throughout; the two layouts differ only in the order of summation (two half-batch gradients
    # reduce-scattered vs one full-batch gradient), a few ulps per step: measured max |diff| 7.5e-9 on
    # weights of size ~0.08 after 3 steps. A wrong normalization or head gradient is off by a factor (>= 1e-3).
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs between FSDP2 and 1 process")

    sys.path.insert(0, str(HERE.parent))
    from conftest import make_tiny_llama, make_tiny_tokenizer

    init = make_tiny_llama(make_tiny_tokenizer(), layers=1, hidden=32, heads=2, kv_heads=1, seed=1).state_dict()
    if tied:
        init["lm_head.weight"] = init["model.embed_tokens.weight"]
        torch.testing.assert_close(b["lm_head.weight"], b["model.embed_tokens.weight"], rtol=0, atol=0)
    moved = [k for k in a if not torch.equal(a[k], init[k])]
    assert "lm_head.weight" in moved and len(moved) >= len(a) // 2, "the steps must actually train the student"
    # The head moved by much more than the tolerance: a missing or doubled head gradient would fail above.
    assert float((a["lm_head.weight"] - init["lm_head.weight"]).abs().max()) > 1e-3

    # The gathered state, saved with save_pretrained on rank 0, is an ordinary Hugging Face checkpoint.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(multi / "hf").state_dict()
    for k in b:
        torch.testing.assert_close(hf[k], b[k], rtol=0, atol=0, msg=f"{k} differs in the consolidated checkpoint")


def test_full_head_passes_plain_heads_through_and_gathers_a_sharded_one(tmp_path):
    """One process: a plain head is returned as is (the single-process path is unchanged); a DTensor head is
    gathered, its gradient lands on the shard, and a frozen one is gathered without a graph."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from potstill.distributed import end_distributed
    from potstill.divergences.chunked import full_head
    from potstill.signals import Head

    plain = Head(weight=torch.nn.Parameter(torch.randn(5, 3)), bias=torch.nn.Parameter(torch.randn(5)))
    assert full_head(plain) is plain
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.randn(5, 3)
        w = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        head = full_head(Head(weight=w, softcap=30.0))
        assert not isinstance(head.weight, DTensor) and head.softcap == 30.0
        torch.testing.assert_close(head.weight, full, rtol=0, atol=0)
        (head.weight * torch.arange(15.0).view(5, 3)).sum().backward()
        assert isinstance(w.grad, DTensor)
        torch.testing.assert_close(w.grad.full_tensor(), torch.arange(15.0).view(5, 3), rtol=0, atol=0)
        frozen = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]), requires_grad=False)
        assert full_head(Head(weight=frozen)).weight.grad_fn is None
    finally:
        end_distributed()


@pytest.mark.slow
def test_zero3_tied_head_two_processes_equal_one_process(tmp_path):
    """DeepSpeed ZeRO-3 (accelerate's DeepSpeed plugin, 2 CPU processes) with every parameter partitioned and
    the student's head tied to its embeddings: the reducer gathers the head itself and hands its gradient back
    to DeepSpeed while DeepSpeed also gathers the same parameter for the embedding; the student equals one
    process's after 3 SGD steps (measured 4e-9)."""
    pytest.importorskip("deepspeed")
    env = launch_env()
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    script = str(HERE / "zero3_train.py")
    r1 = run([sys.executable, script, str(single), "tied"], env=env, timeout=240)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run(accelerate_launch(script, str(multi), "tied"), env=env, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = json.loads((single / "info.json").read_text())
    two = json.loads((multi / "info.json").read_text())
    assert one["partitioned"] == [False] * 3 and two["partitioned"] == [True] * 3, (one, two)
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)
    a = load_file(single / "student.safetensors")
    b = load_file(multi / "student.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # as for FSDP2 above: summation order only; a wrong or missing head gradient is off by >= 1e-3
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs between ZeRO-3 and 1 process")
    torch.testing.assert_close(b["lm_head.weight"], b["model.embed_tokens.weight"], rtol=0, atol=0)
    sys.path.insert(0, str(HERE.parent))
    from conftest import make_tiny_llama, make_tiny_tokenizer

    init = make_tiny_llama(make_tiny_tokenizer(), layers=1, hidden=32, heads=2, kv_heads=1, seed=1).state_dict()
    assert float((a["model.embed_tokens.weight"] - init["model.embed_tokens.weight"]).abs().max()) > 1e-3
