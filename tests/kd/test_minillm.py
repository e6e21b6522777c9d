"""MiniLLMKDTrainer: teacher-mixed sampling, later-token returns, and the loss against an independent
float64 reference of the single-step + long-term policy gradient."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import FakeCache, encode_kd_pairs, fake_samples, kd_dataset, minillm_cfg, recipe, write

from potstill.cli import main
from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.generate import generate, left_pad
from potstill.kd import KDConfig, MiniLLMKDTrainer
from potstill.kd.minillm import TeacherMix, later_returns
from potstill.kd.onpolicy import ROLLOUT


def make(teacher, student, tok, tmp_path, **kw):
    return MiniLLMKDTrainer(
        model=student,
        teacher_model=teacher,
        args=minillm_cfg(tmp_path, **kw),
        train_dataset=kd_dataset(tok),
        processing_class=tok,
    )


def rollout(tok, n=4):
    b = PadCollator(tok.pad_token_id)(fake_samples(PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:n]), tok))
    return {**b, ROLLOUT: True}


# ------------------------------------------------------------------ independent reference (float64, full logits)
def reference(student, teacher, b, mix, length_norm=True, long_term=True):
    """sum_t w_t [RKL_t - sg(R_{t+1}) log q(y_t)] / N, written from the paper's equations."""
    y = b["labels"][:, 1:]
    valid = y != -100
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double().log_softmax(-1)
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].double()
        t = t.log_softmax(-1)
    total = torch.zeros((), dtype=torch.float64)
    n = int(valid.sum())
    for i in range(y.shape[0]):
        pos = valid[i].nonzero().squeeze(-1).tolist()
        lq = [float(s[i, p, y[i, p]]) for p in pos]
        lp = [float(t[i, p, y[i, p]]) for p in pos]
        r = [a - c for a, c in zip(lp, lq)]
        for j, p in enumerate(pos):
            q_y, p_y = math.exp(lq[j]), math.exp(lp[j])
            w = q_y / (mix * p_y + (1 - mix) * q_y)
            rkl = (s[i, p].exp() * (s[i, p] - t[i, p])).sum()
            later = r[j + 1 :]
            R = (sum(later) / len(later) if length_norm else sum(later)) if later else 0.0
            total = total + w * rkl
            if long_term:
                total = total - w * R * s[i, p, y[i, p]]
    return total / n


@pytest.mark.parametrize("mix,length_norm,long_term", [(0.2, True, True), (0.5, False, True), (0.0, True, False)])
def test_loss_matches_float64_reference_values_and_gradients(tiny_llama_pair, tmp_path, mix, length_norm, long_term):
    teacher, student, tok = tiny_llama_pair
    tr = make(teacher, student, tok, tmp_path, mix=mix, length_norm=length_norm, long_term=long_term, chunk_size=5)
    b = rollout(tok)
    got = tr.compute_loss(student, b)
    want = reference(student, teacher, b, mix, length_norm, long_term)
    params = [student.model.embed_tokens.weight, student.model.layers[0].mlp.up_proj.weight]
    g_got = torch.autograd.grad(got, params)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-4, atol=1e-6)


def test_the_long_term_term_changes_the_gradient_not_the_single_step_value(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    b = rollout(tok)
    with_lt = make(teacher, student, tok, tmp_path, long_term=True)
    without = make(teacher, student, tok, tmp_path / "b", long_term=False)
    w = student.model.embed_tokens.weight
    ga = torch.autograd.grad(with_lt.compute_loss(student, b), [w])[0]
    gb = torch.autograd.grad(without.compute_loss(student, b), [w])[0]
    assert float((ga - gb).abs().max()) > 1e-6


def test_later_returns_closed_forms():
    r = torch.tensor([1.0, 2.0, 4.0, 10.0, 20.0])
    seq = torch.tensor([0, 0, 0, 2, 2])  # sequence 1 has no rows
    torch.testing.assert_close(later_returns(r, seq, False), torch.tensor([6.0, 4.0, 0.0, 20.0, 0.0]))
    torch.testing.assert_close(later_returns(r, seq, True), torch.tensor([3.0, 4.0, 0.0, 20.0, 0.0]))
    assert later_returns(torch.zeros(0), torch.zeros(0, dtype=torch.long), True).numel() == 0


def test_teacher_mix_processor_equals_the_mixture_of_uncached_forwards(tiny_llama_pair):
    """The processor's cached teacher (left padding, position ids) agrees with a plain forward of the
    teacher on each whole prefix, and its output is log(mix p + (1 - mix) q)."""
    teacher, student, tok = tiny_llama_pair
    prompts = [
        e["input_ids"][: int((torch.tensor(e["labels"]) != -100).nonzero()[0])] for e in encode_kd_pairs(tok)[:3]
    ]
    calls = []

    def factory(ids, mask):
        proc = TeacherMix(teacher, 0.3, mask, 400)

        def record(input_ids, scores):
            out = proc(input_ids, scores)
            calls.append((input_ids.clone(), scores.clone(), out.clone(), mask))
            return out

        return record

    gen = generate(
        student,
        tok,
        prompts,
        max_new_tokens=4,
        batch_size=3,
        do_sample=True,
        seed=3,
        sort_by_length=False,
        progress=False,
        processor=factory,
    )
    assert len(calls) >= 2 and gen.num_tokens > 0
    for ids, scores, out, mask0 in calls:
        mask = torch.cat([mask0, torch.ones(ids.shape[0], ids.shape[1] - mask0.shape[1], dtype=torch.long)], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            p = teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].double().softmax(-1)
        q = scores.double().softmax(-1)
        torch.testing.assert_close(out.double().exp(), 0.3 * p + 0.7 * q, rtol=1e-4, atol=1e-6)


def test_importance_weights_are_bounded_and_one_without_mixing(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    for mix, hi in ((0.0, 1.0), (0.4, 1 / 0.6)):
        tr = make(
            teacher,
            copy.deepcopy(student),
            tok,
            tmp_path / str(mix),
            mix=mix,
            max_steps=2,
            per_device_train_batch_size=2,
        )
        tr.train()
        ws = [w for _, w, _ in tr.minillm_stats]
        assert len(ws) == 2 and all(0 < w <= hi + 1e-6 for w in ws)
        if mix == 0.0:
            assert ws == pytest.approx([1.0, 1.0])


def test_end_to_end_trains_on_samples_every_step(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    before = copy.deepcopy(student.state_dict())
    tr = make(teacher, student, tok, tmp_path, max_steps=3, per_device_train_batch_size=2)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert all("importance_weight" in h and "reward_per_token" in h for h in logs)
    assert tr.rollout_stats["modes"] == ["student"] * 3 and tr.rollout_stats["gen_tokens"] > 0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_bad_configurations_fail_with_the_fix(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    for kw, msg in (
        ({"alpha": 0.5}, "set alpha 0"),
        ({"divergence": "forward_kl"}, "set divergence reverse_kl"),
        ({"replay_size": 4}, "replay_size 0"),
        ({"mix": 1.0}, r"must be in \[0, 1\)"),
        ({"token_weighting": "teacher_confidence"}, "token_weighting 'none'"),
        ({"gen_temperature": 0.7}, "gen_temperature 1"),
        ({"gen_top_p": 0.9}, "gen_top_p 1"),
        ({"temperature": 2.0}, "set temperature 1"),
        ({"temperature_end": 2.0}, "temperature schedule"),
    ):
        with pytest.raises(PotstillError, match=msg):
            minillm_cfg(tmp_path, **kw)

    with pytest.raises(PotstillError, match="instead of a teacher-signal cache"):
        MiniLLMKDTrainer(
            model=student,
            signal_source=FakeCache(),
            args=minillm_cfg(tmp_path),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )
    with pytest.raises(PotstillError, match="MiniLLMConfig"):
        MiniLLMKDTrainer(
            model=student,
            teacher_model=teacher,
            args=KDConfig(output_dir=str(tmp_path)),
            train_dataset=kd_dataset(tok),
            processing_class=tok,
        )


# ------------------------------------------------------------------------------------------- recipes
def test_minillm_recipe_end_to_end(assets, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    r = recipe(assets, out)
    r["runs"] = [
        {
            "name": "minillm",
            "alpha": 0.0,
            "divergence": {"name": "reverse_kl"},
            "on_policy": {"max_new_tokens": 4, "minillm": {"mix": 0.2}},
        }
    ]
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 0
    info = json.loads((out / "runs" / "minillm" / "train_info.json").read_text())["on_policy"]
    assert info["modes"] == ["student"] * r["train"]["max_steps"] and len(info["minillm_stats"]) >= 1
    assert "minillm" in json.loads((out / "metrics.json").read_text())["runs"]


@pytest.mark.parametrize("case", ["divergence", "alpha", "replay", "contrastive", "top_p", "temperature"])
def test_bad_minillm_recipes_give_one_line(assets, tmp_path, capsys, case):  # noqa: F811
    out = tmp_path / "out"
    r = recipe(assets, out)
    run = {"name": "m", "alpha": 0.0, "divergence": {"name": "reverse_kl"}, "on_policy": {"minillm": {}}}
    want = {
        "divergence": "reverse_kl",
        "alpha": "alpha 0",
        "replay": "replay_size",
        "contrastive": "contrastive",
        "top_p": "method.top_p 1",
        "temperature": "set temperature 1",
    }[case]
    if case == "divergence":
        run["divergence"] = {"name": "forward_kl"}
    elif case == "alpha":
        run["alpha"] = 0.3
    elif case == "replay":
        run["on_policy"]["replay_size"] = 4
    elif case == "top_p":
        run["on_policy"]["top_p"] = 0.9
    elif case == "temperature":
        run["temperature"] = 2.0
    else:
        run["on_policy"]["contrastive"] = {}
    r["runs"] = [run]
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not out.exists()


def test_left_pad_is_what_the_processor_sees(tiny_llama_pair):
    _, _, tok = tiny_llama_pair
    ids, mask = left_pad([[5, 6, 7], [8]], tok.pad_token_id, "cpu")
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and ids[1, -1] == 8


def test_teacher_mix_gives_no_mass_past_the_shared_vocabulary(tiny_llama_pair):
    teacher, _, tok = tiny_llama_pair
    ids, mask = left_pad([[5, 6, 7], [8, 9]], tok.pad_token_id, "cpu")
    scores = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    out = TeacherMix(teacher, 0.2, mask, 390)(ids, scores)
    assert torch.isneginf(out[:, 390:]).all()
    torch.testing.assert_close(out[:, :390].exp().sum(-1), torch.ones(2), rtol=1e-5, atol=1e-6)


def test_sampling_ignores_the_models_own_generation_config(tiny_llama_pair):
    """An instruct model's repetition penalty or min_p must not reach on-policy samples."""
    _, student, tok = tiny_llama_pair
    prompts = [e["input_ids"][:12] for e in encode_kd_pairs(tok)[:3]]
    kw = dict(max_new_tokens=8, batch_size=3, do_sample=True, seed=5, sort_by_length=False, progress=False)
    plain = generate(student, tok, prompts, **kw).token_ids
    skewed = copy.deepcopy(student)
    skewed.generation_config.repetition_penalty = 5.0
    skewed.generation_config.min_p = 0.5
    skewed.generation_config.no_repeat_ngram_size = 1
    assert generate(skewed, tok, prompts, **kw).token_ids == plain


def test_gradient_accumulation_equals_one_big_batch(tiny_llama_pair, tmp_path, monkeypatch):
    teacher, student, tok = tiny_llama_pair
    monkeypatch.setattr(MiniLLMKDTrainer, "_student_batch", lambda self, b: self._collate(fake_samples(b, tok)))
    finals = []
    for bs, acc in ((4, 1), (2, 2)):
        s = copy.deepcopy(student)
        tr = MiniLLMKDTrainer(
            model=s,
            teacher_model=teacher,
            train_dataset=kd_dataset(tok).select(range(4)),
            processing_class=tok,
            args=minillm_cfg(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=acc),
        )
        tr._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(4))
        tr.train()
        finals.append({k: v.detach().clone() for k, v in s.named_parameters()})
    assert max(float((finals[0][k] - p).abs().max()) for k, p in student.named_parameters()) > 1e-4
    for k, v in finals[0].items():
        torch.testing.assert_close(finals[1][k], v, rtol=1e-4, atol=1e-6)
