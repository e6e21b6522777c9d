"""Mixed precision (``train.precision``) and gradient checkpointing (``train.gradient_checkpointing``).

Both go through the Trainer's own switches (``kd_config``): bf16/fp16 autocast over float32
master weights, and non-reentrant activation checkpointing. What is checked here, on CPU:
bf16 stays within a derived bound of fp32; the reducer is finite in bf16 for logits up to
1e4; checkpointing leaves the first step's gradients unchanged for logit and feature KD;
generation keeps its KV cache under checkpointing; what a device cannot do is refused in one
line before anything is written.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import one_step_cpu_args, scaled_student
from transformers import TrainerCallback

from potstill.cli import main
from potstill.data import encode_example
from potstill.divergences import DIVERGENCES, chunked_kd_loss
from potstill.errors import PotstillError
from potstill.kd import KDConfig, KDTrainer
from potstill.kd.feature import FeatureKDConfig, FeatureKDTrainer
from potstill.recipes.distill import recipe_from_dict
from potstill.runners.prepare import check_precision
from potstill.runners.train import kd_config
from potstill.signals import DenseSignal, Head

pytestmark = pytest.mark.usefixtures("one_thread")

U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night, so we walk to the park."),
    ("How many days are in a week?", "Seven."),
]


def dataset(tok):
    rows = [encode_example(tok, [{"role": "user", "content": p}], r, 64) for p, r in PAIRS]
    return Dataset.from_list([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in rows])


def cfg(tmp_path, cls=KDConfig, **kw):
    """One plain SGD step on one batch of 4, no clipping: the gradients seen are the raw ones."""
    return cls(**(one_step_cpu_args(tmp_path, max_grad_norm=0.0, alpha=0.5) | kw))


def checkpointing(reentrant: bool = False) -> dict:
    """The TrainingArguments of checkpointing (``activation_checkpointing`` from transformers 5, before that
    ``gradient_checkpointing``)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    name = "activation_checkpointing"
    if name not in {f.name for f in fields(TrainingArguments)}:
        name = "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": reentrant}}


def is_checkpointing(model) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)


class _FirstGrads(TrainerCallback):
    """The student's gradients just before the first optimizer step (float64 copies)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None
            }


def first_step(teacher, student, tok, args, trainer_cls=KDTrainer):
    """``(first micro-batch loss, {name: grad}, trainer)`` of one training step on fresh copies of the models."""
    grab = _FirstGrads()
    trainer = trainer_cls(
        model=copy.deepcopy(student),
        teacher_model=copy.deepcopy(teacher),
        args=args,
        train_dataset=dataset(tok),
        processing_class=tok,
        callbacks=[grab],
    )
    losses = []
    compute = trainer.compute_loss

    def recorded(*a, **k):
        loss = compute(*a, **k)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    assert len(losses) == 1 and grab.grads
    return losses[0], grab.grads, trainer


def flat(grads: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in names])


def grad_errors(want: dict, got: dict) -> tuple[float, float]:
    """``(||g - g_ref|| / ||g_ref||, cos(g, g_ref))`` over all student parameters (same names required)."""
    assert want.keys() == got.keys()
    a, b = flat(want, sorted(want)), flat(got, sorted(want))
    return float((b - a).norm() / a.norm()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# ------------------------------------------------------------------------------ bf16


def test_bf16_first_step_matches_fp32_within_derived_bound(tiny_llama_pair, tmp_path):
    """bf16 autocast vs fp32: first-step loss and student gradients (logit KD, alpha 0.5, forward KL).

    Derivation (first order, u = 2^-8 = 3.9e-3 the unit roundoff of bf16). Under autocast each
    matmul of the student's forward rounds its two inputs and its output to bf16 and accumulates in
    fp32, so it adds at most ~3u relative error, measured against sum_i |a_i||b_i| as in the
    standard dot-product analysis (Higham, Accuracy and Stability, sec. 3.1; the fp32 accumulation
    term n * 2^-24 is negligible). The one-layer student has m = 5 such stages in sequence
    (q/k/v -> attention -> o_proj -> gate/up -> down), so its final hidden state carries <= 3mu = 15u.
    The lm_head and the loss run in fp32 (accelerate autocasts only ``model.forward``; the reducer
    projects outside it), so |dz_j| <= 15u * Z with Z = max_j sum_i |W_ji| |h_i| over the batch. Per
    token, CE and KL have a gradient in the logits of L1 norm <= 2 (softmax minus a distribution),
    and the loss is a mean over tokens, hence |d loss| <= 2 * 15u * Z = 30u Z.
    The backward under autocast rounds through the same m stages again, so the gradient's relative
    error in norm is <= 2 * 3mu = 30u = 0.117, and cos(g_bf16, g_fp32) >= 1 - (30u)^2 / 2 = 0.993.
    (Measured here: about 2e-6 relative on the loss, 1e-3 on the gradients.) The gradients must also
    differ at all, so that autocast is known to have been on.
    """
    teacher, student, tok = tiny_llama_pair
    loss32, g32, _ = first_step(teacher, student, tok, cfg(tmp_path))
    loss16, g16, tr = first_step(teacher, student, tok, cfg(tmp_path, bf16=True))
    assert tr.accelerator.native_amp and tr.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in tr.model.parameters()), "master weights stay float32"
    # Z = max_j sum_i |W_ji| |h_i| of the fp32 student on the same batch.
    from potstill.data import PadCollator
    from potstill.models import final_hidden, output_head

    batch = PadCollator(tok.pad_token_id)([dataset(tok)[i] for i in range(4)])
    with torch.no_grad():
        h = final_hidden(student, batch["input_ids"], batch["attention_mask"]).abs()
        z_abs = float((h @ output_head(student).weight.abs().t()).max())
    assert abs(loss16 - loss32) <= 30 * U_BF16 * z_abs, (loss16, loss32, z_abs)
    rel, cos = grad_errors(g32, g16)
    assert 0.0 < rel <= 30 * U_BF16, rel
    assert cos >= 1 - (30 * U_BF16) ** 2 / 2, cos


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bf16_reducer_finite_for_logits_up_to_1e4(name):
    """The chunked reducer with bf16 hidden states and a bf16 head whose logits reach +-1e4 (and a bf16
    teacher with logits at +-1e4): finite loss and finite gradients for every divergence (default params)."""
    g = torch.Generator().manual_seed(0)
    n, hidden, vocab = 24, 16, 40
    h = torch.randint(0, 2, (n, hidden), generator=g).float().mul(2).sub(1)  # +-1
    scale = 640.0  # exact in bf16; 16 * 640 = 10240
    w = torch.randint(0, 2, (vocab, hidden), generator=g).float().mul(2).sub(1) * scale
    w[0] = h[0] * scale  # logit 0 of position 0 is +10240
    w[1] = -h[1] * scale  # logit 1 of position 1 is -10240
    h = h.bfloat16().requires_grad_()
    w = w.bfloat16().requires_grad_()
    logits = h.detach().float() @ w.detach().float().t()
    assert float(logits.max()) >= 1e4 and float(logits.min()) <= -1e4
    teacher = (torch.rand(n, vocab, generator=g) * 2e4 - 1e4).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    loss, stats = chunked_kd_loss(
        h,
        Head(weight=w),
        labels,
        DenseSignal(logits=teacher),
        divergence=name,
        alpha=0.5,
        normalizer=int((labels != -100).sum()),
        chunk_size=7,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats["kd_sum"]), (name, loss)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all(), name
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("feature", [False, True], ids=["logit", "feature"])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bf16_student_with_every_teacher_dtype(tiny_llama_pair, tmp_path, teacher_dtype, feature):
    """bf16 autocast of the student works with teacher weights in fp32, bf16 and fp16 (``teacher.dtype``), for
    logit KD and for feature KD (hidden-state pairs through a projection, attention relations)."""
    teacher, student, tok = tiny_llama_pair
    kw = (
        dict(cls=FeatureKDConfig, feature_layers=[[1, 2]], relation_layers=[[1, 2]], relation_heads=2)
        if feature
        else {}
    )
    loss, grads, tr = first_step(
        teacher.to(teacher_dtype),
        student,
        tok,
        cfg(tmp_path, bf16=True, **kw),
        FeatureKDTrainer if feature else KDTrainer,
    )
    assert math.isfinite(loss) and all(torch.isfinite(v).all() for v in grads.values())
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


# ------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_keeps_logit_kd_gradients(tiny_llama_pair, tmp_path):
    """KDTrainer, fp32: the first step's loss and every student gradient are the same with and without
    non-reentrant checkpointing, to 1e-6 relative in norm (the recompute replays the same fp32 ops on the same
    inputs, so the only allowed difference is reassociation noise, ~1e-7 per op)."""
    teacher, student, tok = tiny_llama_pair
    loss0, g0, _ = first_step(teacher, student, tok, cfg(tmp_path))
    loss1, g1, tr = first_step(teacher, student, tok, cfg(tmp_path, **checkpointing()))
    assert is_checkpointing(tr.model)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grad_errors(g0, g1)[0] <= 1e-6
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-9 * float(g0[name].abs().max()))


def test_gradient_checkpointing_keeps_feature_kd_gradients(tiny_llama_pair, tmp_path):
    """FeatureKDTrainer with hidden-state pairs and attention relations (q/k/v of a checkpointed layer,
    captured by forward hooks): same loss and gradients with and without checkpointing (1e-6 relative).

    The hooks are removed when the student's forward returns, so the recompute in backward captures
    nothing, and the captured tensors are those of the real forward. Sensitivity check: reentrant
    checkpointing (which runs the layer's forward without a graph) loses the relation term's gradients
    into q/k/v, and this comparison sees that.
    """
    teacher, student, tok = tiny_llama_pair
    fk = dict(cls=FeatureKDConfig, feature_layers=[[1, 2], [0, 0]], relation_layers=[[1, 2]], relation_heads=2)
    loss0, g0, _ = first_step(teacher, student, tok, cfg(tmp_path, **fk), FeatureKDTrainer)
    loss1, g1, tr = first_step(teacher, student, tok, cfg(tmp_path, **fk, **checkpointing()), FeatureKDTrainer)
    assert is_checkpointing(tr.model)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grad_errors(g0, g1)[0] <= 1e-6
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-9 * float(g0[name].abs().max()))
    _, g2, _ = first_step(teacher, student, tok, cfg(tmp_path, **fk, **checkpointing(reentrant=True)), FeatureKDTrainer)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert float((g2[q] - g0[q]).norm() / g0[q].norm()) > 1e-3, "the comparison must see lost relation gradients"


def test_generation_keeps_kv_cache_under_checkpointing(tiny_student, tiny_tokenizer):
    """On-policy sampling goes through potstill.generate (eval mode, no grad, use_cache=True): with
    checkpointing on and the model in training mode, each decoding step still feeds one new token."""
    from potstill.generate import generate

    model = tiny_student
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert is_checkpointing(model)
    model.train()
    lengths = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    prompt = tiny_tokenizer("What is two plus two?")["input_ids"]
    generate(model, tiny_tokenizer, [prompt], max_new_tokens=5, do_sample=False, progress=False, warmup=False)
    hook.remove()
    assert model.training, "generate restores training mode"
    assert lengths[0] == len(prompt) and len(lengths) > 1 and set(lengths[1:]) == {1}, lengths


# --------------------------------------------------------------- recipe and checks


def _recipe(**train):
    return recipe_from_dict({"train": train, "runs": [{"name": "kd", "alpha": 0.0}], "device": "cpu"})


def test_kd_config_maps_the_recipe_keys(tmp_path):
    r = _recipe(precision="bf16", gradient_checkpointing=True)
    args = kd_config(r, r.runs[0], str(tmp_path / "o"), torch.device("cpu"))
    assert args.bf16 and not args.fp16
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    r = _recipe()
    assert (r.train.precision, r.train.gradient_checkpointing) == ("fp32", False)
    args = kd_config(r, r.runs[0], str(tmp_path / "o"), torch.device("cpu"))
    assert not args.bf16 and not args.fp16 and not args.activation_checkpointing
    with pytest.raises(PotstillError, match="precision"):
        _recipe(precision="fp8")


def test_precision_the_device_cannot_do_is_refused_in_one_line(monkeypatch, tiny_student):
    with pytest.raises(PotstillError) as err:
        check_precision("fp16", torch.device("cpu"))
    assert "; " in str(err.value) and "\n" not in str(err.value) and "bf16 or fp32" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(PotstillError, match="V100 has no native bfloat16.*; set train.precision fp16 or fp32"):
        check_precision("bf16", torch.device("cuda", 0))
    with pytest.raises(PotstillError, match="bfloat16 weights; set student.dtype float32"):
        check_precision("bf16", torch.device("cpu"), tiny_student.bfloat16())
    check_precision("bf16", torch.device("cpu"), tiny_student.float())
    check_precision("fp32", torch.device("cpu"), tiny_student.bfloat16())


@pytest.fixture(scope="module")
def assets(tmp_path_factory, _tiny_teacher_session, _tiny_tokenizer_session):
    root = tmp_path_factory.mktemp("precision")
    teacher = root / "teacher"
    _tiny_teacher_session.save_pretrained(teacher)
    _tiny_tokenizer_session.save_pretrained(teacher)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * 2))
    return teacher, data


def _write_recipe(assets, tmp_path: Path, **train) -> Path:
    teacher, data = assets
    r = {
        "output_dir": str(tmp_path / "out"),
        "teacher": {"model": str(teacher)},
        "student": scaled_student(),
        "data": {"source": {"kind": "file", "path": str(data)}, "eval_size": 2, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3, **train},
        "runs": [{"name": "kd", "alpha": 0.5}],
        "eval": {"max_new_tokens": 2, "batch_size": 2, "include_untrained": False},
        "device": "cpu",
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def test_distill_with_bf16_and_checkpointing_saves_float32_student(assets, tmp_path):
    from safetensors import safe_open

    assert main(["distill", str(_write_recipe(assets, tmp_path, precision="bf16", gradient_checkpointing=True))]) == 0
    files = list((tmp_path / "out" / "runs" / "kd").glob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}


def test_distill_fp16_on_cpu_refused_before_anything_is_written(assets, tmp_path, capsys):
    rc = main(["distill", str(_write_recipe(assets, tmp_path, precision="fp16"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.precision fp16 needs a GPU" in err[0], err
    assert not (tmp_path / "out").exists()
