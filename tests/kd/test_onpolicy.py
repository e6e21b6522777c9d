"""OnPolicyKDTrainer: GKD's lambda, student rollouts, DistiLLM's replay buffer and schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import FakeCache, encode_kd_pairs, kd_dataset, one_step_cpu_args

import potstill.generate as gen_mod
from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd import KDConfig, KDTrainer, OnPolicyConfig, OnPolicyKDTrainer
from potstill.kd.onpolicy import ROLLOUT
from potstill.signals import OnlineTeacher


def ocfg(tmp_path, **kw):
    return OnPolicyConfig(**(one_step_cpu_args(tmp_path, gen_max_new_tokens=6) | kw))


def make(teacher, student, tok, tmp_path, **kw):
    val = kw.pop("validation_dataset", None)
    return OnPolicyKDTrainer(
        model=student,
        teacher_model=teacher,
        args=ocfg(tmp_path, **kw),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
        validation_dataset=val,
    )


def batch_of(tok, n=4):
    return PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:n])


def test_lambda_zero_is_exactly_off_policy_kd(tiny_llama_pair, tmp_path, monkeypatch):
    teacher, student, tok = tiny_llama_pair
    s_off, s_on = copy.deepcopy(student), copy.deepcopy(student)
    kd_args = one_step_cpu_args(tmp_path, output_dir=str(tmp_path / "off"), max_steps=3)
    off = KDTrainer(
        model=s_off,
        teacher_model=teacher,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=KDConfig(**kd_args),
    )
    off.train()

    def no_generation(*a, **k):
        raise AssertionError("lambda=0 must never generate")

    monkeypatch.setattr(gen_mod, "generate", no_generation)
    on = make(teacher, s_on, tok, tmp_path, max_steps=3, lmbda=0.0)
    on.train()
    assert on.rollout_stats["modes"] == ["data"] * 3
    for (n, a), (_, b) in zip(s_off.named_parameters(), s_on.named_parameters()):
        assert torch.equal(a, b), n


def test_student_batch_keeps_prompts_and_labels_the_samples(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, lmbda=1.0, per_device_train_batch_size=4)
    batch = batch_of(tok)
    state = torch.random.get_rng_state()
    new, n_items = tr.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state), "generation must not move the training RNG"
    (b,) = new
    assert b[ROLLOUT] is True and tr.rollout_stats["modes"] == ["student"]
    for i in range(4):
        p = int((batch["labels"][i] != -100).nonzero()[0])
        q = int((b["labels"][i] != -100).nonzero()[0])
        assert p == q and torch.equal(b["input_ids"][i, :p], batch["input_ids"][i, :p])
        k = int(b["attention_mask"][i].sum())
        resp = b["input_ids"][i, p:k]
        assert torch.equal(b["labels"][i, p:k], resp) and (b["labels"][i, k:] == -100).all()
        assert 1 <= resp.numel() <= 6 + 1
    assert int(n_items) == int((b["labels"][:, 1:] != -100).sum())
    assert tr.rollout_stats["gen_tokens"] > 0


def test_rollout_loss_is_pure_divergence_to_the_teacher_on_the_samples(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, lmbda=1.0, alpha=0.5)
    (b,), _ = tr.get_batch_samples(iter([batch_of(tok)]), 1, torch.device("cpu"))
    got = tr.compute_loss(student, b)
    ids, mask, y = b["input_ids"], b["attention_mask"], b["labels"][:, 1:]
    valid = y != -100
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()[valid]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].double()[valid]
    want = (
        torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum") / valid.sum()
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # alpha=0.5 ignored: no CE on own samples


def test_rollouts_are_seeded(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    outs = []
    for _ in range(2):
        tr = make(teacher, copy.deepcopy(student), tok, tmp_path, lmbda=1.0)
        (b,), _ = tr.get_batch_samples(iter([batch_of(tok)]), 1, torch.device("cpu"))
        outs.append(b["input_ids"])
    assert torch.equal(*outs)


def test_gradient_accumulation_counts_tokens_of_all_rollout_micro_batches(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, lmbda=1.0, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    enc = encode_kd_pairs(tok)
    coll = PadCollator(tok.pad_token_id)
    new, n_items = tr.get_batch_samples(iter([coll(enc[:2]), coll(enc[2:4])]), 2, torch.device("cpu"))
    assert len(new) == 2 and tr.rollout_stats["modes"] == ["student"]
    assert int(n_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in new)


def test_mode_frequency_matches_lambda(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, lmbda=0.3)
    n = 4000
    share = sum(tr.choose_mode() != "data" for _ in range(n)) / n
    assert abs(share - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)


def test_replay_buffer_reuses_stored_samples_fifo(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, lmbda=1.0, replay_size=6, replay_reuse=1.0)
    (first,), _ = tr.get_batch_samples(iter([batch_of(tok)]), 1, torch.device("cpu"))
    assert tr.rollout_stats["modes"] == ["student"] and len(tr._buffer) == 4
    stored = {tuple(f["input_ids"]) for f in tr._buffer}
    rows = {tuple(first["input_ids"][i, : int(first["attention_mask"][i].sum())].tolist()) for i in range(4)}
    assert stored == rows
    calls = []
    orig = gen_mod.generate
    gen_mod.generate = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        for _ in range(5):
            (b,), _ = tr.get_batch_samples(iter([batch_of(tok)]), 1, torch.device("cpu"))
            got = {tuple(b["input_ids"][i, : int(b["attention_mask"][i].sum())].tolist()) for i in range(4)}
            assert got <= stored
    finally:
        gen_mod.generate = orig
    assert calls == [] and tr.rollout_stats["modes"][1:] == ["replay"] * 5


def test_replay_capacity_drops_the_oldest(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, lmbda=1.0, replay_size=6)
    tr._buffer.extend({"input_ids": [i], "attention_mask": [1], "labels": [i]} for i in range(4))
    tr.get_batch_samples(iter([batch_of(tok)]), 1, torch.device("cpu"))
    kept = [f["input_ids"] for f in tr._buffer]
    assert len(kept) == 6 and kept[:2] == [[2], [3]]


def test_distillm_schedule_rises_only_when_validation_loss_rises(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    val = encode_kd_pairs(tok)[4:]
    tr = make(
        teacher,
        student,
        tok,
        tmp_path,
        lmbda=0.0,
        adaptive=True,
        adaptive_every=2,
        adaptive_step=0.25,
        adaptive_max=0.6,
        validation_dataset=val,
    )
    losses = iter([1.0, 0.9, 1.1, 1.2, 0.5, 0.7])
    tr.validation_loss = lambda: next(losses)
    seen = []
    for step in range(1, 13):
        tr.state.global_step = step
        tr._maybe_adapt()
        seen.append(tr.lmbda)
    # measured at steps 2,4,...,12: 1.0, 0.9 (down), 1.1 (up), 1.2 (up, capped), 0.5 (down), 0.7 (up, capped)
    assert seen[1] == 0.0 and seen[3] == 0.0 and seen[5] == 0.25 and seen[7] == 0.5 and seen[9] == 0.5
    assert seen[11] == 0.6
    assert [h[0] for h in tr.lmbda_history] == [0, 2, 4, 6, 8, 10, 12]


def test_validation_loss_is_the_teacher_forced_kd_loss(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    val = encode_kd_pairs(tok)[:4]
    tr = make(teacher, student, tok, tmp_path, lmbda=0.0, adaptive=True, validation_dataset=val)
    tr._stats["ce_sum"] = 3.0
    stats = dict(tr._stats)
    got = tr.validation_loss()
    assert tr._stats == stats, "validation must not pollute the logged training statistics"
    b = PadCollator(tok.pad_token_id)(val)
    student.eval()
    with torch.no_grad():
        want = float(tr.compute_loss(student, b))
    assert got == pytest.approx(want, rel=1e-5)


def test_end_to_end_gkd_and_distillm_train(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    before = copy.deepcopy(student.state_dict())
    tr = make(
        teacher,
        student,
        tok,
        tmp_path,
        max_steps=4,
        lmbda=0.5,
        divergence="skew_forward_kl",
        divergence_kwargs={"alpha": 0.1},
        replay_size=8,
        replay_reuse=0.5,
        adaptive=True,
        adaptive_every=2,
        validation_dataset=encode_kd_pairs(tok)[4:],
    )
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert len(tr.rollout_stats["modes"]) == 4 and len(tr.lmbda_history) == 2
    assert "student_step_share" in [k for h in tr.state.log_history for k in h]


def test_bad_configurations_fail_with_the_fix(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    with pytest.raises(PotstillError, match="alpha < 1"):
        ocfg(tmp_path, lmbda=0.5, alpha=1.0)
    with pytest.raises(PotstillError, match="replay_size"):
        ocfg(tmp_path, replay_reuse=0.5)
    with pytest.raises(PotstillError, match="lmbda=1.5"):
        ocfg(tmp_path, lmbda=1.5)
    with pytest.raises(PotstillError, match="gen_temperature"):
        ocfg(tmp_path, gen_temperature=0.0)
    with pytest.raises(PotstillError, match="validation_dataset"):
        make(teacher, student, tok, tmp_path, adaptive=True)

    with pytest.raises(PotstillError, match="live teacher"):
        OnPolicyKDTrainer(
            model=student,
            signal_source=FakeCache(),
            args=ocfg(tmp_path, lmbda=0.5),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )
    with pytest.raises(PotstillError, match="OnPolicyConfig"):
        OnPolicyKDTrainer(
            model=student,
            teacher_model=teacher,
            args=KDConfig(output_dir=str(tmp_path)),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )
    # the scorer is a live teacher without the memo (samples never repeat)
    tr = make(teacher, student, tok, tmp_path, lmbda=0.5)
    assert isinstance(tr._scorer, OnlineTeacher) and tr._scorer.memo is None
