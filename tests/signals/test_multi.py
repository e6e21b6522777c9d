"""MultiTeacher: mean, per-token confidence and per-example selection of teacher distributions."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.errors import PotstillError
from potstill.signals import DenseSignal, MultiTeacher, SparseSignal


class Fixed:
    """A teacher that always says the same logits (rows of the batch's targets)."""

    def __init__(self, logits):
        self.logits = torch.as_tensor(logits, dtype=torch.float32)
        self.vocab_size = self.logits.shape[-1]

    def signal(self, batch):
        return DenseSignal(logits=self.logits)


def _batch(labels):
    return {"labels": torch.tensor(labels)}


# two examples of 3 positions: targets at [0,1],[0,2],[1,1],[1,2] -> 4 rows
BATCH = _batch([[-100, 0, 1], [-100, 2, 3]])
PA = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.1, 0.1, 0.7, 0.1], [0.4, 0.3, 0.2, 0.1]])
PB = torch.tensor([[0.25] * 4, [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]])


def _probs(sig, T=1.0):
    return torch.softmax(sig.logits / T, -1)


def test_mean_is_the_weighted_average_of_distributions_at_T():
    T = 2.0
    a, b = Fixed(PA.log() * T), Fixed(PB.log() * T)  # so that softmax(logits / T) = PA, PB
    sig = MultiTeacher([a, b], mode="mean", temperature=T).signal(BATCH)
    torch.testing.assert_close(_probs(sig, T), (PA + PB) / 2, rtol=1e-5, atol=1e-6)
    sig = MultiTeacher([a, b], mode="mean", weights=[3, 1], temperature=T).signal(BATCH)
    torch.testing.assert_close(_probs(sig, T), 0.75 * PA + 0.25 * PB, rtol=1e-5, atol=1e-6)
    sig = MultiTeacher([a, b], mode="mean", weights=[1, 0], temperature=T).signal(BATCH)
    torch.testing.assert_close(_probs(sig, T), PA, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("confidence", ["entropy", "maxprob"])
def test_confidence_weights_sum_to_one_per_token_as_defined(confidence):
    sig = MultiTeacher([Fixed(PA.log()), Fixed(PB.log())], mode="confidence", confidence=confidence).signal(BATCH)
    want = []
    for pa, pb in zip(PA.tolist(), PB.tolist()):
        if confidence == "maxprob":
            ca, cb = max(pa), max(pb)
        else:
            ca = 1 + sum(x * math.log(x) for x in pa) / math.log(4)
            cb = 1 + sum(x * math.log(x) for x in pb) / math.log(4)
        wa = ca / (ca + cb)
        want.append([wa * x + (1 - wa) * y for x, y in zip(pa, pb)])
    torch.testing.assert_close(_probs(sig), torch.tensor(want), rtol=1e-5, atol=1e-6)
    # row 0: teacher B is uniform, so with entropy confidence teacher A alone is heard
    if confidence == "entropy":
        torch.testing.assert_close(_probs(sig)[0], PA[0], rtol=1e-5, atol=1e-6)


def test_select_picks_per_example_the_teacher_with_lowest_ce():
    # example 0 targets (0, 1): CE_A = -(log .7 + log .25), CE_B = -(log .25 + log .7): tie -> A (first)
    # example 1 targets (2, 3): CE_A = -(log .7 + log .1) > CE_B = -(log .1 + log .7)? equal again; make B better:
    pb = PB.clone()
    pb[3] = torch.tensor([0.05, 0.05, 0.1, 0.8])
    mt = MultiTeacher([Fixed(PA.log()), Fixed(pb.log())], mode="select")
    sig = mt.signal(BATCH)
    torch.testing.assert_close(_probs(sig)[:2], PA[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_probs(sig)[2:], pb[2:], rtol=1e-5, atol=1e-6)
    assert mt.selected_counts == [1, 1]


def test_bad_multi_teacher_setups_raise():
    a = Fixed(PA.log())
    with pytest.raises(PotstillError, match="at least 2"):
        MultiTeacher([a])
    with pytest.raises(PotstillError, match="mode"):
        MultiTeacher([a, a], mode="vote")
    with pytest.raises(PotstillError, match="different vocabularies"):
        MultiTeacher([a, Fixed(torch.zeros(4, 5))])
    with pytest.raises(PotstillError, match="weights"):
        MultiTeacher([a, a], weights=[1, -1])

    class Sparse:
        vocab_size = 4

        def signal(self, batch):
            return SparseSignal(ids=torch.zeros(4, 1, dtype=torch.long), logprobs=torch.zeros(4, 1))

    with pytest.raises(PotstillError, match="dense teachers"):
        MultiTeacher([a, Sparse()]).signal(BATCH)
