"""FeatureKDTrainer: hidden-state distillation between paired layers with learned projections."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import encode_kd_pairs, kd_dataset, kd_ref_loss, one_step_cpu_args

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd.feature import FeatureKDConfig, FeatureKDTrainer, feature_distance
from potstill.signals import OnlineTeacher, SparseSignal


def fcfg(tmp_path, **kw):
    return FeatureKDConfig(**(one_step_cpu_args(tmp_path, feature_layers=[[1, 2], [0, 0]]) | kw))


def test_feature_distances_closed_forms():
    s = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 3.0]])
    torch.testing.assert_close(feature_distance(s, t, "mse"), torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(
        feature_distance(s, t, "cosine"), torch.tensor([1.0, 0.0, 1 - 4 / (2**0.5 * 10**0.5)]), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_loss_is_logit_loss_plus_projected_hidden_distance(tiny_llama_pair, tmp_path, kind):
    """Student (hidden 32) -> teacher (hidden 64): reference written from hidden_states directly."""
    teacher, student, tok = tiny_llama_pair
    tr = FeatureKDTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=fcfg(tmp_path, alpha=0.3, feature_loss=kind, feature_weight=0.7),
    )
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    loss = tr.compute_loss(student, batch)
    hs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        ht = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    valid = batch["labels"][:, 1:] != -100
    feat = 0.0
    for proj, (ls, lt) in zip(tr.projections, [(1, 2), (0, 0)]):
        s = hs.hidden_states[ls][:, :-1][valid].double() @ proj.weight.double().T
        t = ht.hidden_states[lt][:, :-1][valid].double()
        d = (s - t).pow(2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1)
        feat = feat + d.sum()
    want = kd_ref_loss(student, teacher, batch, 0.3) + 0.7 * feat / valid.sum()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_projections_train_and_stay_out_of_the_student(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = FeatureKDTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=fcfg(tmp_path, max_steps=2, feature_layers=[[-1, -1]]),
    )
    w0 = tr.projections[0].weight.detach().clone()
    tr.train()
    assert not torch.equal(w0, tr.projections[0].weight)
    assert not any("projection" in k for k in tr.model.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_gradient_accumulation_equals_one_big_batch(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair

    def grads(path, **kw):
        s = copy.deepcopy(student)
        before = copy.deepcopy(s.state_dict())
        tr = FeatureKDTrainer(
            model=s,
            teacher_model=teacher,
            processing_class=tok,
            train_dataset=kd_dataset(tok),
            args=fcfg(path, alpha=0.2, feature_weight=2.0, **kw),
        )
        torch.manual_seed(0)
        for p in tr.projections:
            torch.nn.init.normal_(p.weight, std=0.1)
        tr.train()
        return {k: (before[k] - v) / 0.1 for k, v in tr.model.state_dict().items()}

    big = grads(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1)
    acc = grads(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-6)


def test_one_teacher_forward_serves_logits_and_hidden_states(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    calls = []
    h = teacher.register_forward_hook(lambda *a: calls.append(1))
    tr = FeatureKDTrainer(
        model=student,
        signal_source=OnlineTeacher(teacher),
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=fcfg(tmp_path),
    )
    tr.compute_loss(student, PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4]))
    h.remove()
    assert len(calls) == 1


def test_bad_feature_options_are_refused(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    with pytest.raises(PotstillError, match="feature_layers"):
        fcfg(tmp_path, feature_layers=None)
    with pytest.raises(PotstillError, match="pair"):
        fcfg(tmp_path, feature_layers=[[1, 2, 3]])
    with pytest.raises(PotstillError, match="feature_loss"):
        fcfg(tmp_path, feature_loss="l1")
    with pytest.raises(PotstillError, match="out of range"):
        FeatureKDTrainer(
            model=student,
            teacher_model=teacher,
            processing_class=tok,
            train_dataset=kd_dataset(tok),
            args=fcfg(tmp_path, feature_layers=[[5, 0]]),
        )

    class Cache:
        temperature = None

        def signal(self, batch):
            return SparseSignal(ids=torch.zeros(1, 1, dtype=torch.long), logprobs=torch.zeros(1, 1))

    with pytest.raises(PotstillError, match="live teacher"):
        FeatureKDTrainer(
            model=student,
            signal_source=Cache(),
            processing_class=tok,
            train_dataset=kd_dataset(tok),
            args=fcfg(tmp_path),
        )
