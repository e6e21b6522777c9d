"""Closed forms and hand-computed cases for the pure eval metrics."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.eval.metrics import (
    count_parameters,
    distinct_n,
    expected_calibration_error,
    perplexity,
    rouge_l,
    teacher_forced_stats,
)


def test_identical_logits_give_zero_kl_and_full_agreement():
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(7) % 11
    stats = teacher_forced_stats(logits, logits.clone(), targets)
    assert stats["n"] == 7
    assert stats["agree"] == 7
    assert abs(stats["kl_sum"]) < 1e-6
    assert isinstance(stats["kl_sum"], float) and isinstance(stats["agree"], int)


def test_kl_and_nll_two_outcome_hand_case():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    stats = teacher_forced_stats(student, teacher, torch.tensor([0]))
    # KL(p||q) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    assert stats["kl_sum"] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert stats["nll_sum"] == pytest.approx(-math.log(0.25), abs=1e-6)
    assert stats["agree"] == 0  # teacher argmax is 0 (tie -> first), student's is 1


def test_agreement_counts_argmax_matches():
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    assert teacher_forced_stats(student, teacher, torch.zeros(3, dtype=torch.long))["agree"] == 2


def test_bf16_logits_are_promoted():
    logits = torch.randn(4, 9).to(torch.bfloat16)
    stats = teacher_forced_stats(logits, logits, torch.zeros(4, dtype=torch.long))
    assert abs(stats["kl_sum"]) < 1e-6


def test_empty_positions_and_shape_mismatch():
    empty = torch.zeros(0, 5)
    assert teacher_forced_stats(empty, empty, torch.zeros(0, dtype=torch.long))["n"] == 0
    with pytest.raises(ValueError, match="align"):
        teacher_forced_stats(torch.zeros(2, 5), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))


def test_perplexity_of_uniform_model_is_vocab_size():
    V, n = 37, 13
    stats = teacher_forced_stats(torch.zeros(n, V), torch.zeros(n, V), torch.randint(0, V, (n,)))
    assert perplexity(stats["nll_sum"], stats["n"]) == pytest.approx(V, rel=1e-5)


def test_perplexity_edge_cases():
    assert math.isnan(perplexity(0.0, 0))
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e6, 1) == float("inf")


def test_rouge_l():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    # LCS("the cat on mat", "the cat sat on the mat") = 4: P = 4/4, R = 4/6, F1 = 0.8
    assert rouge_l(["the cat on mat"], ["the cat sat on the mat"]) == pytest.approx(0.8)
    # mean over pairs
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    assert math.isnan(rouge_l([], []))
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_distinct_n_hand_cases():
    # "a b a b" + "a c": unigrams a b a b a c -> 3 distinct of 6; bigrams ab ba ab ac -> 3 of 4
    assert distinct_n(["a b a b", "A c"], 1) == pytest.approx(3 / 6)
    assert distinct_n(["a b a b", "A c"], 2) == pytest.approx(3 / 4)
    # a collapsed model: the same answer everywhere is 1 / number of answers
    assert distinct_n(["yes it is"] * 4, 2) == pytest.approx(1 / 4)
    assert distinct_n(["one two three"], 3) == 1.0
    assert math.isnan(distinct_n(["", "solo"], 2)) and math.isnan(distinct_n([], 1))
    with pytest.raises(ValueError, match="n=0"):
        distinct_n(["a"], 0)


def test_count_parameters_counts_tied_weights_once():
    lin = torch.nn.Linear(3, 4)
    assert count_parameters(lin) == 16
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert count_parameters(model) == 40
    emb.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 0


def test_ece_perfectly_calibrated_bins_is_zero():
    # bin (0.7, 0.8]: confidence 0.75, 3 of 4 right; bin (0.2, 0.3]: 0.25, 1 of 4 right
    probs = [0.75] * 4 + [0.25] * 4
    correct = [1, 1, 1, 0] + [0, 1, 0, 0]
    assert expected_calibration_error(probs, correct, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(torch.ones(5), torch.ones(5, dtype=torch.bool)) == pytest.approx(0.0)


def test_ece_hand_computed():
    # bin (0.8, 0.9]: conf 0.85, acc 0.5, weight 2/4 -> 0.175
    # bin (0.5, 0.6]: conf 0.55, acc 1.0, weight 2/4 -> 0.225
    probs = torch.tensor([0.85, 0.85, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(probs, correct, n_bins=10) == pytest.approx(0.4)
    # one bin: |mean acc - mean conf| = |0.75 - 0.7|
    assert expected_calibration_error(probs, correct, n_bins=1) == pytest.approx(0.05)


def test_ece_edges():
    assert math.isnan(expected_calibration_error([], []))
    # confidence 0 goes to the first bin; a wrong answer at confidence 0 is calibrated
    assert expected_calibration_error([0.0], [0]) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])
