"""The evaluation protocol for distilled sets (potstill.dd.protocol): split learner, training, aggregation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from helpers import AB_WORDS, ab_word_tokenizer, dd_bert, dd_tokenizer, dd_toy_examples
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from potstill.data.classification import Example
from potstill.dd.condense import init_condensed
from potstill.dd.protocol import (
    Features,
    SplitLearner,
    compare_arms,
    evaluate_set,
    mean_std,
    train_top,
)
from potstill.errors import PotstillError

V, H = len(AB_WORDS), 16  # one toy vocabulary with tests/dd/test_condense.py


pytestmark = pytest.mark.usefixtures("one_thread")


def sentences(n: int, seed: int) -> list[Example]:
    """Class 0 draws words a*, class 1 words b*, 30 % of words from either; 2..6 words a sentence."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.randrange(2)
        words = [
            (f"{'ab'[y]}{rng.randrange(20)}" if rng.random() > 0.3 else f"{rng.choice('ab')}{rng.randrange(20)}")
            for _ in range(rng.randint(2, 6))
        ]
        out.append(Example(" ".join(words), y))
    return out


class WordPrefix(nn.Module):
    """Frozen word-embedding lookup: ``input_ids`` -> rows, ``inputs_embeds`` pass through."""

    def __init__(self, E):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(E, freeze=True)

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None):
        return self.emb(input_ids) if inputs_embeds is None else inputs_embeds


class Top(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layer = nn.Linear(H, H)
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(H, 2)

    def forward(self, inputs_embeds, attention_mask):
        h = torch.tanh(self.layer(self.drop(inputs_embeds)))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def tiny_learner() -> SplitLearner:
    g = torch.Generator().manual_seed(0)
    E = torch.randn(V, H, generator=g)
    mu = torch.randn(H, generator=g)
    E[4:24] += mu
    E[24:] -= mu
    return SplitLearner(WordPrefix(E), Top, tokenizer=ab_word_tokenizer(), embedding_matrix=E, max_length=16)


TRAIN = {"steps": 40, "lr": 3e-2, "batch_size": 8}


def test_soft_one_hot_labels_reproduce_hard_label_training_exactly():
    learner = tiny_learner()
    train, dev = sentences(24, seed=1), sentences(200, seed=2)
    ev = learner.features(dev)
    hard = evaluate_set(train, learner=learner, eval_examples=ev, seed=3, labels="hard", return_model=True, **TRAIN)
    onehot = torch.nn.functional.one_hot(torch.tensor([e.label for e in train]), 2).float()
    soft = evaluate_set(
        train, learner=learner, eval_examples=ev, seed=3, labels="soft", soft_labels=onehot, return_model=True, **TRAIN
    )
    assert hard["accuracy"] > 0.8 and hard["n"] == 200 and hard["n_train"] == 24
    assert soft["accuracy"] == hard["accuracy"]
    for (n, a), (_, b) in zip(hard["model"].named_parameters(), soft["model"].named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    # the soft targets are really used: flipped one-hot labels teach the opposite classifier
    flipped = evaluate_set(
        train, learner=learner, eval_examples=ev, seed=3, labels="soft", soft_labels=1 - onehot, **TRAIN
    )
    assert flipped["accuracy"] < 0.3
    # and a different seed gives a different learner (the seed reaches init, batches and dropout)
    other = evaluate_set(train, learner=learner, eval_examples=ev, seed=4, labels="hard", return_model=True, **TRAIN)
    assert not torch.allclose(other["model"].head.weight, hard["model"].head.weight)


def test_per_example_scores_are_the_held_out_examples_own():
    """``per_example``: each held-out example's 0/1 correctness (their mean is the accuracy) and the negative
    log-probability of its gold class, recomputed here from the returned learner's logits."""
    learner = tiny_learner()
    train, dev = sentences(24, seed=1), sentences(60, seed=2)
    ev = learner.features(dev)
    r = evaluate_set(train, learner=learner, eval_examples=ev, seed=3, return_model=True, per_example=True, **TRAIN)
    with torch.no_grad():
        logp = r["model"].eval()(inputs_embeds=ev.hidden, attention_mask=ev.mask).double().log_softmax(-1)
    gold = ev.labels
    scores = r["per_example"]
    assert len(scores["accuracy"]) == len(scores["nll"]) == 60
    assert scores["accuracy"] == (logp.argmax(-1) == gold).double().tolist()
    assert sum(scores["accuracy"]) / 60 == pytest.approx(r["accuracy"])
    torch.testing.assert_close(
        torch.tensor(scores["nll"], dtype=torch.float64), -logp[torch.arange(60), gold], rtol=1e-5, atol=1e-6
    )
    assert "per_example" not in evaluate_set(train, learner=learner, eval_examples=ev, seed=3, **TRAIN)


def test_teacher_soft_labels_run_and_eval_text_equals_eval_features():
    learner = tiny_learner()
    train, dev = sentences(24, seed=1), sentences(100, seed=2)
    probs = torch.softmax(torch.randn(24, 2, generator=torch.Generator().manual_seed(0)), -1)
    a = evaluate_set(train, learner=learner, eval_examples=dev, seed=0, labels="soft", soft_labels=probs, **TRAIN)
    b = evaluate_set(
        train, learner=learner, eval_examples=learner.features(dev), seed=0, labels="soft", soft_labels=probs, **TRAIN
    )
    assert a["accuracy"] == b["accuracy"] and a["labels"] == "soft"
    assert set(a) >= {"accuracy", "f1", "macro_f1", "ece", "n", "train_s", "final_loss"}


def test_condensed_set_at_token_rows_trains_like_its_text():
    """A condensed set not yet optimized *is* its text in embedding space: same learner, same result."""
    learner = tiny_learner()
    pool, dev = sentences(60, seed=1), sentences(100, seed=2)
    cs = init_condensed(pool, 5, learner.tokenizer, learner.embedding_matrix, max_length=16, seed=0)
    texts = [Example(t, int(c)) for t, c in zip(cs.meta["init_texts"], cs.classes)]
    ev = learner.features(dev)
    a = evaluate_set(cs, learner=learner, eval_examples=ev, seed=1, return_model=True, **TRAIN)
    b = evaluate_set(texts, learner=learner, eval_examples=ev, seed=1, return_model=True, **TRAIN)
    assert a["accuracy"] == b["accuracy"]
    assert torch.allclose(a["model"].head.weight, b["model"].head.weight, atol=1e-6)
    # labels="soft" on a condensed set defaults to its own learned soft labels
    c = evaluate_set(cs, learner=learner, eval_examples=ev, seed=1, labels="soft", **TRAIN)
    d = evaluate_set(
        cs, learner=learner, eval_examples=ev, seed=1, labels="soft", soft_labels=cs.soft_labels(), **TRAIN
    )
    assert c["accuracy"] == d["accuracy"]


def test_evaluate_set_rejects_bad_labels():
    learner = tiny_learner()
    train, dev = sentences(8, seed=1), sentences(10, seed=2)
    with pytest.raises(PotstillError):
        evaluate_set(train, learner=learner, eval_examples=dev, labels="soft", **TRAIN)
    with pytest.raises(PotstillError):
        evaluate_set(
            train, learner=learner, eval_examples=dev, labels="soft", soft_labels=torch.ones(3, 2) / 2, **TRAIN
        )
    with pytest.raises(PotstillError):
        evaluate_set(train, learner=learner, eval_examples=dev, labels="soft", soft_labels=torch.ones(8, 2), **TRAIN)
    with pytest.raises(PotstillError):
        evaluate_set(train, learner=learner, eval_examples=dev, labels="teacher", **TRAIN)


def test_split_classifier_equals_the_whole_classifier():
    """prefix + top (any cut) computes exactly what TextClassifier computes, with padding."""
    from transformers import BertConfig, BertModel

    from potstill.models.classifier import TextClassifier

    tok = ab_word_tokenizer()
    cfg = BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = TextClassifier(BertModel(cfg, add_pooling_layer=False), tok, 2, seed=0).eval()
    texts = ["a1 a2 a3 b4", "b1", "a5 b6 b7"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(enc["input_ids"], enc["attention_mask"]).logits
    for k in (0, 1, 3):
        learner = SplitLearner.from_classifier(model, trainable_layers=k, max_length=16)
        top = learner.new_top(0).eval()
        top.head.load_state_dict(model.head.state_dict())
        feats = learner.features([Example(t, 0) for t in texts])
        with torch.no_grad():
            got = top(inputs_embeds=feats.hidden, attention_mask=feats.mask)
            whole = learner.composite(top)(enc["input_ids"], enc["attention_mask"])
        assert torch.allclose(got, want, atol=1e-5), k
        assert torch.allclose(whole, want, atol=1e-5), k
        assert sum(p.numel() for p in top.parameters()) > 0
        assert all(not p.requires_grad for p in learner.prefix.parameters())
    with pytest.raises(PotstillError):
        SplitLearner.from_classifier(model, trainable_layers=4)


def test_compare_arms_mean_std_delta_and_time():
    res = {"random": [{"accuracy": 0.5}, {"accuracy": 0.6}, {"accuracy": 0.7}], "ours": [0.8, 0.9], "one": [0.65]}
    out = compare_arms(res, construction_s={"ours": [2.0, 4.0]})
    assert out["random"]["mean"] == pytest.approx(0.6) and out["random"]["std"] == pytest.approx(0.1)
    assert out["ours"]["mean"] == pytest.approx(0.85) and out["ours"]["std"] == pytest.approx(math.sqrt(0.005))
    assert out["ours"]["delta_vs_baseline"] == pytest.approx(0.25)
    assert out["ours"]["delta_se"] == pytest.approx(math.sqrt(0.005 / 2 + 0.01 / 3))
    assert out["random"]["delta_vs_baseline"] == pytest.approx(0.0)
    assert out["one"]["std"] == 0.0 and out["one"]["n"] == 1
    assert out["ours"]["construction_s"] == pytest.approx(3.0) and out["random"]["construction_s"] is None
    nobase = compare_arms({"x": [1.0, 3.0]})
    assert nobase["x"]["delta_vs_baseline"] is None and nobase["x"]["std"] == pytest.approx(math.sqrt(2.0))
    empty = mean_std([])  # no values: (nan, nan); checked per value, as a shared math.nan compares equal by identity
    assert len(empty) == 2 and all(math.isnan(v) for v in empty)
    with pytest.raises(PotstillError):
        compare_arms({"empty": []})


def test_features_subset_trims_padding():
    f = Features(
        torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1),
        torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]),
        torch.tensor([0, 1]),
    )
    s = f.subset([0])
    assert s.hidden.shape == (1, 2, 1) and s.mask.tolist() == [[1, 1]] and s.labels.tolist() == [0]


# ----------------------------------------------------------------------------- learning-rate schedule


def _stepped_lrs(schedule: str | None, steps: int = 40, lr: float = 3e-2) -> tuple[list[float], list[float]]:
    """``(losses, lr of every optimizer step)`` of one training run on the toy (both param groups checked)."""
    learner = tiny_learner()
    feats = learner.features(sentences(24, seed=1))
    lrs: list[float] = []

    def record(opt, args, kwargs):
        group_lrs = {g["lr"] for g in opt.param_groups}
        assert len(group_lrs) == 1  # decayed and undecayed groups move together
        lrs.append(group_lrs.pop())

    handle = register_optimizer_step_pre_hook(record)
    try:
        kw = {} if schedule is None else {"schedule": schedule}
        losses = train_top(learner.new_top(3), feats, steps=steps, lr=lr, batch_size=8, seed=3, **kw)
    finally:
        handle.remove()
    assert len(lrs) == steps
    return losses, lrs


def test_cosine_schedule_steps_through_transformers_closed_form():
    """lr_k = lr * k / w for k < w, then lr * (1 + cos(pi (k - w) / (S - w))) / 2 (transformers'
    get_cosine_schedule_with_warmup), w = int(0.1 S); written out here, not taken from the code."""
    steps, lr, w = 40, 3e-2, 4
    _, lrs = _stepped_lrs("cosine", steps, lr)
    for k in (0, 1, 3, 4, 10, 22, 30, 39):
        want = lr * k / w if k < w else lr * 0.5 * (1 + math.cos(math.pi * (k - w) / (steps - w)))
        assert lrs[k] == pytest.approx(want, rel=1e-9, abs=1e-12), k
    # not the linear schedule: it starts at lr / w and is lower than the cosine in the first half of the decay
    assert lrs[0] == 0.0 and lrs[13] > lr * (steps - 13) / (steps - w) + 1e-3


def test_linear_schedule_is_the_default_and_unchanged():
    """schedule="linear" is the default and trains exactly as before the option existed: the same
    losses (recorded from the code of commit 08e0780, tiny toy, seed 3) and lr_k = lr (k + 1) / w,
    then lr (S - k) / (S - w)."""
    steps, lr, w = 40, 3e-2, 4
    default, lrs_default = _stepped_lrs(None, steps, lr)
    linear, lrs = _stepped_lrs("linear", steps, lr)
    assert linear == default and lrs == lrs_default
    for k in (0, 3, 4, 20, 39):
        want = lr * (k + 1) / w if k < w else lr * (steps - k) / (steps - w)
        assert lrs[k] == pytest.approx(want, rel=1e-9), k
    before = {0: 0.7210015058517456, 1: 0.7089558839797974, 2: 0.6292272210121155, 10: 0.2768372893333435}
    for k, v in before.items():
        assert linear[k] == pytest.approx(v, rel=1e-4), k
    cosine, _ = _stepped_lrs("cosine", steps, lr)
    assert cosine != linear
    with pytest.raises(PotstillError, match="schedule='step'"):
        _stepped_lrs("step")


def test_eval_data_recipe_schedule_reaches_every_learner(tmp_path, monkeypatch):
    """learner.schedule validates (linear, cosine; default linear), a bad value is refused naming the key,
    and eval-data hands it to every learner and writes it into the report's protocol."""
    import potstill.runners.common as cr
    import potstill.runners.eval_data as ed
    from potstill.recipes.eval_data import load_eval_data_recipe

    rows = dd_toy_examples(8, 3)
    (tmp_path / "set.jsonl").write_text("".join(f'{{"sentence": "{e.text}", "label": {e.label}}}\n' for e in rows))
    data = {
        "dataset": "sst2",
        "output_dir": str(tmp_path / "out"),
        "data": {"pool_size": 40, "eval_size": 20},
        "learner": {"encoder": "tiny", "max_length": 16, "steps": 3, "lr": 1e-3, "batch_size": 4, "seeds": 1},
        "labels": ["hard"],
        "baselines": ["random"],
        "sets": [{"name": "s", "path": str(tmp_path / "set.jsonl"), "format": "jsonl"}],
    }
    assert load_eval_data_recipe(data).learner.schedule == "linear"
    shipped = load_eval_data_recipe(Path(__file__).resolve().parents[2] / "recipes" / "eval_data_sst2_finetune.yaml")
    lc = shipped.learner
    assert (lc.trainable_layers, lc.steps, lc.lr, lc.batch_size, lc.schedule) == (6, 200, 1e-4, 16, "cosine")
    with pytest.raises(PotstillError, match="learner.schedule") as err:
        load_eval_data_recipe(data, ["learner.schedule=step"])
    assert "\n" not in str(err.value)
    recipe = load_eval_data_recipe(data, ["learner.schedule=cosine", "learner.trainable_layers=2"])
    assert recipe.learner.schedule == "cosine"

    tok = dd_tokenizer()
    monkeypatch.setattr(cr, "load_encoder", lambda name: (dd_bert(tok, seed=1), tok))
    monkeypatch.setattr(cr, "load_sst2", lambda split="train", path=None: dd_toy_examples(40, int(split != "train")))
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("schedule"))
        return evaluate_set(*args, **kwargs)

    monkeypatch.setattr(ed, "evaluate_set", spy)
    report = ed.run_eval_data(recipe)
    assert report["protocol"]["schedule"] == "cosine" and report["recipe"]["learner"]["schedule"] == "cosine"
    assert seen == ["cosine", "cosine"]  # the set and the random baseline, one seed each
