"""ContrastiveKDTrainer (DistiLLM-2): paired data/student sides, per-side global normalization, beta ramp,
per-sequence adaptive skew; checked against an independent float64 reference on full logits."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import FakeCache, contrastive_cfg, encode_kd_pairs, fake_samples, kd_dataset, recipe, write

from potstill.cli import main
from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd import ContrastiveKDTrainer, KDConfig
from potstill.kd.contrastive import _N_DATA, _N_STUDENT, _STUDENT, sequence_skew
from potstill.kd.onpolicy import ROLLOUT


def make(teacher, student, tok, tmp_path, **kw):
    return ContrastiveKDTrainer(
        model=student,
        teacher_model=teacher,
        args=contrastive_cfg(tmp_path, **kw),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )


def paired(tr, tok, batches, longer=False):
    """What get_batch_samples makes of ``batches``, with fake_samples in place of generation."""
    coll = PadCollator(tok.pad_token_id)
    student = [coll(fake_samples(b, tok, longer)) for b in batches]
    n_d = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_s = sum(int((s["labels"][:, 1:] != -100).sum()) for s in student)
    return [{**b, _STUDENT: {**s, ROLLOUT: True}, _N_DATA: n_d, _N_STUDENT: n_s} for b, s in zip(batches, student)]


# ------------------------------------------------------------------ independent reference (float64, full logits)
def _logits(model, b, T=1.0):
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double() / T


def _skew_kl(la, lb, a):
    """KL(A || a A + (1 - a) B) per row from log-probs, written from the definition."""
    pa, pb = la.exp(), lb.exp()
    mix = a * pa + (1 - a) * pb
    return (pa * (la - mix.log())).sum(-1)


def ref_side(student, teacher, b, kind, alpha, T=1.0):
    """Per-row skew divergence of one side and each row's sequence id; ``alpha`` a float or a [B] tensor."""
    y = b["labels"][:, 1:]
    valid = y != -100
    s = _logits(student, b, T).log_softmax(-1)
    with torch.no_grad():
        t = _logits(teacher, b, T).log_softmax(-1)
    a = alpha if isinstance(alpha, float) else alpha.double()[:, None].expand_as(y)[valid][:, None]
    seq = torch.arange(y.shape[0])[:, None].expand_as(y)[valid]
    if kind == "skew_forward_kl":
        return _skew_kl(t[valid], s[valid], a), seq
    return _skew_kl(s[valid], t[valid], a), seq


def ref_alphas(student, teacher, b, side, cap, anchor=None):
    """DistiLLM-2's per-sequence skew, from full logits: mean target log-prob per sequence, gap, clip."""
    y = b["labels"][:, 1:]
    valid = y != -100
    with torch.no_grad():
        ls = _logits(student, b).log_softmax(-1)
        lt = _logits(teacher, b).log_softmax(-1)
    g = y.clamp(min=0)[..., None]
    q_bar = ((ls.gather(-1, g).squeeze(-1) * valid).sum(1) / valid.sum(1)).exp()
    p_bar = ((lt.gather(-1, g).squeeze(-1) * valid).sum(1) / valid.sum(1)).exp()
    gap = p_bar - q_bar if side == "data" else q_bar - p_bar
    if anchor is None:
        anchor = (1 - cap) * float(gap.mean())
    out = []
    for x in gap.tolist():
        out.append(cap if x <= 0 else min(max(1 - anchor / x, 0.01), cap))
    return torch.tensor(out, dtype=torch.float64), anchor


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("longer", [False, True])
def test_paired_loss_matches_float64_reference_values_and_gradients(tiny_llama_pair, tmp_path, longer):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, beta=1.3)
    (inp,) = paired(tr, tok, [PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])], longer)
    wider = inp[_STUDENT]["input_ids"].shape[1] > inp["input_ids"].shape[1]
    assert wider == longer, "each side must in turn need re-padding"
    got = tr.compute_loss(student, inp)
    (g_got,) = torch.autograd.grad(got, [student.model.embed_tokens.weight])

    d_rows, _ = ref_side(student, teacher, inp, "skew_forward_kl", 0.1)
    s_rows, _ = ref_side(student, teacher, inp[_STUDENT], "skew_reverse_kl", 0.2)
    want = 0.7 * d_rows.sum() / inp[_N_DATA] + 1.3 * s_rows.sum() / inp[_N_STUDENT]
    (g_want,) = torch.autograd.grad(want, [student.model.embed_tokens.weight])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-4, atol=1e-6)


def test_ce_weight_applies_to_the_data_side_only(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, alpha=0.4)
    (inp,) = paired(tr, tok, [PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:3])])
    got = tr.compute_loss(student, inp)
    y = inp["labels"][:, 1:]
    valid = y != -100
    ce = torch.nn.functional.cross_entropy(_logits(student, inp)[valid], y[valid], reduction="sum")
    d_rows, _ = ref_side(student, teacher, inp, "skew_forward_kl", 0.1)
    s_rows, _ = ref_side(student, teacher, inp[_STUDENT], "skew_reverse_kl", 0.2)
    want = (0.4 * ce + 0.6 * d_rows.sum()) / inp[_N_DATA] + s_rows.sum() / inp[_N_STUDENT]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def taught(teacher, tok, steps=30):
    """A copy of the tiny teacher fitted to the data, so that it is ahead of the student by varying margins."""
    t = copy.deepcopy(teacher).train().requires_grad_(True)
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok))
    opt = torch.optim.Adam(t.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        t(**batch).loss.backward()
        opt.step()
    return t.eval().requires_grad_(False)


def test_adaptive_skew_anchor_waits_for_a_micro_batch_with_sequences(tiny_llama_pair, tmp_path):
    """A micro-batch with no response rows on any process leaves the anchor unset (the next one sets it);
    the first with rows sets it to (1 - cap) x its mean gap, and it stays frozen after."""
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, adaptive_skew=True, divergence_kwargs={"alpha": 0.3})
    tr._set_anchor("data", torch.zeros(2), 0.3)
    assert tr.anchors["data"] is None
    tr._set_anchor("data", torch.tensor([0.8, 4.0]), 0.3)
    assert tr.anchors["data"] == pytest.approx(0.7 * 0.2)
    tr._set_anchor("data", torch.tensor([9.0, 1.0]), 0.3)
    assert tr.anchors["data"] == pytest.approx(0.7 * 0.2)


def test_adaptive_skew_per_sequence_matches_reference(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    teacher = taught(teacher, tok)
    tr = make(
        teacher,
        student,
        tok,
        tmp_path,
        adaptive_skew=True,
        divergence_kwargs={"alpha": 0.3},
        student_divergence_kwargs={"alpha": 0.25},
        temperature=2.0,
    )
    coll = PadCollator(tok.pad_token_id)
    first, second = paired(tr, tok, [coll(encode_kd_pairs(tok)[:4]), coll(encode_kd_pairs(tok)[4:])])
    second["labels"][0] = -100  # a sequence with no response token: no row, no skew, no shift of the others
    for k, inp in enumerate((first, second)):
        got = tr.compute_loss(student, inp)
        a_d, c_d = ref_alphas(student, teacher, inp, "data", 0.3, None if k == 0 else tr.anchors["data"])
        a_s, c_s = ref_alphas(
            student, teacher, inp[_STUDENT], "student", 0.25, None if k == 0 else tr.anchors["student"]
        )
        if k == 0:  # the anchors are taken on the first micro-batch, then frozen
            assert tr.anchors["data"] == pytest.approx(c_d, rel=1e-4)
            assert tr.anchors["student"] == pytest.approx(c_s, rel=1e-4)
            assert len(set(a_d.tolist())) > 1, "the test needs sequences with different skews"
        # the skews come from temperature-1 probabilities; the divergences are at the run's T = 2
        d_rows, _ = ref_side(student, teacher, inp, "skew_forward_kl", a_d, T=2.0)
        s_rows, _ = ref_side(student, teacher, inp[_STUDENT], "skew_reverse_kl", a_s, T=2.0)
        want = d_rows.sum() / inp[_N_DATA] + s_rows.sum() / inp[_N_STUDENT]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        fixed = (
            ref_side(student, teacher, inp, "skew_forward_kl", 0.3, T=2.0)[0].sum() / inp[_N_DATA]
            + ref_side(student, teacher, inp[_STUDENT], "skew_reverse_kl", 0.25, T=2.0)[0].sum() / inp[_N_STUDENT]
        )
        assert abs(fixed.item() - want.item()) > 1e-4, "adaptive skew must change the loss here"


def test_sequence_skew_closed_forms():
    cap, m = 0.1, 0.2
    anchor = (1 - cap) * m
    gap = torch.tensor([-0.3, 0.0, m, 10.0, anchor * 1.0001, anchor / 0.5])
    got = sequence_skew(gap, anchor, cap)
    # g <= 0 -> cap; g at the first batch's mean -> cap; far -> cap; g just above the anchor -> the floor
    want = torch.tensor([cap, cap, cap, cap, 0.01, cap])
    torch.testing.assert_close(got, want)
    mid = anchor / (1 - 0.05)  # the gap at which the skew is exactly 0.05
    assert float(sequence_skew(torch.tensor([mid]), anchor, cap)) == pytest.approx(0.05)


def test_gradient_accumulation_equals_one_big_batch_on_each_side(tiny_llama_pair, tmp_path, monkeypatch):
    teacher, student, tok = tiny_llama_pair
    monkeypatch.setattr(ContrastiveKDTrainer, "_student_batch", lambda self, b: self._collate(fake_samples(b, tok)))
    finals = []
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        s = copy.deepcopy(student)
        tr = ContrastiveKDTrainer(
            model=s,
            teacher_model=teacher,
            train_dataset=kd_dataset(tok).select(range(4)),
            processing_class=tok,
            args=contrastive_cfg(
                tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=acc, beta=1.4
            ),
        )
        tr._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(4))
        tr.train()
        finals.append({k: v.detach().clone() for k, v in s.named_parameters()})
    moved = max(float((finals[0][k] - p).abs().max()) for k, p in student.named_parameters())
    assert moved > 1e-4
    for other in finals[1:]:
        for k, v in finals[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-6)


def test_every_micro_batch_gets_student_samples_for_its_prompts(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    coll = PadCollator(tok.pad_token_id)
    data = [coll(encode_kd_pairs(tok)[:2]), coll(encode_kd_pairs(tok)[2:4])]
    out, n_items = tr.get_batch_samples(iter(data), 2, torch.device("cpu"))
    assert len(out) == 2 and tr.rollout_stats["modes"] == ["student"]  # one entry per optimizer step
    n_d = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    n_s = sum(int((b[_STUDENT]["labels"][:, 1:] != -100).sum()) for b in out)
    assert all(int(b[_N_DATA]) == n_d and int(b[_N_STUDENT]) == n_s for b in out) and int(n_items) == n_d + n_s
    for d, b in zip(data, out):
        assert torch.equal(b["input_ids"], d["input_ids"])  # the data side is untouched
        s = b[_STUDENT]
        for i in range(2):
            p = int((d["labels"][i] != -100).nonzero()[0])
            assert torch.equal(s["input_ids"][i, :p], d["input_ids"][i, :p])
            assert int((s["labels"][i] != -100).nonzero()[0]) == p


def test_beta_ramps_over_the_first_half(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, beta=1.0, beta_end=1.5, max_steps=8)
    got = []
    for step in (0, 2, 4, 8):
        tr.state.global_step, tr.state.max_steps = step, 8
        got.append(tr._beta())
    assert got == pytest.approx([1.0, 1.25, 1.5, 1.5])
    assert make(teacher, student, tok, tmp_path, beta=0.6)._beta() == 0.6


def test_end_to_end_training_logs_both_sides(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    before = copy.deepcopy(student.state_dict())
    tr = make(
        teacher,
        student,
        tok,
        tmp_path,
        max_steps=3,
        per_device_train_batch_size=2,
        adaptive_skew=True,
        beta=1.0,
        beta_end=1.5,
        replay_size=4,
        replay_reuse=0.5,
    )
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["kd_per_token_data"] >= 0 and h["kd_per_token_student"] >= 0 for h in logs)
    assert all(0.01 <= h["skew_alpha_data"] <= 0.1 and 0.01 <= h["skew_alpha_student"] <= 0.2 for h in logs)
    assert [round(h["beta"], 4) for h in logs] == [1.0, 1.3333, 1.5]  # beta of steps 0..2 of 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert len(tr.rollout_stats["modes"]) == 3 and tr.rollout_stats["gen_tokens"] > 0
    assert len(tr.skew_history) == 3 and None not in tr.anchors.values()


def test_bad_configurations_fail_with_the_fix(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    with pytest.raises(PotstillError, match=r"beta=2.5 is outside \[0, 2\]"):
        contrastive_cfg(tmp_path, beta=2.5)
    with pytest.raises(PotstillError, match="skew divergences on both sides"):
        contrastive_cfg(tmp_path, adaptive_skew=True, divergence="forward_kl", divergence_kwargs=None)
    with pytest.raises(PotstillError, match="unknown student_divergence"):
        contrastive_cfg(tmp_path, student_divergence="kl")
    with pytest.raises(PotstillError, match="set adaptive false"):
        contrastive_cfg(tmp_path, adaptive=True)
    with pytest.raises(PotstillError, match="contrastive steps are scored by the teacher; set alpha < 1$"):
        contrastive_cfg(tmp_path, alpha=1.0)
    with pytest.raises(PotstillError, match="token_weighting 'none'"):
        contrastive_cfg(tmp_path, token_weighting="teacher_confidence")

    with pytest.raises(PotstillError, match="live teacher.*instead of a teacher-signal cache"):
        ContrastiveKDTrainer(
            model=student,
            signal_source=FakeCache(),
            args=contrastive_cfg(tmp_path),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )
    with pytest.raises(PotstillError, match="ContrastiveConfig"):
        ContrastiveKDTrainer(
            model=student,
            teacher_model=teacher,
            args=KDConfig(output_dir=str(tmp_path)),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )


# ------------------------------------------------------------------------------------------- recipes
def test_distillm2_recipe_end_to_end(assets, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = recipe(assets, out)
    r["runs"] = [
        {
            "name": "distillm2",
            "alpha": 0.0,
            "divergence": {"name": "skew_forward_kl", "alpha": 0.1},
            "on_policy": {"max_new_tokens": 4, "contrastive": {"beta_end": 1.5, "adaptive_skew": True}},
        }
    ]
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    info = json.loads((out / "runs" / "distillm2" / "train_info.json").read_text())["on_policy"]
    steps = r["train"]["max_steps"]
    assert info["modes"] == ["student"] * steps and info["gen_tokens"] > 0
    assert set(info["skew_anchors"]) == {"data", "student"} and len(info["skew_history"]) >= 1
    assert "distillm2" in json.loads((out / "metrics.json").read_text())["runs"]


@pytest.mark.parametrize("case", ["adaptive lmbda", "not skew", "cache", "token weighting"])
def test_bad_contrastive_recipes_give_one_line(assets, tmp_path, capsys, case):  # noqa: F811
    out = tmp_path / "out"
    r = recipe(assets, out)
    run = {"name": "c", "alpha": 0.0, "divergence": {"name": "skew_forward_kl"}, "on_policy": {"contrastive": {}}}
    want = {
        "adaptive lmbda": "set adaptive false",
        "not skew": "adaptive_skew",
        "cache": "needs the live teacher",
        "token weighting": "token_weighting",
    }[case]
    if case == "adaptive lmbda":
        run["on_policy"]["adaptive"] = True
    elif case == "not skew":
        run["divergence"] = {"name": "forward_kl"}
        run["on_policy"]["contrastive"] = {"adaptive_skew": True}
    elif case == "cache":
        r["cache"] = {"signal": {"kind": "dense"}}
    else:
        run["token_weighting"] = "teacher_confidence"
    r["runs"] = [run]
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not out.exists()
