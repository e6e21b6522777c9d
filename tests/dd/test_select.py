"""Data selection: IFD variants, token statistics against direct logits, KD scores from live
models and from signals (dense, top-k, the on-disk cache), filters with reasons."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from potstill.data import encode_example
from potstill.dd.kd_scores import confident_teacher_unsure_student, kd_divergence_score, kd_stats
from potstill.dd.select import (
    IFD_ABOVE_ONE,
    Dropped,
    apply_filters,
    drop_ifd_above_one,
    example_stats,
    filter_stream,
    ifd_loss_ratio,
    ifd_ppl_ratio,
    keep_indices,
    perplexity_score,
    reason_key,
    response_only_example,
    score_threshold,
    top_k,
)
from potstill.errors import PotstillError
from potstill.signals import DenseSignal, SparseSignal, target_index

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night, so we walk to the park."),
    ("How many days are in a week?", "Seven."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Translate hello into Spanish:", "hola"),
]


def encoded(tok):
    out = []
    for i, (p, r) in enumerate(PAIRS):
        ex = encode_example(tok, [{"role": "user", "content": p}], r, 128)
        ex["example_id"] = i
        out.append(ex)
    return out


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """Full logits of one unpadded sequence, float64: ``[T, V]``."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def target_rows_ref(model, ex) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, V], targets [n]) of one example's response tokens, computed alone."""
    z = logits_of(model, ex["input_ids"])[:-1]
    y = torch.tensor(ex["labels"][1:])
    keep = y != -100
    return z[keep], y[keep]


# ------------------------------------------------------------------------ pure IFD maths


def test_ifd_loss_ratio_and_ppl_ratio_rank_differently():
    # L(A|Q), L(A): ratios 0.5, 0.4, 1.5; differences -2.0, -0.6, +1.0
    stats = {"nll_given_prompt": torch.tensor([2.0, 0.4, 3.0]), "nll_response_only": torch.tensor([4.0, 1.0, 2.0])}
    loss = ifd_loss_ratio(stats)
    ppl = ifd_ppl_ratio(stats)
    assert torch.allclose(loss, torch.tensor([0.5, 0.4, 1.5], dtype=torch.float64))
    assert torch.allclose(ppl, torch.tensor([math.exp(-2.0), math.exp(-0.6), math.exp(1.0)], dtype=torch.float64))
    # The most instruction-helped example differs: #1 by the loss ratio, #0 by the perplexity ratio.
    assert int(loss.argmin()) == 1 and int(ppl.argmin()) == 0
    # Both agree on the side of 1, so Cherry's "IFD > 1" filter drops #2 under either name.
    for ifd, name in ((loss, "ifd_loss_ratio"), (ppl, "ifd_ppl_ratio")):
        sel = apply_filters(["a", "b", "c"], [drop_ifd_above_one(ifd, name=name)])
        assert sel.kept_index == [0, 1]
        assert sel.dropped[0].index == 2 and sel.dropped[0].key == IFD_ABOVE_ONE
        assert f"{name}=" in sel.dropped[0].reason
    assert torch.allclose(perplexity_score(stats), torch.exp(stats["nll_given_prompt"].double()))
    assert torch.allclose(perplexity_score(stats, "nll_response_only"), torch.exp(stats["nll_response_only"].double()))


def test_ifd_errors():
    with pytest.raises(PotstillError, match="nll_response_only"):
        ifd_loss_ratio({"nll_given_prompt": torch.ones(2)})
    with pytest.raises(PotstillError, match="non-finite"):
        ifd_ppl_ratio({"nll_given_prompt": torch.tensor([1.0, float("nan")]), "nll_response_only": torch.ones(2)})
    with pytest.raises(PotstillError, match="undefined"):
        ifd_loss_ratio({"nll_given_prompt": torch.ones(2), "nll_response_only": torch.tensor([1.0, 0.0])})
    with pytest.raises(PotstillError, match="empty"):
        ifd_loss_ratio({"nll_given_prompt": torch.ones(0), "nll_response_only": torch.ones(0)})


# ----------------------------------------------------------------------- token statistics


def test_example_stats_match_hand_computed_nll(tiny_student, tiny_tokenizer):
    exs = encoded(tiny_tokenizer)
    bos = tiny_tokenizer.bos_token_id
    stats = example_stats(tiny_student, exs, batch_size=4, chunk_size=7)
    for i, ex in enumerate(exs):
        z, y = target_rows_ref(tiny_student, ex)
        lp = F.log_softmax(z, -1)
        want_nll = -lp[torch.arange(len(y)), y].mean()
        want_h = -(lp.exp() * lp).sum(-1).mean()
        # response alone, after BOS: [bos] + A, every token of A predicted
        a = y.tolist()
        za = logits_of(tiny_student, [bos] + a)[:-1]
        want_alone = F.cross_entropy(za, torch.tensor(a))
        assert stats["num_response_tokens"][i] == len(a)
        assert stats["nll_given_prompt"][i].item() == pytest.approx(want_nll.item(), abs=1e-5)
        assert stats["entropy_given_prompt"][i].item() == pytest.approx(want_h.item(), abs=1e-5)
        assert stats["nll_response_only"][i].item() == pytest.approx(want_alone.item(), abs=1e-5)
    # batch composition and padding do not change anything; an explicit response_only gives the same
    one = example_stats(tiny_student, exs, batch_size=1)
    given = example_stats(tiny_student, exs, batch_size=3, response_only=[response_only_example(e, bos) for e in exs])
    for k in stats:
        assert torch.allclose(stats[k].double(), one[k].double(), atol=1e-5), k
        assert torch.allclose(stats[k].double(), given[k].double(), atol=1e-5), k
    assert tiny_student.training is False


def test_example_stats_errors(tiny_student, tiny_tokenizer):
    exs = encoded(tiny_tokenizer)
    with pytest.raises(PotstillError, match="empty"):
        example_stats(tiny_student, [])
    bad = dict(exs[0], labels=[-100] * len(exs[0]["labels"]))
    with pytest.raises(PotstillError, match="#1 has no response token"):
        example_stats(tiny_student, [exs[0], bad])
    with pytest.raises(PotstillError, match="one per example"):
        example_stats(tiny_student, exs, response_only=exs[:2])
    tiny_student.config.bos_token_id = None
    with pytest.raises(PotstillError, match="start_token_id"):
        example_stats(tiny_student, exs)


# ----------------------------------------------------------------------------- KD scores


class RowSource:
    """A signal source built from independently computed per-example teacher logits (float64,
    full ``model(...).logits``), optionally perturbed for one example; checks row alignment by
    ``example_id``."""

    def __init__(self, model, exs, perturb: dict[int, float] | None = None, sparse_k: int | None = None):
        self.rows = {}
        for i, ex in enumerate(exs):
            z, _ = target_rows_ref(model, ex)
            if perturb and i in perturb:
                z = z.clone()
                z[:, 5] += perturb[i]  # the teacher puts (almost) all mass on token 5 here
            self.rows[i] = z
        self.sparse_k = sparse_k
        self.calls = 0

    def signal(self, batch):
        self.calls += 1
        z = torch.cat([self.rows[int(i)] for i in batch["example_id"]]).float()
        assert z.shape[0] == len(target_index(batch["labels"]))
        if self.sparse_k is None:
            return DenseSignal(logits=z)
        lp = torch.log_softmax(z, -1)
        vals, ids = lp.topk(self.sparse_k, -1)
        return SparseSignal(ids=ids, logprobs=vals, tail="bucket")


def test_kd_divergence_is_zero_for_identical_models(tiny_student, tiny_tokenizer):
    exs = encoded(tiny_tokenizer)
    teacher = type(tiny_student)(tiny_student.config)
    teacher.load_state_dict(tiny_student.state_dict())
    for name in ("forward_kl", "reverse_kl", "total_variation", "generalized_jsd"):
        d = kd_divergence_score(tiny_student, teacher.eval(), exs, divergence=name, batch_size=4)
        assert d.shape == (len(exs),)
        assert torch.allclose(d, torch.zeros_like(d), atol=1e-6), name


def test_kd_divergence_ranks_constructed_disagreement_first(tiny_student, tiny_tokenizer):
    exs = encoded(tiny_tokenizer)
    src = RowSource(tiny_student, exs, perturb={3: 30.0})
    d = kd_divergence_score(tiny_student, src, exs, batch_size=4, chunk_size=5)
    assert int(d.argmax()) == 3
    others = torch.cat([d[:3], d[4:]])
    assert torch.allclose(others, torch.zeros_like(others), atol=1e-5)
    # by hand for #3: forward KL of the perturbed teacher from the student, averaged over tokens
    z, _ = target_rows_ref(tiny_student, exs[3])
    zt = z.clone()
    zt[:, 5] += 30.0
    want = F.kl_div(F.log_softmax(z, -1), F.log_softmax(zt, -1), log_target=True, reduction="none").sum(-1).mean()
    assert d[3].item() == pytest.approx(want.item(), rel=1e-4)


def test_kd_scores_from_signal_equal_live_teacher(tiny_llama_pair):
    teacher, student, tok = tiny_llama_pair
    exs = encoded(tok)
    src = RowSource(teacher, exs)
    live = kd_stats(student, teacher, exs, batch_size=4, temperature=2.0)
    dense = kd_stats(student, src, exs, batch_size=3, temperature=2.0)
    for k in ("divergence", "teacher_entropy", "student_entropy", "confident_teacher_unsure_student"):
        assert torch.allclose(live[k], dense[k], atol=1e-5, rtol=1e-4), k
    # top-k with k = V: the tail bucket is empty, so the sparse path equals the dense one
    # (at T=1: the source's log-probs are taken at T=1)
    live1 = kd_stats(student, teacher, exs, batch_size=4)
    src.sparse_k = len(tok)
    full1 = kd_stats(student, src, exs, batch_size=2)
    for k in ("divergence", "teacher_entropy", "confident_teacher_unsure_student"):
        assert torch.allclose(live1[k], full1[k], atol=1e-5, rtol=1e-4), k
    # a real top-k (k=8) bucket is a coarsening: divergence and entropy can only shrink
    src.sparse_k = 8
    small = kd_stats(student, src, exs, batch_size=2)
    assert bool((small["divergence"] <= live1["divergence"] + 1e-6).all())
    assert bool((small["teacher_entropy"] <= live1["teacher_entropy"] + 1e-6).all())
    assert bool((small["divergence"] < live1["divergence"]).any())


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_kd_scores_reuse_the_kd_cache(tmp_path, tiny_llama_pair, kind):
    """One teacher pass (the cache written for KD) also scores the data: no teacher in memory."""
    from potstill.signals.cache import CachedSignal, CacheSpec, write_cache

    teacher, student, tok = tiny_llama_pair
    exs = encoded(tok)
    spec = CacheSpec(kind=kind, k=len(tok), dtype="fp32", examples_per_shard=4)
    write_cache(teacher, tok, exs, tmp_path, spec, progress=False)
    cached = kd_stats(student, CachedSignal(tmp_path), exs, batch_size=4)
    live = kd_stats(student, teacher, exs, batch_size=4)
    for k in ("divergence", "teacher_entropy", "confident_teacher_unsure_student"):
        assert torch.allclose(cached[k], live[k], atol=1e-4, rtol=1e-4), k
    # without example ids the cache finds examples by content hash
    no_ids = [{k: v for k, v in e.items() if k != "example_id"} for e in exs]
    again = kd_stats(student, CachedSignal(tmp_path), no_ids, batch_size=5)
    assert torch.allclose(again["divergence"], cached["divergence"], atol=1e-6)


def test_confident_teacher_unsure_student_closed_forms(tiny_student, tiny_tokenizer):
    exs = encoded(tiny_tokenizer)
    V = len(tiny_tokenizer)

    class Uniform:
        def signal(self, batch):
            return DenseSignal(logits=torch.zeros(len(target_index(batch["labels"])), V))

    # a uniform teacher is never confident: the score is exactly 0
    u = confident_teacher_unsure_student(tiny_student, Uniform(), exs)
    assert torch.allclose(u, torch.zeros_like(u), atol=1e-6)
    # a teacher sure of one token on example #2 only ranks #2 first; value by hand
    src = RowSource(tiny_student, exs, perturb={2: 60.0})
    s = kd_stats(tiny_student, src, exs, batch_size=4)
    c = s["confident_teacher_unsure_student"]
    assert int(c.argmax()) == 2
    z, _ = target_rows_ref(tiny_student, exs[2])
    zt = z.clone()
    zt[:, 5] += 60.0
    lt, ls = F.log_softmax(zt, -1), F.log_softmax(z, -1)
    ht, hs = -(lt.exp() * lt).sum(-1), -(ls.exp() * ls).sum(-1)
    want = ((1 - ht / math.log(V)) * (hs / math.log(V))).mean()
    assert c[2].item() == pytest.approx(want.item(), rel=1e-4)
    assert bool(((c >= 0) & (c <= 1)).all())


def test_kd_score_errors(tiny_llama_pair, tmp_path):
    from potstill.signals.cache import CachedSignal, CacheSpec, write_cache

    teacher, student, tok = tiny_llama_pair
    exs = encoded(tok)
    with pytest.raises(PotstillError, match="unknown divergence"):
        kd_divergence_score(student, teacher, exs, divergence="kl")
    with pytest.raises(PotstillError, match="empty"):
        kd_divergence_score(student, teacher, [])
    with pytest.raises(PotstillError, match="signal source"):
        kd_divergence_score(student, object(), exs)
    write_cache(teacher, tok, exs, tmp_path, CacheSpec(kind="topk", k=4, temperature=2.0), progress=False)
    with pytest.raises(PotstillError, match="temperature 2.0"):
        kd_divergence_score(student, CachedSignal(tmp_path), exs)


# --------------------------------------------------------------------------------- filters


def test_filters_carry_reasons_and_report_adds_up():
    examples = [f"ex{i}" for i in range(10)]

    def odd(example, index):
        return True if index % 2 == 0 else (False, f"odd index (#{index})")

    def not_four(example, index):
        return True if index != 4 else (False, "four (is unlucky)")

    calls = []

    def spy(example, index):
        calls.append(index)
        return True

    sel = apply_filters(examples, [odd, not_four, spy])
    kept, dropped = sel  # unpacks
    assert kept == ["ex0", "ex2", "ex6", "ex8"] and sel.kept_index == [0, 2, 6, 8]
    assert [d.index for d in dropped] == [1, 3, 4, 5, 7, 9]
    assert all(isinstance(d, Dropped) and d.reason for d in dropped)
    assert dropped[0].reason == "odd index (#1)" and dropped[0].example == "ex1"
    assert sel.report.dropped == {"odd index": 5, "four": 1}
    assert sel.report.total == 10 and sel.report.kept + sel.report.num_dropped == 10
    assert calls == [0, 2, 6, 8]  # later filters never see dropped examples
    assert str(sel.report) == "kept 4 of 10; dropped 6 (odd index: 5, four: 1)"
    # the stream is lazy
    stream = filter_stream(iter(examples), [odd])
    assert next(stream) == (0, "ex0", None) and next(stream) == (1, "ex1", "odd index (#1)")
    assert reason_key("near-duplicate (of #3, jaccard~0.91)") == "near-duplicate"


def test_filter_must_name_its_reason():
    with pytest.raises(PotstillError, match=r"\(False, 'reason'\)"):
        apply_filters(["a"], [lambda e, i: False])
    with pytest.raises(PotstillError, match="returned"):
        apply_filters(["a"], [lambda e, i: (False, "")])


def test_top_k_and_thresholds():
    s = torch.tensor([0.3, 0.9, 0.5, 0.9, 0.1])
    sel = apply_filters(list("abcde"), [top_k(s, 2, name="ifd_loss_ratio")])
    assert sel.kept_index == [1, 3]
    assert {d.index for d in sel.dropped} == {0, 2, 4}
    assert sel.dropped[0].reason == "score below cut (ifd_loss_ratio=0.3 < 0.9)"
    assert sel.report.dropped == {"score below cut": 3}
    # ties at the cut go to the lower index; smallest; fraction
    assert apply_filters(list("abcde"), [top_k(s, 1)]).kept_index == [1]
    low = apply_filters(list("abcde"), [top_k(s, 2, largest=False)])
    assert low.kept_index == [0, 4] and low.dropped[0].key == "score above cut"
    assert apply_filters(list("abcde"), [top_k(s, fraction=0.5)]).kept_index == [1, 2, 3]
    th = apply_filters(list("abcde"), [score_threshold(s, min=0.2, max=0.6, name="ppl")])
    assert th.kept_index == [0, 2]
    assert th.report.dropped == {"ppl above 0.6": 2, "ppl below 0.2": 1}
    picked = apply_filters(list("abcde"), [keep_indices(torch.tensor([4, 0]), {2: "too close (#0)"})])
    assert picked.kept_index == [0, 4] and picked.report.dropped == {"not selected": 2, "too close": 1}


def test_selection_errors():
    s = torch.tensor([0.3, 0.9, 0.5])
    with pytest.raises(PotstillError, match=r"k=4 must be in \[1, 3\]"):
        top_k(s, 4)
    with pytest.raises(PotstillError, match="exactly one of k or fraction"):
        top_k(s)
    with pytest.raises(PotstillError, match="#1 is nan"):
        top_k(torch.tensor([0.1, float("nan")]), 1)
    with pytest.raises(PotstillError, match="empty"):
        top_k(torch.tensor([]), 1)
    with pytest.raises(PotstillError, match="score exactly the examples"):
        apply_filters(list("abcd"), [top_k(s, 1)])
