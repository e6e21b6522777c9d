"""Uncertainty-aware token weights and alpha / temperature schedules (potstill.kd.adaptive)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import encode_kd_pairs, kd_cfg, kd_dataset, kd_ref_loss

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd import KDTrainer
from potstill.kd.adaptive import scheduled, token_weights
from potstill.signals import DenseSignal, Head, SparseSignal


def test_schedules_at_their_end_points_and_middle():
    assert scheduled(1.0, 0.0, 0.0) == 1.0 and scheduled(1.0, 0.0, 1.0) == 0.0
    assert scheduled(1.0, 0.0, 0.25) == pytest.approx(0.75)
    assert scheduled(4.0, 1.0, 0.5, "cosine") == pytest.approx(2.5)
    assert scheduled(4.0, 1.0, 0.25, "cosine") == pytest.approx(4.0 - 3.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert scheduled(2.0, None, 0.7) == 2.0
    assert scheduled(1.0, 3.0, 7.0) == 3.0  # progress is clamped
    with pytest.raises(PotstillError, match="unknown schedule"):
        scheduled(1.0, 2.0, 0.5, "exp")


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_teacher_confidence_and_maxprob_from_their_definitions():
    probs = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01]]
    logits = torch.tensor(probs).log() + 3.0  # a shift changes nothing
    sig = DenseSignal(logits=logits)
    w = token_weights("teacher_confidence", signal=sig, vocab=4, temperature=1.0)
    want = [1 - _entropy(p) / math.log(4) for p in probs]
    torch.testing.assert_close(w, torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert abs(float(w[1])) < 1e-6  # a uniform teacher carries no weight
    m = token_weights("teacher_maxprob", signal=sig, vocab=4, temperature=1.0)
    torch.testing.assert_close(m, torch.tensor([0.4, 0.25, 0.97]), rtol=1e-5, atol=1e-6)
    # the same teacher given lazily as hidden states + head, in chunks of 1 row
    head = Head(weight=torch.eye(4))
    lazy = DenseSignal(hidden=logits, head=head)
    torch.testing.assert_close(
        token_weights("teacher_confidence", signal=lazy, vocab=4, temperature=1.0, chunk_size=1), w
    )
    # at temperature 2 the distribution is softmax(log p / 2)
    w2 = token_weights("teacher_confidence", signal=sig, vocab=4, temperature=2.0)
    p2 = F.softmax(torch.tensor(probs).log() / 2, -1).tolist()
    torch.testing.assert_close(w2, torch.tensor([1 - _entropy(p) / math.log(4) for p in p2]), rtol=1e-5, atol=1e-6)


def test_sparse_teacher_counts_the_tail_as_one_outcome():
    lp = torch.tensor([[0.5, 0.3]]).log()
    sig = SparseSignal(ids=torch.tensor([[0, 1]]), logprobs=lp)
    w = token_weights("teacher_confidence", signal=sig, vocab=8, temperature=1.0)
    assert float(w[0]) == pytest.approx(1 - _entropy([0.5, 0.3, 0.2]) / math.log(8), rel=1e-5)


def test_student_entropy_keeps_the_most_uncertain_share_with_rescaled_weight():
    # rows 0..4: entropies increase with the row's temperature; row 3 is masked
    base = torch.tensor([3.0, 1.0, 0.0, -1.0])
    rows = torch.stack([base / t for t in (0.2, 0.5, 1.0, 5.0, 2.0)])
    labels = torch.tensor([0, 1, 2, -100, 3])
    w = token_weights(
        "student_entropy", rows=rows, head=Head(weight=torch.eye(4)), labels=labels, vocab=4, temperature=1.0, ratio=0.5
    )
    # 4 valid rows, keep round(0.5 * 4) = 2: the highest-entropy valid rows are 4 (T=2) and 2 (T=1)
    assert w.tolist() == [0.0, 0.0, 2.0, 0.0, 2.0]
    ones = token_weights(
        "student_entropy", rows=rows, head=Head(weight=torch.eye(4)), labels=labels, vocab=4, temperature=1.0, ratio=1.0
    )
    assert ones.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_bad_weighting_inputs_raise():
    with pytest.raises(PotstillError, match="needs a teacher signal"):
        token_weights("teacher_confidence", vocab=4, temperature=1.0)
    with pytest.raises(PotstillError, match="unknown token_weighting"):
        token_weights("loudest", vocab=4, temperature=1.0)


def test_trainer_rejects_bad_adaptive_options(tmp_path):
    with pytest.raises(PotstillError, match="token_weighting"):
        kd_cfg(tmp_path, token_weighting="loud")
    with pytest.raises(PotstillError, match="alpha_end"):
        kd_cfg(tmp_path, alpha_end=1.5)
    with pytest.raises(PotstillError, match="schedule"):
        kd_cfg(tmp_path, schedule="step")


def test_selective_kd_with_ratio_one_is_plain_kd(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    import copy

    a, b = copy.deepcopy(student), copy.deepcopy(student)
    KDTrainer(
        model=a,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, max_steps=2),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    ).train()
    KDTrainer(
        model=b,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, max_steps=2, token_weighting="student_entropy", token_weighting_ratio=1.0),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    ).train()
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, msg=n)


def test_teacher_confidence_loss_equals_weighted_reference(tiny_llama_pair, tmp_path):
    """The trainer's loss with teacher-confidence weights against full logits written out here."""
    teacher, student, tok = tiny_llama_pair
    tr = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, alpha=0.2, token_weighting="teacher_confidence"),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    loss = tr.compute_loss(student, batch)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    y = batch["labels"][:, 1:]
    valid = y != -100
    s, t, y = s[valid], t[valid], y[valid]
    pt = F.softmax(t, -1)
    w = 1 + (pt * pt.log()).sum(-1) / math.log(t.shape[-1])
    kl = (pt * (pt.log() - F.log_softmax(s, -1))).sum(-1)
    ref = (0.2 * F.cross_entropy(s, y, reduction="sum") + 0.8 * (w * kl).sum()) / valid.sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_alpha_and_temperature_follow_their_schedules(tiny_llama_pair, tmp_path, monkeypatch):
    teacher, student, tok = tiny_llama_pair
    import potstill.kd.logit as logit_mod

    seen = []
    real = logit_mod.chunked_kd_loss

    def spy(*a, **k):
        seen.append((k["alpha"], k["temperature"]))
        return real(*a, **k)

    monkeypatch.setattr(logit_mod, "chunked_kd_loss", spy)
    KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(
            tmp_path,
            max_steps=4,
            alpha=1.0,
            alpha_end=0.0,
            temperature=3.0,
            temperature_end=1.0,
            per_device_train_batch_size=8,
        ),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    ).train()
    assert [a for a, _ in seen] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [t for _, t in seen] == pytest.approx([3.0, 2.5, 2.0, 1.5])


def test_alpha_schedule_at_its_end_point_equals_the_fixed_loss(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=kd_cfg(tmp_path, alpha=0.0, alpha_end=0.6),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )
    tr.state.max_steps, tr.state.global_step = 10, 10
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    torch.testing.assert_close(
        tr.compute_loss(student, batch).double(), kd_ref_loss(student, teacher, batch, 0.6), rtol=1e-5, atol=1e-6
    )


def _reference_example_kl(student, teacher, ex):
    ids = torch.tensor([ex["input_ids"]])
    y = torch.tensor(ex["labels"])[1:]
    with torch.no_grad():
        s = student(input_ids=ids).logits[0, :-1].double()
        t = teacher(input_ids=ids).logits[0, :-1].double()
    v = y != -100
    pt = F.softmax(t[v], -1)
    return float((pt * (pt.log() - F.log_softmax(s[v], -1))).sum(-1).mean())


@pytest.mark.parametrize("kind", ["easy_to_hard", "hard_to_easy"])
def test_curriculum_orders_examples_by_initial_divergence(tiny_llama_pair, tmp_path, kind, monkeypatch):
    teacher, student, tok = tiny_llama_pair
    ex = encode_kd_pairs(tok)
    want = [_reference_example_kl(student, teacher, e) for e in ex]
    seen = []
    real = KDTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        seen.append(inputs["input_ids"][:, :].clone())
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(KDTrainer, "compute_loss", spy)
    tr = KDTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=kd_cfg(tmp_path, max_steps=2, curriculum=kind, per_device_train_batch_size=4),
    )
    tr.train()
    torch.testing.assert_close(tr.curriculum_scores, torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    order = sorted(range(len(ex)), key=lambda i: want[i], reverse=kind == "hard_to_easy")
    assert tr.curriculum_order == order
    first = [ex[i]["input_ids"] for i in order[:4]]
    got = [row[: len(f)].tolist() for row, f in zip(seen[0], first)]
    assert got == first


def test_curriculum_needs_a_teacher(tiny_llama_pair, tmp_path):
    _, student, tok = tiny_llama_pair
    tr = KDTrainer(
        model=student,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=kd_cfg(tmp_path, alpha=1.0, curriculum="easy_to_hard"),
    )
    with pytest.raises(PotstillError, match="curriculum"):
        tr.train()
