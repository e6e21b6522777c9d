"""LESS-style influence: per-example gradients against transformers' own loss, the Adam
direction against torch's Adam step, the projection against JL, and the ranking."""

from __future__ import annotations

import copy

import pytest
import torch

from potstill.data import encode_example
from potstill.dd.influence import (
    AdamState,
    RandomProjection,
    gradient_features,
    less_scores,
    per_example_gradients,
    trainable_parameters,
)
from potstill.errors import PotstillError

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("How many days are in a week?", "Seven days."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Translate hello into Spanish:", "hola"),
]


def encoded(tok):
    return [encode_example(tok, [{"role": "user", "content": p}], r, 96) for p, r in PAIRS]


def lora(student):
    """LoRA with random A and B (peft's init_lora_weights=False), so both get gradients."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(student, cfg)


def hf_grad(model, ex_list) -> torch.Tensor:
    """Reference: transformers' own causal-LM loss (mean over labelled tokens of a padded batch)."""
    names = [n for n, _ in trainable_parameters(model)]
    n = max(len(e["input_ids"]) for e in ex_list)
    ids = torch.zeros(len(ex_list), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(ex_list):
        k = len(e["input_ids"])
        ids[i, :k], mask[i, :k], labels[i, :k] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
    model.zero_grad()
    model.eval()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    params = dict(model.named_parameters())
    out = torch.cat([params[nm].grad.reshape(-1) for nm in names])
    model.zero_grad()
    return out


# ------------------------------------------------------------------------------ projection


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products(kind):
    g = torch.Generator().manual_seed(0)
    P, d = 1200, 1024  # two projection blocks (1024 rows each)
    x = torch.randn(6, P, generator=g)
    x[1] = x[0] + 0.3 * x[1]  # a correlated pair
    proj = RandomProjection(P, d, seed=11, kind=kind)
    y = proj(x)
    assert y.shape == (6, d)
    exact = x @ x.T
    norms = x.norm(dim=1)
    # JL: each <Rx, Ry> has standard deviation about |x||y| sqrt(2/d) ~ 0.044 |x||y|
    assert bool(((y @ y.T - exact).abs() <= 0.2 * norms[:, None] * norms[None, :]).all())
    # R does not depend on how many vectors are projected at once, and is linear: R = proj(I)
    assert torch.allclose(proj(x[2]), y[2], atol=1e-4)
    R = proj(torch.eye(P))
    assert torch.allclose(x @ R, y, atol=1e-3, rtol=1e-4)
    if kind == "rademacher":
        assert torch.allclose(R.abs(), torch.full_like(R, d**-0.5))
    # seeded
    assert torch.equal(RandomProjection(P, d, seed=11, kind=kind)(x), y)
    assert not torch.allclose(RandomProjection(P, d, seed=12, kind=kind)(x), y)


# -------------------------------------------------------------------------------- gradients


def test_per_example_gradients_equal_a_single_example_backward(tiny_student, tiny_tokenizer):
    model = lora(tiny_student)
    exs = encoded(tiny_tokenizer)
    P = sum(p.numel() for _, p in trainable_parameters(model))
    assert P == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)  # only the adapters
    grads = list(per_example_gradients(model, exs[:3]))
    for ex, g in zip(exs[:3], grads):
        ref = hf_grad(model, [ex])
        assert g.shape == (P,) and ref.abs().max() > 0
        assert torch.allclose(g, ref, atol=1e-6, rtol=1e-4)
    # a padded batch's mean-token loss is the token-weighted mean of the per-example losses
    n = [sum(t != -100 for t in e["labels"][1:]) for e in exs[:2]]
    mixed = (n[0] * grads[0] + n[1] * grads[1]) / (n[0] + n[1])
    assert torch.allclose(hf_grad(model, exs[:2]), mixed, atol=1e-6, rtol=1e-4)
    # no projection: the features are the gradients
    assert torch.allclose(gradient_features(model, exs[:3], proj_dim=None, proj_batch=2), torch.stack(grads))


def test_plain_student_uses_its_trainable_subset(tiny_student, tiny_tokenizer):
    exs = encoded(tiny_tokenizer)
    tiny_student.requires_grad_(False)
    with pytest.raises(PotstillError, match="no trainable parameters"):
        gradient_features(tiny_student, exs)
    name = "model.layers.0.mlp.down_proj.weight"
    f = gradient_features(tiny_student, exs[:2], params=[name], proj_dim=None)
    assert f.shape == (2, dict(tiny_student.named_parameters())[name].numel())
    with pytest.raises(PotstillError, match="no parameter 'nope'"):
        gradient_features(tiny_student, exs, params=["nope"])


def test_adam_direction_is_the_step_torch_adam_takes(tiny_student, tiny_tokenizer):
    model = lora(tiny_student)
    exs = encoded(tiny_tokenizer)
    named = trainable_parameters(model)
    opt = torch.optim.Adam([p for _, p in named], lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    for ex in exs[:3]:  # warmup: three Adam steps
        opt.zero_grad()
        model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.backward()
        opt.step()
    state = AdamState.from_optimizer(opt, model)
    assert state.step == 3 and state.betas == (0.8, 0.95) and state.eps == 1e-6
    g = next(per_example_gradients(model, [exs[4]]))
    gamma = gradient_features(model, [exs[4]], adam=state, proj_dim=None)[0]
    # reference: let torch's Adam take the step on a copy; Gamma = -(theta' - theta) / lr
    m2 = copy.deepcopy(model)
    ps2 = [p for _, p in trainable_parameters(m2)]
    opt2 = torch.optim.Adam(ps2, lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    opt2.load_state_dict(opt.state_dict())
    before = torch.cat([p.detach().reshape(-1).clone() for p in ps2])
    s = 0
    for p in ps2:
        p.grad = g[s : s + p.numel()].view_as(p).clone()
        s += p.numel()
    opt2.step()
    after = torch.cat([p.detach().reshape(-1) for p in ps2])
    assert torch.allclose(gamma, -(after - before) / 1e-3, atol=2e-3, rtol=1e-3)
    # an optimizer without state for the adapters is refused
    with pytest.raises(PotstillError, match="no Adam state"):
        AdamState.from_optimizer(torch.optim.Adam([p for _, p in named]), model)


# ---------------------------------------------------------------------------------- ranking


@pytest.mark.parametrize("proj_dim", [None, 1024])
def test_the_target_itself_scores_highest(tiny_student, tiny_tokenizer, proj_dim):
    model = lora(tiny_student)
    exs = encoded(tiny_tokenizer)
    scores = less_scores(model, exs, [exs[2]], proj_dim=proj_dim, seed=3)
    assert scores.shape == (len(exs),)
    assert int(scores.argmax()) == 2
    assert scores[2].item() == pytest.approx(1.0, abs=1e-5 if proj_dim is None else 0.05)
    assert bool((scores <= 1 + 1e-6).all())
    # two target subtasks: the max over groups puts both targets on top
    two = less_scores(model, exs, [exs[1], exs[4]], target_groups=["a", "b"], proj_dim=proj_dim, seed=3)
    assert set(two.topk(2).indices.tolist()) == {1, 4}


def test_influence_errors(tiny_student, tiny_tokenizer):
    model = lora(tiny_student)
    exs = encoded(tiny_tokenizer)
    with pytest.raises(PotstillError, match="empty"):
        less_scores(model, [], exs)
    with pytest.raises(PotstillError, match="one per target example"):
        less_scores(model, exs, exs[:2], target_groups=[0])
    with pytest.raises(PotstillError, match="proj_dim=0"):
        gradient_features(model, exs[:1], proj_dim=0)
    with pytest.raises(PotstillError, match="coordinates"):
        gradient_features(model, exs[:1], adam=AdamState(torch.zeros(3), torch.zeros(3), 1))


def test_lora_model_trains_only_the_adapters(tiny_student, tiny_tokenizer):
    from potstill.dd.influence import lora_model

    model = lora_model(tiny_student, r=2, target_modules=("q_proj",))
    named = trainable_parameters(model)
    assert named and all("lora_" in n and "q_proj" in n for n, _ in named)
    g = next(per_example_gradients(model, encoded(tiny_tokenizer)[:1]))
    a = sum(p.numel() for n, p in named if "lora_A" in n)
    # peft starts B = 0: A gets no gradient before a warmup step, B does
    first_a = named[0][0].find("lora_A") >= 0
    assert first_a and bool((g[:a] == 0).all()) and bool((g[a:] != 0).any())
