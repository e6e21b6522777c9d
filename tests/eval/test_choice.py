"""Multiple-choice scoring by log-likelihood: parity with a direct unpadded forward, both paths alike."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.errors import PotstillError
from potstill.eval.choice import choice_metrics, choice_scores


def _reference(model, prompt: list[int], choice: list[int]) -> float:
    """Summed log-likelihood of ``choice`` after ``prompt``: one unpadded float64 pass, token by token."""
    ids = torch.tensor([prompt + choice])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t, tok in enumerate(choice):
        total += float(torch.log_softmax(logits[len(prompt) + t - 1], -1)[tok])
    return total


PROMPTS = [[5, 9, 11, 14], [7, 8], [20, 21, 22, 23, 24, 25, 26]]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_single_token_choices_match_an_unpadded_reference(tiny_teacher, tiny_tokenizer, batch_size):
    choices = [[30], [31], [32]]
    got = choice_scores(tiny_teacher, PROMPTS, choices, pad_id=tiny_tokenizer.pad_token_id, batch_size=batch_size)
    ref = torch.tensor([[_reference(tiny_teacher, p, c) for c in choices] for p in PROMPTS], dtype=torch.float64)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_multi_token_choices_match_an_unpadded_reference(tiny_teacher, tiny_tokenizer):
    choices = [[30, 33], [31], [32, 34, 35]]
    got = choice_scores(tiny_teacher, PROMPTS, choices, pad_id=tiny_tokenizer.pad_token_id, batch_size=4)
    ref = torch.tensor([[_reference(tiny_teacher, p, c) for c in choices] for p in PROMPTS], dtype=torch.float64)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_the_model_is_left_in_its_training_mode(tiny_teacher, tiny_tokenizer):
    tiny_teacher.train()
    choice_scores(tiny_teacher, PROMPTS, [[30], [31]], pad_id=tiny_tokenizer.pad_token_id)
    assert tiny_teacher.training


def test_empty_choice_is_refused(tiny_teacher):
    with pytest.raises(PotstillError, match="no tokens"):
        choice_scores(tiny_teacher, PROMPTS, [[30], []], pad_id=0)


def test_choice_metrics_by_hand():
    # predictions: 0, 1, 1, 2 ; gold: 0, 1, 2, 2
    scores = torch.log(
        torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]], dtype=torch.float64)
    )
    m = choice_metrics(scores, [0, 1, 2, 2])
    assert m["accuracy"] == 0.75
    # F1: class 0 = 1, class 1 = 2*1/(2+1+0) = 2/3, class 2 = 2*1/(2+0+1) = 2/3
    assert math.isclose(m["macro_f1"], (1 + 2 / 3 + 2 / 3) / 3)
    assert m["predicted"] == [1, 2, 1]
