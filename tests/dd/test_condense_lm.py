"""Soft-prompt gradient matching for causal LMs (potstill.dd.condense_lm) on tiny random Llamas.

The teacher (2 layers) and student (1 layer) have hidden size 32 and share the input embedding
matrix, as the method needs; the teacher's lm_head is drawn with std 0.5 so that its
next-token distributions are peaked and depend on the input (HF's std 0.02 gives near-uniform
ones, against which every student is already close).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.dd.condense import fresh_init, frozen, gradient_distance, text_candidates
from potstill.dd.condense_lm import (
    SoftPromptSet,
    check_pair,
    condense_lm,
    evaluate_lm_set,
    init_soft_prompts,
    kd_loss,
    lm_gradient_distance,
    load_soft_prompts,
    random_soft_prompts,
)
from potstill.errors import PotstillError, VocabMismatchError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model learns from a large model.",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "What is two plus two?",
    "Two plus two is four.",
    "Please answer the question in one short sentence.",
    "Sure, here is a short answer.",
    "I like apples, bananas and oranges.",
    "She reads a book every day in the morning.",
    "The sea is blue and the waves are loud at night.",
    "Thank you very much for your help!",
    "How many days are in a week?",
    "There are seven days in a week.",
    "Explain why the sky is blue.",
    "Light from the sun is scattered by the air.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tok, *, layers: int, hidden: int = 32, vocab: int | None = None, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).float().eval()  # SDPA attention: condense_lm must switch to eager itself


@pytest.fixture(scope="module")
def tok(_tiny_tokenizer_session):
    # a copy: calling a fast tokenizer with padding/truncation changes its backend's settings, which
    # the session tokenizer would carry into later tests (and into every tokenizer.json they save)
    return copy.deepcopy(_tiny_tokenizer_session)


@pytest.fixture(scope="module")
def pair(tok):
    teacher, student = _llama(tok, layers=2, seed=0), _llama(tok, layers=1, seed=1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        teacher.lm_head.weight.normal_(0.0, 0.5)
        student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
    return teacher, student


@pytest.fixture(scope="module")
def data(tok):
    enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=10, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _hf_init(student):
    """HF Llama's init distribution (normal(0, 0.02) weights, unit norms), seeded: the student's own."""

    def init_fn(seed):
        g = torch.Generator().manual_seed(seed)
        return {
            n: torch.randn(p.shape, generator=g) * 0.02 if p.dim() == 2 else p.detach().clone()
            for n, p in student.named_parameters()
        }

    return init_fn


@pytest.mark.parametrize("labels", ["teacher", "learned"])
def test_matching_loss_decreases(pair, data, tok, labels):
    teacher, student = pair
    ids, mask = data
    E = student.get_input_embeddings().weight
    syn = random_soft_prompts(
        2, 6, E, candidates=text_candidates(tok, E.shape[0]), seed=0, labels=labels, teacher=teacher
    )
    out = condense_lm(
        student, teacher, (ids[:4], mask[:4]), syn, outer_steps=10, n_inits=1, lr_embed=3e-3, lr_label=0.05
    )
    h = out.history["match"]
    assert len(h) == 10 and len(out.history["reg"]) == 10 and len(out.history["time_s"]) == 10
    assert h[-1] < 0.8 * h[0], h
    assert not torch.equal(out.embeddings, syn.embeddings)
    assert out.labels == labels and (labels == "teacher") == (out.label_logits is None)
    if labels == "learned":
        assert not torch.equal(out.label_logits, syn.label_logits)
    assert student.config._attn_implementation == "sdpa"  # switched to eager only inside condense_lm


def test_inner_steps_train_the_student_between_matching_steps(pair, data, tok):
    teacher, student = pair
    ids, mask = data
    E = student.get_input_embeddings().weight
    syn = random_soft_prompts(2, 5, E, candidates=text_candidates(tok, E.shape[0]), seed=1)
    real = [(ids[:4], mask[:4]), (ids[4:8], mask[4:8])]
    kw = dict(n_inits=1, lr_embed=3e-3, init_fn=_hf_init(student))
    # two outer steps from the same init == one outer step of two inner steps with a frozen student (lr_net=0)
    a = condense_lm(student, teacher, real, syn, outer_steps=2, inner_steps=1, **kw)
    b = condense_lm(student, teacher, real, syn, outer_steps=1, inner_steps=2, lr_net=0.0, **kw)
    assert b.history["match"][0] == pytest.approx(sum(a.history["match"]) / 2, rel=1e-5)
    torch.testing.assert_close(b.embeddings, a.embeddings, rtol=0, atol=1e-6)
    # real batches are cycled
    same = condense_lm(student, teacher, [real[0]] * 2, syn, outer_steps=2, inner_steps=1, **kw)
    assert same.history["match"][1] != pytest.approx(a.history["match"][1], rel=1e-3)
    # with lr_net > 0 the second matching step sees theta_1 = theta_0 - lr_net * grad L(theta_0; S_1)
    c = condense_lm(student, teacher, real, syn, outer_steps=1, inner_steps=2, net_steps=1, lr_net=1.0, **kw)
    x1 = condense_lm(student, teacher, real, syn, outer_steps=1, inner_steps=1, **kw).embeddings
    theta = {n: v.requires_grad_(True) for n, v in _hf_init(student)(0).items() if "embed_tokens" not in n}
    with frozen(student, teacher):
        student.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                t1 = teacher(inputs_embeds=x1, attention_mask=syn.attention_mask).logits
            # SGD step by hand on the KD loss of the synthetic set
            loss = kd_loss(
                torch.func.functional_call(
                    student, theta, (), {"inputs_embeds": x1, "attention_mask": syn.attention_mask}
                ).logits,
                t1,
                syn.attention_mask,
            )
            grads = torch.autograd.grad(loss, list(theta.values()))
            theta1 = {n: (v - 1.0 * g).detach().requires_grad_(True) for (n, v), g in zip(theta.items(), grads)}
            d1 = float(lm_gradient_distance(student, theta1, teacher, real[1], x1, syn.attention_mask).detach())
        finally:
            student.set_attn_implementation("sdpa")
    d0 = a.history["match"][0]
    assert 2 * c.history["match"][0] - d0 == pytest.approx(d1, rel=1e-4)
    assert abs(d1 - (2 * b.history["match"][0] - d0)) > 1e-3 * d1  # and theta_1 != theta_0 made a difference


def test_gradient_distance_is_zero_for_the_real_batch_itself(pair, data):
    teacher, student = pair
    ids, mask = data
    real = (ids[:4], mask[:4])
    syn = init_soft_prompts(*real, student.get_input_embeddings().weight)
    theta = {n: v.requires_grad_(True) for n, v in fresh_init(student)(3).items() if "embed_tokens" not in n}
    with frozen(student, teacher):
        student.set_attn_implementation("eager")
        try:
            same = lm_gradient_distance(student, theta, teacher, real, syn.embeddings, syn.attention_mask)
            other = lm_gradient_distance(
                student, theta, teacher, (ids[4:8], mask[4:8]), syn.embeddings, syn.attention_mask
            )
        finally:
            student.set_attn_implementation("sdpa")
    n_rows = sum(v.shape[0] if v.dim() > 1 else 1 for v in theta.values())
    same, other = float(same.detach()), float(other.detach())
    assert same < 1e-3, same  # per row 1 - cos(g, g) = eps / (|g|^2 + eps) plus float32 rounding
    assert other > 0.1 * n_rows
    out = condense_lm(student, teacher, real, syn, outer_steps=1, init_fn=lambda seed: theta)  # same D, same eps
    assert out.history["match"][0] == pytest.approx(same, abs=1e-5)
    assert float(gradient_distance([torch.ones(3, 2)], [-torch.ones(3, 2)])) == pytest.approx(6.0)


def test_teacher_soft_labels_are_a_direct_teacher_softmax(pair, data):
    teacher, student = pair
    ids, mask = data
    E = student.get_input_embeddings().weight
    syn = init_soft_prompts(ids[:3], mask[:3], E)
    syn.embeddings += 0.01 * torch.randn(syn.embeddings.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = teacher(inputs_embeds=syn.embeddings, attention_mask=syn.attention_mask).logits
    direct = torch.softmax(logits, -1)
    torch.testing.assert_close(syn.soft_labels(teacher), direct, rtol=0, atol=1e-7)
    learned = init_soft_prompts(ids[:3], mask[:3], E, labels="learned", teacher=teacher)
    with torch.no_grad():
        at_init = teacher(input_ids=ids[:3], attention_mask=mask[:3]).logits
    torch.testing.assert_close(learned.label_logits, at_init, rtol=0, atol=1e-5)
    # labels are recomputed on the current embeddings after condensation
    out = condense_lm(
        student,
        teacher,
        (ids[4:8], mask[4:8]),
        init_soft_prompts(ids[:2], mask[:2], E),
        outer_steps=2,
        lr_embed=1e-2,
        seed=1,
    )
    with torch.no_grad():
        now = torch.softmax(teacher(inputs_embeds=out.embeddings, attention_mask=out.attention_mask).logits, -1)
    torch.testing.assert_close(out.soft_labels(teacher), now, rtol=0, atol=1e-7)
    assert (out.soft_labels(teacher) - syn.soft_labels(teacher)[:2]).abs().max() > 1e-3


def test_save_load_round_trip_is_exact(pair, data, tmp_path):
    teacher, student = pair
    ids, mask = data
    syn = init_soft_prompts(
        ids[:3],
        mask[:3],
        student.get_input_embeddings().weight,
        special_ids=[ids[0, 0].item()],
        labels="learned",
        teacher=teacher,
    )
    syn.embeddings += 1e-3 * torch.randn(syn.embeddings.shape)
    syn.meta, syn.history = {"method": "x", "params": ["a", "b"]}, {"match": [1.5, 0.25], "reg": [0.0, 0.0]}
    back = load_soft_prompts(syn.save(tmp_path / "sp"))
    for k in ("embeddings", "attention_mask", "learn_mask", "token_ids", "label_logits"):
        a, b = getattr(syn, k), getattr(back, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert (back.labels, back.meta, back.history) == (syn.labels, syn.meta, syn.history)
    assert not back.learn_mask[0, 0] and back.learn_mask[0, 1]
    plain = load_soft_prompts(
        init_soft_prompts(ids[:1], mask[:1], student.get_input_embeddings().weight).save(tmp_path / "plain")
    )
    assert plain.labels == "teacher" and plain.label_logits is None
    with pytest.raises(PotstillError, match="holds no soft-prompt set"):
        load_soft_prompts(tmp_path / "missing")


def test_to_text_gives_back_the_init_tokens(pair, tok):
    _, student = pair
    E = student.get_input_embeddings().weight
    start = tok.convert_tokens_to_ids("<|im_start|>")
    enc = tok(SENTENCES[:3], padding=True, return_tensors="pt")
    ids = torch.cat([torch.full((3, 1), start), enc["input_ids"]], 1)
    mask = torch.cat([torch.ones(3, 1, dtype=torch.long), enc["attention_mask"]], 1)
    syn = init_soft_prompts(ids, mask, E, special_ids=tok.all_special_ids)
    assert not syn.learn_mask[:, 0].any() and syn.learn_mask[:, 1:].sum() == enc["attention_mask"].sum()
    assert torch.equal(syn.project(E, candidates=text_candidates(tok, E.shape[0]))[mask.bool()], ids[mask.bool()])
    assert syn.to_text(tok, E) == ["<|im_start|>" + s for s in SENTENCES[:3]]
    moved = SoftPromptSet(**{**syn.__dict__, "embeddings": torch.randn(syn.embeddings.shape)})
    assert moved.to_text(tok, E) != syn.to_text(tok, E)


def test_mismatched_width_or_vocab_raises_one_line(tiny_teacher, tiny_student, tok, pair):
    with pytest.raises(PotstillError, match="embedding width 32 != teacher's 64") as err:
        check_pair(tiny_student, tiny_teacher)
    assert "\n" not in str(err.value)
    teacher, student = pair
    bigger = _llama(tok, layers=1, vocab=len(tok) + 8, seed=3)
    with pytest.raises(VocabMismatchError, match=rf"{len(tok) + 8} vocab rows and teacher {len(tok)}") as err:
        condense_lm(
            bigger,
            teacher,
            (torch.zeros(1, 3, dtype=torch.long),) * 2,
            random_soft_prompts(1, 3, student.get_input_embeddings().weight),
            outer_steps=1,
        )
    assert "\n" not in str(err.value)
    check_pair(student, teacher)  # same width and vocab: no error
    with pytest.warns(UserWarning, match="input embeddings differ"):
        condense_lm(
            _llama(tok, layers=1, seed=5),
            teacher,
            (torch.ones(1, 3, dtype=torch.long),) * 2,
            random_soft_prompts(1, 3, student.get_input_embeddings().weight),
            outer_steps=1,
        )
    with pytest.raises(PotstillError, match="input embedding, which soft prompts bypass"):
        condense_lm(
            student,
            teacher,
            (torch.zeros(1, 3, dtype=torch.long),) * 2,
            random_soft_prompts(1, 3, student.get_input_embeddings().weight),
            outer_steps=1,
            params=["model.embed_tokens"],
        )


def test_evaluate_lm_set(pair, data, tok):
    teacher, student = pair
    ids, mask = data
    E = student.get_input_embeddings().weight
    held_out = (ids[8:], mask[8:])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    # a set initialized from real tokens and not condensed trains exactly like those tokens
    soft = evaluate_lm_set(student, teacher, init_soft_prompts(ids[:3], mask[:3], E), held_out, steps=5, lr=3e-3)
    real = evaluate_lm_set(student, teacher, (ids[:3], mask[:3]), held_out, steps=5, lr=3e-3)
    assert soft["forward_kl"] == pytest.approx(real["forward_kl"], rel=1e-6)
    # a condensed set from random tokens lowers the held-out KL of the untrained student
    syn = random_soft_prompts(3, 8, E, candidates=text_candidates(tok, E.shape[0]), seed=4)
    out = condense_lm(
        student,
        teacher,
        [(ids[i : i + 4], mask[i : i + 4]) for i in (0, 4)],
        syn,
        outer_steps=4,
        init_fn=_hf_init(student),
        seed=2,
    )
    res = evaluate_lm_set(student, teacher, out, held_out, steps=15, lr=3e-3)
    assert res["forward_kl_init"] == pytest.approx(soft["forward_kl_init"], rel=1e-6)
    assert res["forward_kl"] < res["forward_kl_init"] - 0.05, res
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())  # trains a copy


def test_kd_loss_masks_and_averages():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, lq = torch.softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    ref = (p * (p.log() - lq)).sum(-1)
    expect = (ref[0, 0] + ref[0, 1] + ref[1, 0]) / 3
    assert float(kd_loss(s, t, mask)) == pytest.approx(float(expect), rel=1e-5)
    assert float(kd_loss(s, t, torch.zeros(2, 3))) == 0.0
