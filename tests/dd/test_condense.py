"""Dataset condensation in embedding space (potstill.dd.condense) on a toy problem.

The toy: 40 "words" whose embeddings form two Gaussian blobs (words 0..19 around +mu,
20..39 around -mu); a sentence of class c draws most words from its blob. The learner is a
tiny encoder (linear + tanh per position, mean pooling, linear head).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ab_word_tokenizer
from torch import nn

from potstill.dd.condense import (
    CondensedSet,
    RealData,
    fresh_init,
    gradient_distance,
    gradient_matching,
    init_condensed,
    init_from_ids,
    latent_regularizer,
    load_condensed,
    nearest_tokens,
    select_params,
    text_candidates,
    train_experts,
    trajectory_matching,
)
from potstill.dd.protocol import Features, evaluate_features, train_top
from potstill.errors import PotstillError

V, H, L = 44, 16, 8  # 4 special ids + 40 words


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(H, H)
        self.head = nn.Linear(H, 2)

    def forward(self, inputs_embeds, attention_mask):
        h = torch.tanh(self.layer(inputs_embeds))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, H, generator=g)
    mu = torch.randn(H, generator=g)
    E[4:24] += 1.2 * mu
    E[24:] -= 1.2 * mu
    return E


def real_data(n: int, seed: int, noise: float = 0.3) -> RealData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = 4 + torch.randint(0, 20, (n, L), generator=g) + 20 * labels[:, None]
    flip = torch.rand(n, L, generator=g) < noise
    ids = torch.where(flip, 4 + torch.randint(0, 40, (n, L), generator=g), ids)
    return RealData(ids, torch.ones(n, L, dtype=torch.long), labels)


def noise_init(E, per_class: int = 3, seed: int = 5) -> CondensedSet:
    """Synthetic examples whose words ignore the class: a learner trained on them is at chance."""
    g = torch.Generator().manual_seed(seed)
    ids = 4 + torch.randint(0, 40, (2 * per_class, L), generator=g)
    labels = torch.tensor([0] * per_class + [1] * per_class)
    return init_from_ids(ids, torch.ones_like(ids), labels, E, num_classes=2)


def accuracy_after_training(cs: CondensedSet, test: RealData, E, seeds=(0, 1, 2)) -> float:
    accs = []
    for s in seeds:
        top = Tiny(100 + s)
        train_top(
            top,
            Features(cs.embeddings.detach(), cs.attention_mask, cs.classes),
            steps=60,
            lr=3e-2,
            batch_size=8,
            seed=s,
        )
        accs.append(evaluate_features(top, Features(E[test.input_ids], test.attention_mask, test.labels))["accuracy"])
    return sum(accs) / len(accs)


# ------------------------------------------------------------------------------ distance


def _ref_distance(gs, gr):
    total = 0.0
    for a, b in zip(gs, gr):
        a, b = a.double(), b.double()
        rows_a = [a.flatten()] if a.dim() <= 1 else list(a.reshape(a.shape[0], -1))
        rows_b = [b.flatten()] if b.dim() <= 1 else list(b.reshape(b.shape[0], -1))
        for u, v in zip(rows_a, rows_b):
            total += 1.0 - float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))
    return total


def test_gradient_distance_matches_reference_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g), torch.randn(2, 3, 2, generator=g)]
    gr = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g), torch.randn(2, 3, 2, generator=g)]
    assert float(gradient_distance(gs, gr)) == pytest.approx(_ref_distance(gs, gr), abs=1e-5)
    assert float(gradient_distance(gs, gs)) == pytest.approx(0.0, abs=1e-5)
    rows = 5 + 1 + 2
    assert float(gradient_distance(gs, [-t for t in gs])) == pytest.approx(2.0 * rows, abs=1e-4)
    assert float(gradient_distance(gs, [3.0 * t for t in gr])) == pytest.approx(_ref_distance(gs, gr), abs=1e-4)


# --------------------------------------------------------------------- regularizer / projection


@pytest.mark.parametrize("kind", ["cosine", "l2", "sq"])
def test_latent_regularizer_zero_on_token_rows_and_grows(kind):
    E = blobs()
    ids = torch.tensor([[5, 9, 30], [7, 7, 40]])
    x = E[ids]
    assert float(latent_regularizer(x, E, kind=kind)) == pytest.approx(0.0, abs=1e-5)
    g = torch.Generator().manual_seed(1)
    d = torch.randn(x.shape, generator=g)
    d = d - (d * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x  # perpendicular: cosine moves too
    d = 0.05 * d / d.norm(dim=-1, keepdim=True)
    values = [float(latent_regularizer(x + t * d, E, kind=kind)) for t in (0.5, 1.0, 2.0)]
    assert 0 < values[0] < values[1] < values[2]
    # l2: the mean min distance, against a brute-force reference
    y = x + d * 2.0
    ref = torch.cdist(y.reshape(-1, H).double(), E.double()).min(-1).values.mean()
    if kind == "l2":
        assert values[2] == pytest.approx(float(ref), rel=1e-4)


def test_latent_regularizer_mask_and_gradient():
    E = blobs()
    x = (E[torch.tensor([[5, 9], [30, 31]])] + 0.3).requires_grad_(True)
    mask = torch.tensor([[True, False], [False, False]])
    r = latent_regularizer(x, E, mask=mask, kind="sq")
    r.backward()
    assert x.grad[0, 1].abs().sum() == 0 and x.grad[1].abs().sum() == 0 and x.grad[0, 0].abs().sum() > 0
    assert float(latent_regularizer(x.detach(), E, mask=torch.zeros_like(mask), kind="sq")) == 0.0
    with pytest.raises(PotstillError):
        latent_regularizer(x, E, kind="manhattan")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_tokens_matches_brute_force(metric):
    E = blobs()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, H, generator=g)
    cand = torch.arange(4, V)
    if metric == "cosine":
        ref = (F.normalize(x, dim=-1) @ F.normalize(E[cand], dim=-1).T).argmax(-1)
    else:
        ref = torch.cdist(x.reshape(-1, H), E[cand]).argmin(-1).reshape(3, 7)
    assert torch.equal(nearest_tokens(x, E, metric=metric, candidates=cand, chunk=5), cand[ref])


def test_to_text_returns_nearest_words_and_keeps_specials():
    from potstill.data.classification import Example

    tok = ab_word_tokenizer()
    E = blobs()
    examples = [Example("a1 a2 a3", 0), Example("a4 a5", 0), Example("b1 b2 b3", 1), Example("b4 b5", 1)]
    cs = init_condensed(examples, 2, tok, E, max_length=16, seed=0)
    assert cs.learn_mask.sum() == 10  # 10 words; [CLS], [SEP] and padding stay fixed
    targets = {0: ["a7", "a8", "a9"], 1: ["b10", "b11", "b12"]}
    vocab = tok.get_vocab()
    x = cs.embeddings.clone()
    want = []
    for i in range(len(cs)):
        pos = cs.learn_mask[i].nonzero().flatten().tolist()
        words = targets[int(cs.classes[i])][: len(pos)]
        for p, w in zip(pos, words):
            x[i, p] = E[vocab[w]] * 1.3 + 0.01  # a scaled, shifted token row: still nearest (cosine)
        want.append(" ".join(words))
    x[0, 0] = E[0]  # a [CLS] slot moved onto [PAD]: fixed positions keep their token regardless
    cs.embeddings = x
    out = cs.to_text(tok, E)
    assert [e.text for e in out] == want
    assert [e.label for e in out] == cs.classes.tolist()
    # a learned position sitting exactly on a special row never decodes to that special token
    cs.embeddings[0, 1] = E[0]
    ids = cs.project(E, candidates=text_candidates(tok, V))
    assert int(ids[0, 1]) >= 4
    assert int(ids[0, 0]) == 2  # [CLS] kept


def test_save_load_roundtrip(tmp_path):
    E = blobs()
    cs = noise_init(E)
    cs.lr_log = torch.tensor([-1.0, -2.0])
    cs.meta = {"method": "x", "params": ["a", "b"]}
    cs.history = {"match": [1.0, 0.5]}
    cs.label_logits[0, 1] = 0.25
    cs.save(tmp_path / "set")
    back = load_condensed(tmp_path / "set")
    for k in ("embeddings", "attention_mask", "learn_mask", "token_ids", "classes", "label_logits", "lr_log"):
        a, b = getattr(cs, k), getattr(back, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert back.meta == cs.meta and back.history == cs.history
    with pytest.raises(PotstillError):
        load_condensed(tmp_path / "missing")


# ------------------------------------------------------------------------------ condensation


def test_select_params_and_fresh_init():
    model = Tiny(0)
    assert select_params(model, ["head"]) == ["head.weight", "head.bias"]
    with pytest.raises(PotstillError):
        select_params(model, ["nothing"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    init = fresh_init(model, ("head",))
    a, b = init(1), init(1)
    assert torch.equal(a["head.weight"], b["head.weight"])  # seeded
    assert not torch.equal(a["head.weight"], init(2)["head.weight"])
    assert torch.equal(a["layer.weight"], before["layer.weight"])  # not re-drawn
    for n, p in model.named_parameters():  # learner untouched
        assert torch.equal(p, before[n])


def test_gradient_matching_decreases_its_loss_and_keeps_fixed_positions():
    E = blobs()
    real = real_data(256, seed=1)
    syn = noise_init(E)
    syn.learn_mask[:, 0] = False  # pretend position 0 is a special token
    out = gradient_matching(
        Tiny(0), real, syn, E, iterations=40, inner_steps=1, n_inits=1, real_batch=128, lr_embed=0.05, seed=0
    )
    h = out.history["match"]
    assert len(h) == 40 and len(out.history["reg"]) == 40
    assert sum(h[-5:]) / 5 < 0.5 * h[0]
    assert torch.equal(out.embeddings[:, 0], syn.embeddings[:, 0])
    assert not torch.equal(out.embeddings[:, 1:], syn.embeddings[:, 1:])
    assert out.meta["method"] == "gradient_matching" and torch.equal(syn.embeddings, noise_init(E).embeddings)


def test_trajectory_matching_decreases_its_loss():
    E = blobs()
    real = real_data(256, seed=1)
    experts = train_experts(Tiny(0), real, E, n_experts=1, steps=40, save_every=10, lr=0.3, batch_size=32)
    assert len(experts) == 1 and len(experts[0]) == 5
    out = trajectory_matching(
        Tiny(0),
        experts,
        noise_init(E),
        E,
        iterations=40,
        syn_steps=5,
        expert_span=2,
        max_start=0,
        syn_lr=0.3,
        lr_embed=0.05,
        per_step_lr=True,
        seed=0,
    )
    h = out.history["match"]
    assert sum(h[-5:]) / 5 < 0.5 * h[0]
    assert out.lr_log is not None and out.lr_log.shape == (5,)


def test_condensed_set_trains_a_learner_above_chance():
    E = blobs()
    real, test = real_data(256, seed=1), real_data(400, seed=2)
    syn = noise_init(E)
    before = accuracy_after_training(syn, test, E)
    gm = gradient_matching(Tiny(0), real, syn, E, iterations=30, inner_steps=3, real_batch=64, lr_embed=0.05, seed=0)
    experts = train_experts(Tiny(0), real, E, n_experts=2, steps=40, save_every=10, lr=0.3)
    tm = trajectory_matching(
        Tiny(0), experts, syn, E, iterations=40, syn_steps=5, expert_span=2, syn_lr=0.3, lr_embed=0.05, seed=0
    )
    assert before < 0.65
    assert accuracy_after_training(gm, test, E) > 0.8
    assert accuracy_after_training(tm, test, E) > 0.8


def test_prefix_with_cached_real_features_equals_prefix_on_the_fly():
    E = blobs()
    real = real_data(128, seed=1)
    torch.manual_seed(3)
    prefix_layer = nn.Linear(H, H)

    class Prefix(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = prefix_layer

        def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None):
            return torch.relu(self.lin(inputs_embeds))

    prefix = Prefix()
    with torch.no_grad():
        feats = prefix(inputs_embeds=E[real.input_ids])
    cached = RealData(real.input_ids, real.attention_mask, real.labels, features=feats)
    kw = {"iterations": 5, "inner_steps": 2, "real_batch": 32, "lr_embed": 0.05, "seed": 0, "prefix": prefix}
    a = gradient_matching(Tiny(0), real, noise_init(E), E, **kw)
    b = gradient_matching(Tiny(0), cached, noise_init(E), E, **kw)
    assert a.history["match"] == pytest.approx(b.history["match"], rel=1e-5)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
    assert all(p.requires_grad for p in prefix.parameters())  # restored after condensation


def test_errors_are_one_line_potstill_errors():
    E = blobs()
    syn = noise_init(E)
    real0 = RealData(torch.full((4, L), 5), torch.ones(4, L, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(PotstillError):
        gradient_matching(Tiny(0), real0, syn, E, iterations=1)  # no real example of class 1
    with pytest.raises(PotstillError):
        trajectory_matching(Tiny(0), [[{"head.weight": torch.zeros(2, H)}]], syn, E, iterations=1)
    with pytest.raises(PotstillError):
        init_from_ids(syn.token_ids, syn.attention_mask, syn.classes, E, num_classes=2, label_confidence=1.0)
