"""KDTrainer: the loss it optimizes, global normalization, SFT baseline, LoRA, frozen teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import encode_kd_pairs, kd_cfg, kd_dataset, kd_ref_loss

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd import KDTrainer


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_matches_full_logit_reference(tiny_llama_pair, tmp_path, alpha):
    teacher, student, tok = tiny_llama_pair
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, alpha=alpha, chunk_size=7),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    student.train()
    got = trainer.compute_loss(student, batch)
    want = kd_ref_loss(student, teacher, batch, alpha)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sft_baseline_equals_hf_causal_lm_loss_and_runs_no_teacher(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, alpha=1.0),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    got = trainer.compute_loss(student, batch)
    hf = student(**batch).loss
    torch.testing.assert_close(got, hf, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert calls == [], "the SFT baseline must not run the teacher"


def _grads_after_one_sgd_step(student, teacher, tok, tmp_path, **kw):
    before = copy.deepcopy(student.state_dict())
    tr = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, **kw),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )
    tr.train()
    after = tr.model.state_dict()
    lr = kw.get("learning_rate", 0.1)
    return {k: (before[k] - after[k]) / lr for k in before}


def test_gradient_accumulation_equals_one_big_batch(tiny_llama_pair, tmp_path):
    """GA over micro-batches of unequal token counts gives the big batch's gradient (TRL #4719)."""
    teacher, student, tok = tiny_llama_pair
    ex = encode_kd_pairs(tok)
    counts = [sum(x != -100 for x in e["labels"][1:]) for e in ex]
    assert counts[0] + counts[1] != counts[2] + counts[3], "micro-batches must differ in token count"
    g_big = _grads_after_one_sgd_step(
        copy.deepcopy(student),
        teacher,
        tok,
        tmp_path / "a",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        alpha=0.2,
    )
    g_acc = _grads_after_one_sgd_step(
        copy.deepcopy(student),
        teacher,
        tok,
        tmp_path / "b",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        alpha=0.2,
    )
    for k in g_big:
        torch.testing.assert_close(g_acc[k], g_big[k], rtol=1e-4, atol=1e-6)
    # The test can fail: a per-micro-batch mean gives a different gradient here.
    batch = PadCollator(tok.pad_token_id)(ex)
    s = copy.deepcopy(student).train()
    w = s.model.embed_tokens.weight
    big = kd_ref_loss(s, teacher, batch, 0.2)
    (gb,) = torch.autograd.grad(big, w)
    per_micro = (
        sum(kd_ref_loss(s, teacher, PadCollator(tok.pad_token_id)(ex[i : i + 2]), 0.2) for i in range(0, 8, 2)) / 4
    )
    (gm,) = torch.autograd.grad(per_micro, w)
    assert not torch.allclose(gb, gm, rtol=1e-3, atol=1e-6)


def test_teacher_is_frozen_and_unchanged(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    teacher.train()
    t0 = copy.deepcopy(teacher.state_dict())
    s0 = copy.deepcopy(student.state_dict())
    tr = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, max_steps=2),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )
    tr.train()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())
    assert any(not torch.equal(v, tr.model.state_dict()[k]) for k, v in s0.items()), "the student must change"


def test_lora_student_trains_only_the_adapter(tiny_llama_pair, tmp_path):
    from peft import LoraConfig

    teacher, student, tok = tiny_llama_pair
    base = copy.deepcopy(student.state_dict())
    tr = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, max_steps=2, learning_rate=0.5),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
        ),
    )
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora0 = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    tr.train()
    assert any(not torch.equal(lora0[n], p) for n, p in tr.model.named_parameters() if p.requires_grad)
    merged = tr.model.merge_and_unload()
    unchanged = [k for k in base if "q_proj" not in k and "v_proj" not in k]
    assert all(torch.equal(base[k], merged.state_dict()[k]) for k in unchanged)


def test_teacher_with_padding_rows_aligns(tiny_llama_pair, tmp_path):
    """Vocabularies that differ only by padding rows are aligned on the real tokens."""
    teacher, student, tok = tiny_llama_pair
    padded = copy.deepcopy(teacher)
    padded.resize_token_embeddings(len(tok) + 13)
    with torch.no_grad():
        padded.lm_head.weight[len(tok) :] = 5.0  # padding rows that would dominate if not dropped
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    with pytest.warns(UserWarning, match="padding"):
        tr = KDTrainer(
            model=student,
            teacher_model=padded,
            args=kd_cfg(tmp_path),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )
    assert tr.vocab_size == len(tok)
    got = tr.compute_loss(student, batch)
    want = kd_ref_loss(student, teacher, batch, 0.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_teacher_required_unless_sft(tiny_llama_pair, tmp_path):
    _, student, tok = tiny_llama_pair
    with pytest.raises(PotstillError, match="needs a teacher"):
        KDTrainer(model=student, args=kd_cfg(tmp_path, alpha=0.5), train_dataset=kd_dataset(tok), processing_class=tok)


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(divergence="kl_typo"), dict(temperature=0.0)])
def test_config_rejects_bad_values(tmp_path, bad):
    with pytest.raises(PotstillError):
        kd_cfg(tmp_path, **bad)


def test_teacher_memo_pays_the_teacher_once_and_changes_nothing(tiny_llama_pair, tmp_path):
    """Two runs on the same batches: the second reads the memo (no teacher forward) and trains identically."""
    from potstill.signals import OnlineTeacher, TeacherMemo

    teacher, student, tok = tiny_llama_pair
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    memo = TeacherMemo()

    def run(sub, source):
        tr = KDTrainer(
            model=copy.deepcopy(student),
            teacher_model=teacher,
            args=kd_cfg(tmp_path / sub, max_steps=3, per_device_train_batch_size=2),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
            signal_source=source,
        )
        tr.train()
        return tr.model.state_dict()

    plain = run("plain", None)
    n_plain = len(calls)
    first = run("first", OnlineTeacher(teacher, memo=memo))
    assert len(calls) == 2 * n_plain and memo.hits == 0
    second = run("second", OnlineTeacher(teacher, memo=memo))
    assert len(calls) == 2 * n_plain, "the second run must not run the teacher"
    assert memo.hits == 3
    for k in plain:
        assert torch.equal(plain[k], first[k]) and torch.equal(first[k], second[k])


@pytest.mark.parametrize(
    "divergence, kwargs, fix",
    [
        ("generalized_jsd", {"beta": 0.0}, "forward_kl"),
        ("generalized_jsd", {"beta": 1.0}, "reverse_kl"),
        ("skew_forward_kl", {"alpha": 1.0}, "alpha"),
        ("adaptive_kl", {"mu": 0.0}, "reverse_kl"),
    ],
)
def test_kd_config_refuses_parameters_that_train_on_a_zero_or_other_loss(tmp_path, divergence, kwargs, fix):
    """The Python API refuses what a recipe refuses: GKD's JSD at beta 0 is identically 0 (TRL means forward KL)."""
    from potstill.errors import PotstillError

    with pytest.raises(PotstillError) as info:
        kd_cfg(tmp_path, divergence=divergence, divergence_kwargs=kwargs)
    assert "\n" not in str(info.value) and fix in str(info.value)
    with pytest.raises(PotstillError, match="temperature"):
        kd_cfg(tmp_path, temperature=1e-45)
    kd_cfg(tmp_path, divergence=divergence)  # the defaults are fine


# ----------------------------------------------------------------------------- loss_backend="liger"


def _one_line(info, *needles):
    msg = str(info.value)
    assert "\n" not in msg, msg
    for s in needles:
        assert s in msg, msg


@pytest.mark.parametrize(
    "kw, needles",
    [
        (dict(divergence="skew_forward_kl"), ("skew_forward_kl", "loss_backend 'potstill'")),
        (dict(divergence="total_variation"), ("total_variation", "loss_backend 'potstill'")),
        (dict(token_weighting="student_entropy"), ("token_weighting", "loss_backend 'potstill'")),
        (dict(divergence="generalized_jsd", divergence_kwargs={"beta": 0.0}), ("forward_kl",)),
    ],
)
def test_kd_config_liger_backend_refuses_what_liger_cannot_compute(tmp_path, kw, needles):
    with pytest.raises(PotstillError) as info:
        kd_cfg(tmp_path, loss_backend="liger", **kw)
    _one_line(info, *needles)
    with pytest.raises(PotstillError) as info:
        kd_cfg(tmp_path, loss_backend="fused")
    _one_line(info, "potstill or liger")
    assert kd_cfg(tmp_path).loss_backend == "potstill"
    kd_cfg(tmp_path, loss_backend="liger", divergence="generalized_jsd", divergence_kwargs={"beta": 0.3})


def test_liger_backend_is_refused_before_training_with_the_fix(tiny_llama_pair, tmp_path, monkeypatch):
    """Not installed, not on CUDA, a cached signal, or a subclass with its own loss: one line at construction."""
    import potstill.divergences.liger as liger_mod

    teacher, student, tok = tiny_llama_pair
    args = kd_cfg(tmp_path, loss_backend="liger")

    def make(cls=KDTrainer, **kw):
        kw.setdefault("teacher_model", teacher)
        return cls(model=student, args=args, train_dataset=kd_dataset(tok), processing_class=tok, **kw)

    monkeypatch.setattr(liger_mod, "liger_available", lambda: False)
    with pytest.raises(PotstillError) as info:
        make()
    _one_line(info, "pip install 'potstill[liger]'", "loss_backend 'potstill'")
    monkeypatch.setattr(liger_mod, "liger_available", lambda: True)
    with pytest.raises(PotstillError) as info:
        make()  # use_cpu=True
    _one_line(info, "CUDA", "loss_backend 'potstill'")

    class Cached:
        def signal(self, batch):
            raise AssertionError("never asked")

    with pytest.raises(PotstillError) as info:
        make(teacher_model=None, signal_source=Cached())
    _one_line(info, "cached", "Cached", "loss_backend 'potstill'")

    class OwnLoss(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(PotstillError) as info:
        make(OwnLoss)
    _one_line(info, "OwnLoss", "loss_backend 'potstill'")


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_liger_backend_receives_potstills_arguments(tiny_llama_pair, tmp_path, monkeypatch, alpha):
    """compute_loss hands the Liger backend the reducer's arguments (global normalizer, aligned vocab, T, alpha);
    alpha = 1 has no teacher to fuse and stays with the reducer. The backend itself is tested in
    tests/divergences/test_liger.py; here a stand-in with its signature computes the reducer's loss."""
    import potstill.kd.logit as logit_mod
    from potstill.divergences import chunked_kd_loss

    teacher, student, tok = tiny_llama_pair
    calls = []

    def stand_in(rows, head, targets, signal, **kw):
        calls.append(kw)
        return chunked_kd_loss(rows, head, targets, signal, **kw)

    monkeypatch.setattr(logit_mod, "require_liger", lambda device=None: None)
    monkeypatch.setattr(logit_mod, "liger_kd_loss", stand_in)
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=kd_dataset(tok),
        processing_class=tok,
        args=kd_cfg(tmp_path, alpha=alpha, temperature=2.0, chunk_size=7, loss_backend="liger"),
    )
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    student.train()
    got = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(57))
    if alpha == 1.0:
        assert calls == []
        return
    (kw,) = calls
    assert kw["alpha"] == alpha and kw["temperature"] == 2.0 and kw["divergence"] == "forward_kl"
    assert int(kw["normalizer"]) == 57 and kw["chunk_size"] == 7 and kw["vocab_size"] is None
    n = int((batch["labels"][:, 1:] != -100).sum())
    want = kd_ref_loss(student, teacher, batch, alpha, T=2.0) * n / 57
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
