"""``train.distributed``: a recipe run by ``accelerate launch`` on 2 CPU processes (gloo) equals one process.

The whole ``potstill distill`` path runs: each process loads and checks the recipe, FSDP2 shards the student
through accelerate's plugin (and the live teacher with ``fully_shard``; or DeepSpeed ZeRO-3 partitions both), the first process gathers the full
weights, writes the student and evaluates. The global batch is the same in both layouts (4 = 2 processes x 2),
on 8 training examples so that no process pads its share. The optimizer is the recipe's AdamW: it is blind
to a gradient's overall scale, so the loss curves (normalized by the global number of tokens) are compared
too; both agree to float32 rounding.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import accelerate_launch, scaled_student
from helpers_proc import launch_env, run
from safetensors.torch import load_file

HERE = Path(__file__).parent
# Logit KD from the live teacher: forward KL with CE (alpha 0.2).
KD = {"name": "kd", "alpha": 0.2, "divergence": {"name": "forward_kl"}}
# Feature KD: hidden states through a learned projection (student width 32 -> teacher 64) and attention relations;
# the projection hangs on the student while it trains, so each engine averages / shards it like the student's own.
FEAT = {
    "name": "feat",
    "alpha": 0.2,
    "divergence": {"name": "forward_kl"},
    "feature": {"layers": [[1, 2]], "relations": {"layers": [[1, 2]], "heads": 2}},
}
# MiniLLM: the teacher mixes into the sampling (a forward of the sharded teacher per new token). It must sample at
# temperature 1 and top_p 1, so the processes' samples differ from one process's: the run must finish (no process
# left waiting when the others' samples end) and train; its loss under sharding equals one process's on fixed
# samples in tests/kd/test_ddp.py.
MINILLM = {
    "name": "minillm",
    "alpha": 0.0,
    "divergence": {"name": "reverse_kl"},
    "on_policy": {"lmbda": 1.0, "max_new_tokens": 6, "minillm": {"mix": 0.2}},
}
# On-policy GKD (JSD(0.5), lambda = 1: every step on the student's own samples). top_p = 1e-6 keeps only each
# step's most likely token: sampling is greedy, so the samples are the same whatever the processes' draws.
GREEDY_GKD = {
    "name": "gkd",
    "alpha": 0.0,
    "divergence": {"name": "generalized_jsd", "beta": 0.5},
    "on_policy": {"lmbda": 1.0, "top_p": 1e-6, "max_new_tokens": 6},
}
PAIRS = [(f"Question number {i}: what comes after {i}?", f"The number {i + 1} comes after {i}.") for i in range(10)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, _tiny_teacher_session, _tiny_tokenizer_session):
    root = tmp_path_factory.mktemp("dist")
    _tiny_teacher_session.save_pretrained(root / "teacher")
    _tiny_tokenizer_session.save_pretrained(root / "teacher")
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return root


def _recipe(root: Path, path: Path, **extra) -> Path:
    r = {
        "output_dir": str(path.parent / "unused"),
        "teacher": {"model": str(root / "teacher")},
        "student": scaled_student(),
        "data": {"source": {"kind": "file", "path": str(root / "data.jsonl")}, "eval_size": 2, "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2},
        "runs": [KD],
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "device": "cpu",
        **extra,
    }
    path.write_text(yaml.safe_dump(r))
    return path


def _distill(recipe: Path, out: Path, *overrides: str, processes: int = 1):
    cli = ["-m", "potstill", "distill", str(recipe), f"output_dir={out}", *overrides]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:  # accelerate's torchrun path; `device: cpu` makes the processes CPU ones with gloo
        cmd = accelerate_launch(*cli, processes=processes)
    r = run(cmd, env=launch_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _same_student(one: Path, two: Path, run_name: str) -> dict:
    a_info = json.loads((one / "runs" / run_name / "train_info.json").read_text())
    b_info = json.loads((two / "runs" / run_name / "train_info.json").read_text())
    # The loss of each step (global-token normalized, so not blind to a wrong scale as AdamW is).
    torch.testing.assert_close(
        torch.tensor([v for _, v in b_info["loss_curve"]]),
        torch.tensor([v for _, v in a_info["loss_curve"]]),
        rtol=1e-5,
        atol=0,
    )
    a = load_file(one / "runs" / run_name / "model.safetensors")
    b = load_file(two / "runs" / run_name / "model.safetensors")
    assert a.keys() == b.keys()
    # AdamW moves each weight by about lr = 1e-2 per step whatever its gradient's size, so summation-order
    # differences in a gradient near AdamW's eps show up at about 1e-3 of a step (measured max 7e-6 after
    # 3 steps); 1e-4 is 1 % of one step. A rank training on the wrong rows is off by whole steps.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=f"{k} differs between 2 processes and 1")
    return b_info


@pytest.mark.slow
def test_fsdp2_recipe_on_two_processes_equals_one_process(teacher_dir, tmp_path):
    """Live teacher: forward KL with CE (alpha 0.2), two teachers by confidence, and on-policy GKD (JSD(0.5), lambda = 1: every step on
    the student's own samples, generated from the sharded student); student and teacher sharded.

    The samples must be the same in both layouts for the students to be comparable, but a process draws
    from its own random stream over its own rows; top_p = 1e-6 keeps only each step's most likely token,
    so sampling is greedy and independent of the draws. The processes' samples still end at different
    lengths, which is what generation from a sharded model has to survive."""
    recipe = _recipe(
        teacher_dir,
        tmp_path / "r.yaml",
        runs=[
            KD,
            GREEDY_GKD,
            {
                "name": "multi",
                "alpha": 0.0,
                "divergence": {"name": "forward_kl"},
                "multi_teacher": {"mode": "confidence"},
            },
            FEAT,
            MINILLM,
        ],
        extra_teachers=[{"model": str(teacher_dir / "teacher")}],
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _distill(recipe, one)
    r = _distill(recipe, two, "train.batch_size=2", "train.distributed=fsdp2", processes=2)
    assert r.stdout.count("report:") == 1, "only the first process reports"
    for name in ("kd", "gkd", "multi", "feat"):
        info = _same_student(one, two, name)
        assert info["distributed"] == {
            "engine": "fsdp2",
            "processes": 2,
            "student_sharded": True,
            "teacher_sharded": True,
            **({"extra_teachers_sharded": [True]} if name == "multi" else {}),
        }
        if name == "gkd":
            assert info["on_policy"]["modes"] == ["student"] * 3 and info["on_policy"]["gen_tokens"] > 0
    info = json.loads((two / "runs" / "minillm" / "train_info.json").read_text())
    assert info["distributed"]["teacher_sharded"] and info["on_policy"]["gen_tokens"] > 0
    assert len(info["loss_curve"]) == 3 and all(v == v and abs(v) < 1e3 for _, v in info["loss_curve"])
    # The first process evaluated the gathered students like one process did (the same weights, so the
    # same metrics up to the weights' rounding).
    m1 = json.loads((one / "metrics.json").read_text())["runs"]
    m2 = json.loads((two / "metrics.json").read_text())["runs"]
    assert set(m1) == set(m2) == {"teacher", "student_init", "kd", "gkd", "multi", "feat", "minillm"}
    for name in set(m1) - {"minillm"}:
        assert m2[name]["forward_kl"] == pytest.approx(m1[name]["forward_kl"], rel=1e-3, abs=1e-6)
    # bf16 under FSDP2 with activation checkpointing (accelerate's FSDP2 mixed precision: bf16 parameters for
    # compute, bf16 gradient reduce-scatter, float32 master weights). bf16 must be on: the first step's loss
    # differs from float32's, but by no more than bf16's unit roundoff 2^-8 relative (each weight and
    # activation carries at most 2^-9 relative error and the loss is a mean of smooth terms of them; measured
    # 9e-6). Silently dropping bf16 (as the CPU path once did) gives the float32 run's loss in the same
    # layout bit for bit.
    bf16 = _recipe(teacher_dir, tmp_path / "bf16.yaml")
    _distill(
        bf16,
        tmp_path / "bf16",
        "train.batch_size=2",
        "train.distributed=fsdp2",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        processes=2,
    )
    first = json.loads((tmp_path / "bf16" / "runs" / "kd" / "train_info.json").read_text())["loss_curve"][0][1]
    ref = json.loads((two / "runs" / "kd" / "train_info.json").read_text())["loss_curve"][0][1]  # same layout
    assert first != ref and abs(first - ref) <= 2**-8 * ref, (first, ref)
    # What was written is an ordinary Hugging Face checkpoint: plain transformers loads it.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(two / "runs" / "kd").state_dict()
    saved = load_file(two / "runs" / "kd" / "model.safetensors")
    for k, v in saved.items():
        torch.testing.assert_close(hf[k], v, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signal, engine, lora",
    [({"kind": "sampled", "draws": 8}, "fsdp2", True), ({"kind": "topk", "k": 8}, "zero3", False)],
    ids=["sampled-fsdp2-lora", "topk-zero3"],
)
def test_student_from_a_cache_equals_one_process(teacher_dir, tmp_path, signal, engine, lora):
    """A student trained from a teacher cache, no teacher in the loop: a LoRA student (merged at the end) from
    sampled tokens under FSDP2, a whole student from top-k log-probs under ZeRO-3."""
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    recipe = _recipe(
        teacher_dir, tmp_path / "r.yaml", cache={"signal": signal, "dtype": "fp32", "dir": str(tmp_path / "c")}
    )
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["train.lora.r=4", "train.lora.lora_alpha=8", "train.lora.target_modules=[q_proj, v_proj]"] if lora else []
    r = run(
        [sys.executable, "-m", "potstill", "cache", str(recipe), f"output_dir={one}"], env=launch_env(), timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _distill(recipe, one, *extra)
    _distill(recipe, two, *extra, "train.batch_size=2", f"train.distributed={engine}", processes=2)
    info = _same_student(one, two, "kd")
    assert info["distributed"]["student_sharded"] and not info["distributed"]["teacher_sharded"]
    base = load_file(one / "runs" / "kd" / "model.safetensors")
    assert not any("lora" in k for k in base), "the adapter is merged into plain weights"


@pytest.mark.slow
def test_ddp_recipe_on_two_processes_equals_one_process(teacher_dir, tmp_path):
    """Also feature KD: DDP averages the projection's gradient like the student's (before the projection hung
    on the student, each process trained its own copy and the students drifted apart)."""
    recipe = _recipe(teacher_dir, tmp_path / "r.yaml", runs=[{"name": "kd", "alpha": 0.2}, FEAT])
    one, two = tmp_path / "one", tmp_path / "two"
    _distill(recipe, one)
    _distill(recipe, two, "train.batch_size=2", "train.distributed=ddp", processes=2)
    for name in ("kd", "feat"):
        info = _same_student(one, two, name)
        assert info["distributed"] == {
            "engine": "ddp",
            "processes": 2,
            "student_sharded": False,
            "teacher_sharded": False,
        }


@pytest.mark.slow
def test_zero3_recipe_on_two_processes_equals_one_process(teacher_dir, tmp_path):
    """DeepSpeed ZeRO-3 through accelerate's DeepSpeed plugin, the same recipe: the student partitioned by the
    Trainer's engine (its output head too: 400 x 32 is above the persistence threshold of 10 x hidden), the
    live teacher partitioned for inference. The reducer reads both heads after the models' forwards, so it
    gathers them itself and hands the student head's gradient back to DeepSpeed; on-policy GKD samples from
    the partitioned student (Hugging Face's generate keeps the processes in step). As for FSDP2, greedy
    sampling (top_p 1e-6) makes the samples the same in both layouts."""
    pytest.importorskip("deepspeed")
    recipe = _recipe(
        teacher_dir,
        tmp_path / "r.yaml",
        runs=[
            KD,
            GREEDY_GKD,
            FEAT,
        ],
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _distill(recipe, one)
    _distill(recipe, two, "train.batch_size=2", "train.distributed=zero3", processes=2)
    for name in ("kd", "gkd", "feat"):
        info = _same_student(one, two, name)
        assert info["distributed"] == {
            "engine": "zero3",
            "processes": 2,
            "student_sharded": True,
            "teacher_sharded": True,
        }
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(two / "runs" / "kd").state_dict()
    for k, v in load_file(two / "runs" / "kd" / "model.safetensors").items():
        torch.testing.assert_close(hf[k], v, rtol=0, atol=0)
    # bf16: DeepSpeed computes with a bf16 module over float32 master weights in its optimizer. bf16 takes
    # effect (the first loss moves, by no more than 2^-8 relative, as for FSDP2) and the student saved is the
    # float32 masters, not the module's bf16 copy (whose every weight a bf16 round trip leaves unchanged).
    bf16 = _recipe(teacher_dir, tmp_path / "bf16.yaml")
    _distill(
        bf16, tmp_path / "bf16", "train.batch_size=2", "train.distributed=zero3", "train.precision=bf16", processes=2
    )
    first = json.loads((tmp_path / "bf16" / "runs" / "kd" / "train_info.json").read_text())["loss_curve"][0][1]
    ref = json.loads((two / "runs" / "kd" / "train_info.json").read_text())["loss_curve"][0][1]
    assert first != ref and abs(first - ref) <= 2**-8 * ref, (first, ref)
    saved = load_file(tmp_path / "bf16" / "runs" / "kd" / "model.safetensors")
    w = saved["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_a_run_killed_mid_run_resumes_to_the_uninterrupted_student(teacher_dir, tmp_path, engine):
    """``train.save_steps`` under ddp, fsdp2 and zero3 (the Trainer's sharded checkpoints: each process's shards
    of the student and its optimizer state): the two processes SIGKILLed (launcher and ranks) once the checkpoint at
    step 4 of 8 is marked, then the same launch again: it resumes from a marked checkpoint and ends with the
    student and loss curve of a ddp run never interrupted, bit for bit (CPU, float32, gloo). The replicas'
    RNG states are the Trainer's per-process ones; on-policy GKD with a replay buffer draws from both."""
    import subprocess
    import time
    import uuid

    from helpers_proc import MARKER, kill_marked

    runs = [
        {
            "name": "kd",
            "alpha": 0.0,
            "divergence": {"name": "generalized_jsd", "beta": 0.5},
            "on_policy": {"lmbda": 0.7, "max_new_tokens": 5, "replay_size": 4, "replay_reuse": 0.5},
        }
    ]
    recipe = _recipe(
        teacher_dir,
        tmp_path / "r.yaml",
        runs=runs,
        train={
            "max_steps": 8,
            "batch_size": 2,
            "logging_steps": 1,
            "learning_rate": 1e-2,
            "save_steps": 2,
            "distributed": engine,
        },
    )
    ref, out = tmp_path / "ref", tmp_path / "out"
    _distill(recipe, ref, processes=2)

    cmd = accelerate_launch("-m", "potstill", "distill", str(recipe), f"output_dir={out}")
    value = uuid.uuid4().hex
    mark = out / "checkpoints" / "kd" / "checkpoint-4" / "potstill_run.json"
    proc = subprocess.Popen(
        cmd,
        env={**launch_env(), MARKER: value},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        kill_marked(value, [proc])
    assert mark.exists() and not (out / "runs" / "kd" / "POTSTILL_DONE").exists(), "killed mid-run"

    _distill(recipe, out, processes=2)
    info = json.loads((out / "runs" / "kd" / "train_info.json").read_text())
    ref_info = json.loads((ref / "runs" / "kd" / "train_info.json").read_text())
    assert int(info["resumed_from"].split("-")[1]) >= 4
    assert info["loss_curve"] == ref_info["loss_curve"]
    assert info["on_policy"]["modes"] == ref_info["on_policy"]["modes"]
    a, b = load_file(ref / "runs" / "kd" / "model.safetensors"), load_file(out / "runs" / "kd" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
