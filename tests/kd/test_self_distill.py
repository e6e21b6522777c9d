"""Self-distillation (teacher.kind self): the frozen copy (born-again networks, Furlanello et al. 2018) and the
EMA teacher (mean teacher, Tarvainen & Valpola 2017, eq. 1), checked against their closed forms, through the
KD trainer, end to end through a recipe, and the recipe's refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import encode_kd_pairs, kd_cfg, kd_dataset, recipe
from transformers import TrainerCallback

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd import KDTrainer
from potstill.kd.self_distill import EMATeacherCallback, ema_update_, frozen_copy, self_teacher
from potstill.recipes.distill import recipe_from_dict

# ------------------------------------------------------------------ the EMA update against its closed form


def _tiny(values: list[float]) -> torch.nn.Module:
    """A Linear(2, 2) (weight [2, 2], bias [2]) whose six parameters are set by hand, in order."""
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        flat = torch.tensor(values, dtype=torch.float32)
        m.weight.copy_(flat[:4].view(2, 2))
        m.bias.copy_(flat[4:])
    return m


def _flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]).double()


STUDENT_PATH = [  # theta_S,0 .. theta_S,4, chosen by hand
    [1.0, -2.0, 0.5, 4.0, 0.0, 3.0],
    [2.0, -1.0, 0.0, 3.0, 1.0, 2.0],
    [-1.0, 0.5, 1.5, 2.0, -2.0, 0.0],
    [0.25, 0.25, -3.0, 1.0, 4.0, 1.0],
    [3.0, 1.0, 2.0, -1.0, 0.5, -0.5],
]


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_ema_after_n_steps_equals_its_closed_form(decay):
    """theta_T,n = decay^n theta_0 + (1 - decay) sum_{k=1..n} decay^(n-k) theta_k, in float64 by hand."""
    student = _tiny(STUDENT_PATH[0])
    teacher = frozen_copy(student)
    for theta in STUDENT_PATH[1:]:
        with torch.no_grad():
            student.weight.copy_(_tiny(theta).weight)
            student.bias.copy_(_tiny(theta).bias)
        ema_update_(teacher, student, decay)
    n = len(STUDENT_PATH) - 1
    path = [torch.tensor(t, dtype=torch.float64) for t in STUDENT_PATH]
    want = decay**n * path[0] + (1 - decay) * sum(decay ** (n - k) * path[k] for k in range(1, n + 1))
    torch.testing.assert_close(_flat(teacher), want, rtol=1e-6, atol=1e-6)
    if decay == 0.0:  # no memory at all: the teacher is the student
        torch.testing.assert_close(_flat(teacher), _flat(student), rtol=0, atol=0)


def test_bf16_ema_accumulates_in_float32():
    """decay 0.999 moves a weight of 1 by 5e-4 a step, below bfloat16's spacing (2^-7 at 1): a bfloat16 average
    never moves; the float32 shadow follows the closed form and the teacher holds its rounding."""
    student = _tiny([1.0] * 6).to(torch.bfloat16)
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.5)
    shadow: dict[str, torch.Tensor] = {}
    naive = frozen_copy(teacher)
    for _ in range(10):
        ema_update_(teacher, student, 0.999, shadow)
        with torch.no_grad():  # what a plain bfloat16 average would do
            for t, s in zip(naive.parameters(), student.parameters()):
                t.mul_(0.999).add_(s, alpha=0.001)
    want = 1.5 - 0.5 * 0.999**10  # decay^n * 1 + (1 - decay^n) * 1.5
    assert torch.all(naive.weight == 1.0), "the bfloat16 average should be stuck (else this test proves nothing)"
    assert shadow["weight"].dtype == torch.float32
    torch.testing.assert_close(shadow["weight"].double(), torch.full((2, 2), want, dtype=torch.float64))
    assert teacher.weight.dtype == torch.bfloat16
    assert torch.equal(teacher.weight, torch.full((2, 2), want).to(torch.bfloat16))


def test_frozen_copy_is_frozen_independent_and_alike(tiny_student):
    student = tiny_student.train()
    teacher = frozen_copy(student)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters()), "the student must stay trainable"
    for (n, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        assert t.dtype == s.dtype and t.device == s.device and torch.equal(t, s), n
        assert t.data_ptr() != s.data_ptr(), f"{n} shares storage with the student"


def test_decay_outside_unit_interval_and_a_foreign_teacher_are_refused(tiny_student, tiny_teacher):
    with pytest.raises(PotstillError, match=r"outside \[0, 1\)"):
        ema_update_(frozen_copy(tiny_student), tiny_student, 1.0)
    with pytest.raises(PotstillError, match="no match in the student"):
        ema_update_(frozen_copy(tiny_teacher), tiny_student, 0.9)
    with pytest.raises(PotstillError, match="unknown"):
        self_teacher(tiny_student, "swa")


# ------------------------------------------------------------------------- through the KD trainer


def test_a_self_teacher_gives_zero_kd_on_the_first_step(tiny_llama_pair, tmp_path):
    """Teacher == student at step 0, so the loss is alpha * CE exactly; plain KD from another teacher is not."""
    teacher, student, tok = tiny_llama_pair
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    student.train()
    ce = student(**batch).loss.detach()  # HF's mean token cross-entropy, written independently of potstill
    for mode in ("frozen", "ema"):
        source, _ = self_teacher(student, mode, 0.9)
        tr = KDTrainer(model=student, args=kd_cfg(tmp_path, alpha=0.3), signal_source=source, processing_class=tok)
        torch.testing.assert_close(tr.compute_loss(student, batch).detach(), 0.3 * ce, rtol=1e-5, atol=1e-6)
    other = KDTrainer(model=student, teacher_model=teacher, args=kd_cfg(tmp_path, alpha=0.3), processing_class=tok)
    assert other.compute_loss(student, batch).item() > 0.3 * ce.item() + 1e-3


class _Record(TrainerCallback):
    """The student's parameters after every optimizer step, in float64 (added before the EMA callback)."""

    def __init__(self, student):
        self.student, self.path = student, [{n: p.detach().double().clone() for n, p in student.named_parameters()}]

    def on_step_end(self, args, state, control, **kwargs):
        self.path.append({n: p.detach().double().clone() for n, p in self.student.named_parameters()})


def test_ema_teacher_follows_the_student_and_frozen_stays(tiny_student, tiny_tokenizer, tmp_path):
    """Three SGD steps: the EMA teacher is the closed form over the student's recorded path (so it updates after
    each optimizer step), it moved toward the student, and the frozen teacher is the initial student."""
    student, tok, decay = tiny_student.train(), tiny_tokenizer, 0.5
    init = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    frozen, _ = self_teacher(student, "frozen")
    ema, callback = self_teacher(student, "ema", decay)
    rec = _Record(student)
    tr = KDTrainer(
        model=student,
        args=kd_cfg(tmp_path, alpha=0.5, max_steps=3, per_device_train_batch_size=2),
        signal_source=ema,
        train_dataset=kd_dataset(tok),
        processing_class=tok,
        callbacks=[rec, callback],
    )
    tr.train()
    assert callback.updates == 3 and len(rec.path) == 4
    n = 3
    for name, t in ema.model.named_parameters():
        path = [step[name] for step in rec.path]
        want = decay**n * path[0] + (1 - decay) * sum(decay ** (n - k) * path[k] for k in range(1, n + 1))
        torch.testing.assert_close(t.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dict(frozen.model.named_parameters())[name].double(), init[name], rtol=0, atol=0)
    moved = sum((t.double() - init[k]).norm() ** 2 for k, t in ema.model.named_parameters())
    to_student = sum((t.double() - rec.path[-1][k]).norm() ** 2 for k, t in ema.model.named_parameters())
    start_gap = sum((init[k] - rec.path[-1][k]).norm() ** 2 for k in init)
    assert moved > 0 and to_student < start_gap, "the EMA teacher should sit between the start and the student"


def test_the_ema_callback_refuses_a_sharded_student(tiny_student, monkeypatch):
    import potstill.kd.self_distill as sd

    cb = EMATeacherCallback(frozen_copy(tiny_student), tiny_student, 0.9)
    monkeypatch.setattr(sd, "is_sharded", lambda m: True)
    with pytest.raises(PotstillError, match="sharded"):
        cb.on_train_begin(None, None, None)
    with pytest.raises(PotstillError, match="sharded"):
        frozen_copy(tiny_student)


# ------------------------------------------------------------------------------ the recipe, end to end


def _self_recipe(assets, out, **patch) -> dict:
    _, teacher_dir, _, _, _ = assets
    r = recipe(assets, out, **patch)
    r["teacher"] = {"kind": "self", "mode": "ema", "decay": 0.5}
    r["student"] = {"kind": "pretrained", "model": str(teacher_dir), "layers": 1}
    r["runs"] = [{"name": "sft", "alpha": 1.0}, {"name": "self_ema", "alpha": 0.5}]
    return r


@pytest.mark.slow  # a whole distill (two runs, evaluation, report) on tiny models: ~15-40 s on a shared CPU
def test_distill_with_an_ema_self_teacher_end_to_end(assets, tmp_path):
    """A self-teacher recipe trains and writes its students; its first step is alpha * the SFT run's first
    step (same init, same batch, KD to itself 0): with plain KD from a separate fixed teacher it is not."""
    from potstill.runners.distill import distill

    out = tmp_path / "out"
    metrics = distill(recipe_from_dict(_self_recipe(assets, out)), progress=False)
    assert {"sft", "self_ema", "student_init"} <= set(metrics) and "teacher" not in metrics
    info = json.loads((out / "runs" / "self_ema" / "train_info.json").read_text())
    assert info["self_teacher"] == {"mode": "ema", "decay": 0.5, "ema_updates": 3}
    assert (out / "runs" / "self_ema" / "model.safetensors").is_file()
    sft = dict(json.loads((out / "runs" / "sft" / "train_info.json").read_text())["loss_curve"])
    curve = dict(info["loss_curve"])
    assert curve[1] == pytest.approx(0.5 * sft[1], rel=1e-5)
    assert "self (an EMA of the student, decay 0.5)" in (out / "report.md").read_text()


def test_a_self_teacher_recipe_with_demo_data_is_refused_before_loading(assets, tmp_path):
    r = _self_recipe(assets, tmp_path / "o")
    r["data"]["source"] = {"kind": "demo", "num_prompts": 4}
    with pytest.raises(PotstillError, match="demo data is answered by a teacher model"):
        recipe_from_dict(r)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ recipe validation

BASE = {
    "teacher": {"kind": "self", "mode": "ema"},
    "student": {"kind": "pretrained", "model": "smollm2-135m-instruct"},
    "data": {"source": {"kind": "arithmetic", "num_problems": 20}, "eval_size": 4},
    "runs": [{"name": "sft", "alpha": 1.0}, {"name": "self", "alpha": 0.5}],
}


@pytest.mark.parametrize(
    "override, match",
    [
        ("teacher.mode=swa", "recipe key 'teacher.mode'"),
        ("teacher.decay=1.0", "recipe key 'teacher.decay': Input should be less than 1"),
        ("teacher.decay=-0.01", "recipe key 'teacher.decay'"),
        ("teacher.kind=selfish", "recipe key 'teacher' is 'selfish'; use one of 'model', 'self'"),
        ("student={kind: from_teacher, layers: 2}", "student.kind from_teacher builds the student.*use student.kind "),
        ("student={kind: scaled, num_layers: 1}", "student.kind scaled builds the student from a teacher model"),
        ("runs.1.alpha=0.0", r"run\(s\) \['self'\] have alpha 0.*set alpha in \(0, 1\)"),
        ("train.lora={r: 4}", "mode ema averages the student's whole weights but train.lora"),
        ("train.distributed=fsdp2", "train.distributed fsdp2.*use ddp or none"),
        ("train.save_steps=5", "remove train.save_steps or use mode frozen"),
        ("train.eval_steps=5", "train.eval_steps compares"),
        ("cache={}", "remove the cache section"),
        ("extra_teachers=[{model: smollm2-135m-instruct}]", "remove extra_teachers"),
        ("data.source={kind: demo}", "use data.source kind file, hub, arithmetic or gsm8k"),
    ],
)
def test_self_teacher_recipe_refusals(override, match):
    with pytest.raises(PotstillError, match=match) as err:
        recipe_from_dict(copy.deepcopy(BASE), [override])
    assert "\n" not in str(err.value)


def test_self_teacher_union_defaults_and_model_teachers_unchanged():
    r = recipe_from_dict(copy.deepcopy(BASE))
    assert (r.teacher.kind, r.teacher.mode, r.teacher.decay) == ("self", "ema", 0.999)
    frozen = recipe_from_dict(copy.deepcopy(BASE), ["teacher={kind: self, mode: frozen}", "train.save_steps=5"])
    assert frozen.teacher.mode == "frozen" and frozen.teacher.decay is None
    with pytest.raises(PotstillError, match="mode frozen never updates"):
        recipe_from_dict(copy.deepcopy(BASE), ["teacher={kind: self, mode: frozen, decay: 0.9}"])
    # a teacher without kind is the model teacher; its dump (resolved recipe, run fingerprints) names no kind
    plain = recipe_from_dict({"teacher": {"model": "smollm2-135m-instruct"}})
    named = recipe_from_dict({"teacher": {"kind": "model", "model": "smollm2-135m-instruct"}})
    assert plain == named and plain.teacher.kind == "model" and "kind" not in plain.model_dump()["teacher"]
    assert recipe_from_dict(copy.deepcopy(BASE)).model_dump()["teacher"] == {
        "kind": "self",
        "mode": "ema",
        "decay": 0.999,
    }
