"""MiniLMv2 attention-relation distillation: relation_kl, the projection hooks, the trainer term, the recipe."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import encode_kd_pairs, kd_dataset, kd_ref_loss, one_step_cpu_args

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd.attention_relation import capture_projections, relation_kl
from potstill.kd.feature import FeatureKDConfig, FeatureKDTrainer
from potstill.recipes.distill import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def rcfg(tmp_path, **kw):
    return FeatureKDConfig(**(one_step_cpu_args(tmp_path, relation_layers=[[1, 2]], relation_heads=2) | kw))


def ref_relation_kl(xs, xt, mask, R):
    """Float64 loops over (batch, query, relation head): softmax over the unpadded keys j <= i."""
    rows = []
    for b in range(xs.shape[0]):
        row = []
        for i in range(xs.shape[1]):
            if not mask[b, i]:
                row.append(torch.zeros((), dtype=torch.float64))
                continue
            keys = [j for j in range(i + 1) if mask[b, j]]
            total = 0.0
            for r in range(R):
                dists = []
                for x in (xt, xs):
                    d = x.shape[-1] // R
                    part = x[b, :, r * d : (r + 1) * d].double()
                    scores = torch.stack([part[i] @ part[j] for j in keys]) / math.sqrt(d)
                    dists.append(torch.exp(scores - torch.logsumexp(scores, 0)))
                p, q = dists
                total = total + (p * (p.log() - q.log())).sum()
            row.append(total / R)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _inputs(seed=0, B=3, T=6, ws=12, wt=8):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, T, ws, generator=g)
    xt = torch.randn(B, T, wt, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return xs, xt, mask


@pytest.mark.parametrize("R", [1, 2, 4])
def test_relation_kl_matches_float64_reference_values_and_gradients(R):
    xs, xt, mask = _inputs()
    xs.requires_grad_(True)
    got = relation_kl(xs, xt, mask, R)
    xs64 = xs.detach().double().requires_grad_(True)
    want = ref_relation_kl(xs64, xt.double(), mask, R)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((got * w).sum(), xs)
    (g64,) = torch.autograd.grad((want * w.double()).sum(), xs64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)
    assert (want[mask.bool()] > 0).sum() > 10  # the reference is not trivially zero


def test_relation_kl_is_zero_for_identical_inputs():
    xs, _, mask = _inputs(ws=8)
    torch.testing.assert_close(relation_kl(xs, xs.clone(), mask, 2), torch.zeros(3, 6), rtol=0, atol=1e-6)
    assert relation_kl(xs, 2 * xs, mask, 2).sum() > 1e-3  # the scale inside the softmax matters


def test_a_position_only_relates_to_itself_and_earlier_unpadded_keys():
    xs, xt, mask = _inputs()
    base = relation_kl(xs, xt, mask, 2)
    xs2, xt2 = xs.clone(), xt.clone()
    xs2[:, 3] += 5.0
    xt2[:, 3] -= 3.0
    moved = relation_kl(xs2, xt2, mask, 2)
    torch.testing.assert_close(moved[:, :3], base[:, :3], rtol=0, atol=0)
    assert not torch.allclose(moved[0, 3:], base[0, 3:])
    # Left padding: the padded keys' vectors (here garbage) take no part in any row.
    xs3, xt3 = xs.clone(), xt.clone()
    xs3[2, :2] = 100.0
    xt3[2, :2] = -100.0
    torch.testing.assert_close(relation_kl(xs3, xt3, mask, 2), base, rtol=0, atol=0)
    unpadded = relation_kl(xs[2:, 2:], xt[2:, 2:], None, 2)
    torch.testing.assert_close(base[2:, 2:], unpadded, rtol=1e-6, atol=1e-7)


def test_hooks_capture_exactly_the_projection_outputs(tiny_teacher, tiny_tokenizer):
    batch = PadCollator(tiny_tokenizer.pad_token_id)(encode_kd_pairs(tiny_tokenizer)[:3])
    with torch.no_grad(), capture_projections(tiny_teacher, [0, 1], ["q", "k", "v"]) as out:
        hs = tiny_teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    assert sorted(out) == [(layer, k) for layer in (0, 1) for k in ("k", "q", "v")]
    B, T = batch["input_ids"].shape
    for layer in (0, 1):
        block = tiny_teacher.model.layers[layer]
        with torch.no_grad():
            x = block.input_layernorm(hs[layer])  # hidden_states[l]: the input of decoder layer l (0-based)
            for kind, width in (("q", 64), ("k", 32), ("v", 32)):
                want = getattr(block.self_attn, f"{kind}_proj")(x)
                assert out[(layer, kind)].shape == (B, T, width)
                torch.testing.assert_close(out[(layer, kind)], want, rtol=1e-6, atol=1e-6)
    assert not any(m._forward_hooks for name, m in tiny_teacher.named_modules() if name.endswith("_proj"))


def _projection_inputs(model, batch, layer):
    """q/k/v of 0-based decoder ``layer``, by calling the modules on hidden_states (no hooks)."""
    hs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    ).hidden_states
    block = model.model.layers[layer]
    x = block.input_layernorm(hs[layer])
    return {k: getattr(block.self_attn, f"{k}_proj")(x) for k in "qkv"}, hs


@pytest.mark.parametrize("case", ["relation_only", "with_hidden_states"])
def test_loss_is_logit_loss_plus_weighted_relation_term(tiny_llama_pair, tmp_path, case):
    teacher, student, tok = tiny_llama_pair
    with torch.no_grad():  # sharper relations than the near-uniform ones of a fresh init: the term matters
        for name, p in [*teacher.named_parameters(), *student.named_parameters()]:
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                p.mul_(5.0)
    if case == "relation_only":
        kw = dict(relation_layers=[[1, 2]], relation_kinds=["q", "k", "v"], relation_heads=2)
        pairs, kinds, R = [(0, 1)], ["q", "k", "v"], 2
    else:
        kw = dict(
            relation_layers=[[1, 1], [-1, -1]],
            relation_kinds=["k", "v"],
            relation_heads=4,
            feature_layers=[[1, 2]],
            feature_weight=0.5,
        )
        pairs, kinds, R = [(0, 0), (0, 1)], ["k", "v"], 4
    tr = FeatureKDTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tok,
        train_dataset=kd_dataset(tok),
        args=rcfg(tmp_path, alpha=0.3, relation_weight=0.7, **kw),
    )
    batch = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:4])
    loss = tr.compute_loss(student, batch)
    valid = batch["labels"][:, 1:] != -100
    n = valid.sum()
    rel = 0.0
    for ls, lt in pairs:
        s, hs = _projection_inputs(student, batch, ls)
        with torch.no_grad():
            t, ht = _projection_inputs(teacher, batch, lt)
        for kind in kinds:
            per_row = ref_relation_kl(s[kind], t[kind], batch["attention_mask"], R)
            rel = rel + per_row[:, :-1][valid].sum() / len(kinds)
    want = kd_ref_loss(student, teacher, batch, 0.3) + 0.7 * rel / n
    if case == "with_hidden_states":
        proj = tr.projections[0].weight.double()
        d = (hs[1][:, :-1][valid].double() @ proj.T - ht[2][:, :-1][valid].double()).pow(2).mean(-1)
        want = want + 0.5 * d.sum() / n
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert (0.7 * rel / n) > 0.05  # the relation term is really there


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
            args=rcfg(path, alpha=0.2, **kw),
        )
        tr.train()
        return {k: (before[k] - v) / 0.1 for k, v in tr.model.state_dict().items()}

    big = grads(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, relation_weight=5.0)
    acc = grads(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, relation_weight=5.0)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-6)
    off = grads(tmp_path / "c", per_device_train_batch_size=8, gradient_accumulation_steps=1, relation_weight=0.0)
    q = "model.layers.0.self_attn.q_proj.weight"  # the relation term is in the accumulated gradients
    assert not torch.allclose(off[q], big[q], rtol=1e-3, atol=1e-5)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_relation_options_are_refused(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    xs, xt, mask = _inputs()
    with pytest.raises(PotstillError, match=r"R=5 must divide the student width 12 and the teacher width 8") as e:
        relation_kl(xs, xt, mask, 5)
    _one_line(e)
    with pytest.raises(PotstillError, match="feature_layers .*or relation_layers") as e:
        rcfg(tmp_path, relation_layers=None)
    _one_line(e)
    with pytest.raises(PotstillError, match="relation_heads"):
        rcfg(tmp_path, relation_heads=None)
    with pytest.raises(PotstillError, match="layer 0"):
        rcfg(tmp_path, relation_layers=[[0, 1]])
    with pytest.raises(PotstillError, match="relation_kinds"):
        rcfg(tmp_path, relation_kinds=["q", "o"])

    def build(model=student, **kw):
        return FeatureKDTrainer(
            model=model,
            teacher_model=teacher,
            processing_class=tok,
            train_dataset=kd_dataset(tok),
            args=rcfg(tmp_path, **kw),
        )

    # teacher q 64, k/v 32 (2 kv heads of 16); student q 32, k/v 16: R=3 divides none, R=32 not the student's k.
    with pytest.raises(
        PotstillError,
        match=r"relation_heads=3 does not divide the q_proj widths \(student layer 1: "
        r"32, teacher layer 2: 64\)",
    ) as e:
        build(relation_heads=3)
    _one_line(e)
    with pytest.raises(PotstillError, match=r"relation_heads=32 does not divide the k_proj widths"):
        build(relation_heads=32)
    with pytest.raises(PotstillError, match="student relation layer 2 is out of range for 1 decoder layers"):
        build(relation_layers=[[2, 1]])
    no_q = copy.deepcopy(student)
    del no_q.model.layers[0].self_attn.q_proj
    with pytest.raises(PotstillError, match=r"model\.layers\.0\.self_attn of LlamaForCausalLM has no q_proj") as e:
        build(model=no_q)
    _one_line(e)
    assert build(model=no_q, relation_kinds=["k", "v"]).relation_pairs == [(0, 1)]


@pytest.mark.parametrize(
    "feature,message",
    [
        ({}, "feature needs layers (hidden-state pairs) or relations"),
        ({"relations": {"layers": [[0, 1]], "heads": 2}}, "layer 0 is the embeddings"),
        ({"relations": {"layers": [[1, 2]]}}, "runs.0.feature.relations.heads"),
        ({"relations": {"layers": [[1, 2]], "heads": 2, "kinds": ["o"]}}, "runs.0.feature.relations.kinds"),
    ],
)
def test_bad_relation_recipes_are_refused_at_load(feature, message):
    with pytest.raises(PotstillError) as e:
        recipe_from_dict({"runs": [{"name": "f", "alpha": 0.0, "feature": feature}]})
    assert message in _one_line(e)


def test_relation_only_recipe_becomes_a_relation_config(tmp_path):
    from potstill.runners.train import kd_config

    r = recipe_from_dict(
        {
            "runs": [
                {
                    "name": "rel",
                    "alpha": 0.0,
                    "feature": {"relations": {"layers": [[1, -1]], "heads": 4, "kinds": ["q", "k"], "weight": 0.25}},
                }
            ]
        }
    )
    c = kd_config(r, r.runs[0], str(tmp_path), torch.device("cpu"))
    assert isinstance(c, FeatureKDConfig)
    assert (c.feature_layers, c.relation_layers, c.relation_kinds, c.relation_heads, c.relation_weight) == (
        [],
        [(1, -1)],
        ["q", "k"],
        4,
        0.25,
    )


def test_kl_direction_is_teacher_to_student():
    """KL(teacher || student): swapping the two arguments changes the value (guards a swapped reference)."""
    xs, xt, mask = _inputs(ws=8)
    a, b = relation_kl(xs, xt, mask, 2), relation_kl(xt, xs, mask, 2)
    # Row 1 of batch 0, two relation heads of width 4: both keys 0 and 1 are visible.
    p, q = F.softmax(xt[0, :2, :4] @ xt[0, 1, :4] / 2.0, 0), F.softmax(xs[0, :2, :4] @ xs[0, 1, :4] / 2.0, 0)
    p2, q2 = F.softmax(xt[0, :2, 4:] @ xt[0, 1, 4:] / 2.0, 0), F.softmax(xs[0, :2, 4:] @ xs[0, 1, 4:] / 2.0, 0)
    want = ((p * (p / q).log()).sum() + (p2 * (p2 / q2).log()).sum()) / 2
    torch.testing.assert_close(a[0, 1], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, b)
