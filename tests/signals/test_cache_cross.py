"""Cross-tokenizer KD from disk (issue 20): a cache written in the teacher's own tokens, read by a student with
another tokenizer (:mod:`potstill.signals.cache.cross`).

References are independent of the production code: the alignment against prefix decoding (no offsets), the
sparse projection against hand values and against the dense projection, the trainer's loss against a float64
loop over the live teacher's full distribution on its own encoding of each pair.
"""

from __future__ import annotations

import math
from os.path import commonprefix

import pytest
import torch
from datasets import Dataset
from helpers import encode_cross_pairs, one_step_cpu_args, random_llama

from potstill.data import PadCollator
from potstill.data.cross_tokenizer import response_alignment
from potstill.divergences import DIVERGENCES, sparse_divergence
from potstill.divergences.chunked import chunked_kd_loss
from potstill.errors import PotstillError
from potstill.kd import KDConfig, KDTrainer
from potstill.models import output_head
from potstill.models.vocab_map import KINDS, VocabMap, build_vocab_map, project_teacher
from potstill.signals import SparseSignal
from potstill.signals.cache import CachedSignal, CacheSpec, write_cache
from potstill.signals.cache.certify import certify_models_cross
from potstill.signals.cache.cross import CrossTokenizerCache, OwnViewTeacher, Projection, project_sparse
from potstill.signals.types import Head

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ alignment


def _response_chars(tok, ids, labels):
    """{character of the response: target row} by prefix decoding, and the response text."""
    special = set(tok.all_special_ids)
    targets = [k for k in range(1, len(ids)) if labels[k] != -100]

    def dec(x):
        return tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    head = dec(ids[: targets[0]])
    out = {}
    for row, k in enumerate(targets):
        a, b = dec(ids[:k]), dec(ids[: k + 1])
        if ids[k] in special or "\ufffd" in a or not b.startswith(a) or len(b) == len(a) or not a.startswith(head):
            continue
        out[len(a) - len(head)] = row
    return out, dec(ids)[len(head) :]


def _expected_alignment(s_tok, s_ex, t_tok, t_ex):
    s_at, s_text = _response_chars(s_tok, s_ex["input_ids"], s_ex["labels"])
    t_at, t_text = _response_chars(t_tok, t_ex["input_ids"], t_ex["labels"])
    n = sum(1 for y in s_ex["labels"][1:] if y != -100)
    common = len(commonprefix([s_text, t_text]))
    want = [-1] * n
    for c, row in s_at.items():
        if c <= common and c in t_at:
            want[row] = t_at[c]
    return want


def test_response_alignment_matches_prefix_decoding_across_prompt_renderings(tiny_tokenizer, teacher_tok):
    # the student renders prompts with its chat template, the teacher as plain text: only the responses align
    assert tiny_tokenizer.chat_template and not getattr(teacher_tok, "chat_template", None)
    pairs = zip(encode_cross_pairs(tiny_tokenizer), encode_cross_pairs(teacher_tok), strict=True)
    aligned = 0
    for s_ex, t_ex in pairs:
        got = response_alignment(
            tiny_tokenizer, s_ex["input_ids"], s_ex["labels"], teacher_tok, t_ex["input_ids"], t_ex["labels"]
        )
        assert got == _expected_alignment(tiny_tokenizer, s_ex, teacher_tok, t_ex)
        aligned += sum(g >= 0 for g in got)
        assert got[0] == 0  # both predict the response's first character from the end of their own prompt
        assert got[-1] == -1  # the end-of-turn token is special: never aligned
        assert all(b > a for a, b in zip([g for g in got if g >= 0], [g for g in got if g >= 0][1:]))
    assert aligned > 10


def test_response_alignment_with_one_tokenizer_is_the_identity_on_ordinary_tokens(tiny_tokenizer):
    ex = encode_cross_pairs(tiny_tokenizer)[0]
    got = response_alignment(
        tiny_tokenizer, ex["input_ids"], ex["labels"], tiny_tokenizer, ex["input_ids"], ex["labels"]
    )
    special = set(tiny_tokenizer.all_special_ids)
    targets = [k for k in range(1, len(ex["input_ids"])) if ex["labels"][k] != -100]
    assert got == [row if ex["input_ids"][k] not in special else -1 for row, k in enumerate(targets)]


def test_a_truncated_response_aligns_only_where_both_have_read_the_same_text(tiny_tokenizer, teacher_tok):
    s_ex, t_ex = encode_cross_pairs(tiny_tokenizer)[2], encode_cross_pairs(teacher_tok)[2]
    cut = {k: v[:-6] for k, v in t_ex.items() if k in ("input_ids", "labels")}  # the teacher's copy ends early
    got = response_alignment(
        tiny_tokenizer, s_ex["input_ids"], s_ex["labels"], teacher_tok, cut["input_ids"], cut["labels"]
    )
    assert got == _expected_alignment(tiny_tokenizer, s_ex, teacher_tok, cut)
    n_t = sum(1 for y in cut["labels"][1:] if y != -100)
    assert max(got) < n_t and got.count(-1) > 6


# ----------------------------------------------------------------------------- projection


def _hand_map():
    # teacher ids 0..4 -> student ids (vocab 4): t0->s1 exact, t1->s1 mined, t2->s3 normalized, t3 unmapped, t4->s0
    return VocabMap(torch.tensor([1, 1, 3, -1, 0]), torch.tensor([1, 3, 2, 0, 1]), 4)


def _dense(sig: SparseSignal, v: int) -> torch.Tensor:
    out = torch.zeros(sig.ids.shape[0], v, dtype=torch.float64)
    return out.scatter_add(1, sig.ids, sig.logprobs.double().exp())


def test_topk_projection_hand_example():
    p = torch.tensor([[0.3, 0.1, 0.15, 0.05]])  # teacher ids 2, 0, 3, 1; the tail holds 0.4
    sig = SparseSignal(ids=torch.tensor([[2, 0, 3, 1]]), logprobs=p.log(), tail_logprob=torch.tensor([0.4]).log())
    out, share = project_sparse(sig, _hand_map(), 4)
    z = 0.3 + 0.1 + 0.05 + 0.4  # t3 is unmapped; t0 and t1 both go to s1
    torch.testing.assert_close(_dense(out, 4), torch.tensor([[0, 0.15 / z, 0, 0.3 / z]], dtype=torch.float64))
    torch.testing.assert_close(out.tail_logprob.exp(), torch.tensor([0.4 / z]))
    assert sorted(out.ids[0][torch.isfinite(out.logprobs[0])].tolist()) == [1, 3]  # merged, no duplicate id
    torch.testing.assert_close(share, torch.tensor([0.45 / 0.6]))
    assert out.valid.tolist() == [True]
    out, share = project_sparse(sig, _hand_map(), 4, kinds=("exact",))  # only t0 -> s1 counts
    torch.testing.assert_close(_dense(out, 4), torch.tensor([[0, 0.1 / 0.5, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(share, torch.tensor([0.1 / 0.6]))


def test_sampled_projection_hand_example_and_a_row_with_nothing_mapped():
    lp = torch.tensor([[0.1, 0.2, 0.15], [0.5, 0.5, 0.0]]).log()
    sig = SparseSignal(
        ids=torch.tensor([[0, 1, 3], [3, 3, 0]]),
        logprobs=lp,
        weights=torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]),
    )
    out, share = project_sparse(sig, _hand_map(), 4)
    assert out.valid.tolist() == [True, False]
    torch.testing.assert_close(share, torch.tensor([0.75, 0.0]))
    row = torch.isfinite(out.logprobs[0]) & (out.weights[0] > 0)
    assert out.ids[0][row].tolist() == [1]  # t0 and t1 merged into s1, t3 dropped
    torch.testing.assert_close(out.weights[0][row], torch.tensor([1.0]))
    torch.testing.assert_close(out.logprobs[0][row], torch.tensor([math.log(0.3 / 0.75)]))
    assert torch.isfinite(out.logprobs[1, 0]) and out.weights[1].sum() == 1  # a finite placeholder


def test_a_topk_row_holding_the_whole_vocabulary_projects_like_the_dense_projection():
    g = torch.Generator().manual_seed(0)
    v_t, v_s, n = 37, 11, 5
    ids = torch.randint(0, 9, (v_t,), generator=g)
    ids[:2] = -1
    kinds = torch.where(ids >= 0, torch.randint(1, 4, (v_t,), generator=g), torch.zeros_like(ids))
    vm = VocabMap(ids, kinds, v_s)
    lp = torch.log_softmax(torch.randn(n, v_t, generator=g, dtype=torch.float64) * 3, -1)
    order = torch.argsort(torch.rand(n, v_t, generator=g), dim=1)  # slots in any order
    sig = SparseSignal(ids=order, logprobs=lp.gather(1, order).float(), tail_logprob=torch.full((n,), -float("inf")))
    out, _ = project_sparse(sig, vm, v_s)
    want, _ = project_teacher(lp, vm, v_s)
    got = _dense(out, v_s)
    has = got > 0
    torch.testing.assert_close(got[has], want.exp()[has], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-5)
    assert not has[:, 9:].any()  # student ids without a preimage get nothing


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_rows_marked_invalid_add_nothing_for_any_divergence(kind):
    """The placeholder of an unaligned row is finite, so weight 0 removes it exactly (0 * nan would not)."""
    g = torch.Generator().manual_seed(1)
    n, v, h, k = 6, 13, 8, 4
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = Head(weight=torch.randn(v, h, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    t_lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1)
    top = t_lp.topk(k, dim=1)
    sig = SparseSignal(ids=top.indices, logprobs=top.values, tail_logprob=torch.log1p(-top.values.exp().sum(1)))
    if kind == "sampled":
        sig = SparseSignal(ids=top.indices, logprobs=top.values, weights=torch.full((n, k), 1.0 / k))
    vm = VocabMap(torch.arange(v), torch.ones(v, dtype=torch.long), v)
    out, _ = project_sparse(sig, vm, v)
    keep = torch.tensor([True, False, True, True, False, True])
    out.ids[~keep] = 0
    out.logprobs[~keep] = float("-inf")
    out.logprobs[~keep, 0] = 0.0
    if out.weights is not None:
        out.weights[~keep] = 0.0
        out.weights[~keep, 0] = 1.0
    else:
        out.tail_logprob[~keep] = float("-inf")
    names = [d for d in DIVERGENCES if d not in ("bild",) and not (kind == "sampled" and d == "adaptive_kl")]
    for name in names:
        common = dict(divergence=name, alpha=0.0, normalizer=n, chunk_size=4)
        loss, _ = chunked_kd_loss(hidden, head, labels, out, kd_weights=keep.float(), **common)
        (grad,) = torch.autograd.grad(loss, hidden)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        assert (grad[~keep] == 0).all(), name
        idx = keep.nonzero().squeeze(1)
        part, _ = chunked_kd_loss(hidden[idx], head, labels[idx], out.rows(idx), **(common | {"normalizer": n}))
        torch.testing.assert_close(loss, part, msg=name)


# ------------------------------------------------------------------------ the trainer's loss


@pytest.fixture(scope="module")
def teacher(teacher_tok):
    return random_llama(len(teacher_tok), seed=5, hidden=48, layers=2)


def _reference(student, teacher_model, s_batch, s_examples, t_examples, vm, alpha, T, s_tok, t_tok, kinds=KINDS):
    """float64, one row at a time: CE on every target row, forward KL to the projected live teacher on the
    rows aligned by prefix decoding (the teacher reading its own encoding of the pair); teacher tokens whose
    match is not of ``kinds`` carry no mass."""
    s_all = student(input_ids=s_batch["input_ids"], attention_mask=s_batch["attention_mask"]).logits.double()
    m = torch.zeros(vm.teacher_vocab, s_all.shape[-1], dtype=torch.float64)
    for t in range(vm.teacher_vocab):
        if vm.student_ids[t] >= 0 and KINDS[int(vm.kinds[t])] in kinds:
            m[t, int(vm.student_ids[t])] = 1.0
    total, count = 0.0, 0
    for b, (s_ex, t_ex) in enumerate(zip(s_examples, t_examples, strict=True)):
        with torch.no_grad():
            t_logits = teacher_model(input_ids=torch.tensor([t_ex["input_ids"]])).logits[0].double()
        t_rows = [k - 1 for k in range(1, len(t_ex["labels"])) if t_ex["labels"][k] != -100]
        align = _expected_alignment(s_tok, s_ex, t_tok, t_ex)
        s_rows = [k - 1 for k in range(1, len(s_ex["labels"])) if s_ex["labels"][k] != -100]
        for r, pos in enumerate(s_rows):
            y = s_ex["labels"][pos + 1]
            count += 1
            total = total + alpha * -torch.log_softmax(s_all[b, pos], -1)[y]
            if align[r] < 0:
                continue
            p_t = torch.softmax(t_logits[t_rows[align[r]]] / T, -1)
            p = p_t @ m / (p_t @ m).sum()
            q = torch.softmax(s_all[b, pos] / T, -1)
            total = total + (1 - alpha) * (p[p > 0] * (p[p > 0].log() - q[p > 0].log())).sum()
    return total / count


@pytest.mark.parametrize(
    "alpha,T,kind", [(0.3, 1.0, "topk"), (0.0, 2.0, "topk"), (0.3, 2.0, "dense"), (0.3, 2.0, "live")]
)
def test_loss_from_a_full_vocabulary_cache_matches_the_live_teacher_reference(
    tiny_tokenizer, tiny_student, teacher_tok, teacher, tmp_path, alpha, T, kind
):
    s_examples = encode_cross_pairs(tiny_tokenizer)
    t_examples = [dict(e, example_id=i) for i, e in enumerate(encode_cross_pairs(teacher_tok))]
    v_t, v_s = len(teacher_tok), output_head(tiny_student).weight.shape[0]
    vm = build_vocab_map(teacher_tok, tiny_tokenizer, student_vocab=v_s)
    if kind == "live":  # no cache: the teacher reads its own encoding of each pair, as the cache's writer did
        source_cls, first = OwnViewTeacher, teacher
    else:  # top-k over the whole vocabulary at the distillation temperature, or dense (at T = 1, any T on read)
        spec = CacheSpec(kind=kind, k=v_t, dtype="fp32", temperature=T if kind == "topk" else 1.0, examples_per_shard=2)
        write_cache(teacher, teacher_tok, t_examples, tmp_path / "cache", spec, progress=False)
        source_cls, first = CrossTokenizerCache, CachedSignal(tmp_path / "cache", tokenizer=teacher_tok)
    source = source_cls(
        first,
        student_tokenizer=tiny_tokenizer,
        teacher_tokenizer=teacher_tok,
        teacher_examples=t_examples,
        example_map={i: i for i in range(len(s_examples))},
        vocab_map=vm,
        student_vocab=v_s,
        temperature=T,
    )
    columns = ("input_ids", "attention_mask", "labels")
    rows = [{**{k: e[k] for k in columns}, "example_id": i} for i, e in enumerate(s_examples)]
    args = KDConfig(**one_step_cpu_args(tmp_path, alpha=alpha, temperature=T, chunk_size=5))
    tr = KDTrainer(
        model=tiny_student,
        signal_source=source,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
        vocab_size=v_s,
    )
    batch = PadCollator(tiny_tokenizer.pad_token_id)(rows)
    tiny_student.train()
    got = tr.compute_loss(tiny_student, batch)
    want = _reference(tiny_student, teacher, batch, s_examples, t_examples, vm, alpha, T, tiny_tokenizer, teacher_tok)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, tiny_student.lm_head.weight)
    (g_want,) = torch.autograd.grad(want, tiny_student.lm_head.weight)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-3, atol=1e-6)
    cov = source.coverage()
    assert 0 < cov["kd_row_share"] <= cov["aligned_row_share"] < 1
    assert source.forward_tokens == (sum(len(e["input_ids"]) for e in t_examples) if kind == "live" else 0)
    assert 0.5 < cov["teacher_mass_used"] <= 1 + 1e-6


def test_a_student_example_without_a_teacher_copy_trains_on_ce_only(
    tiny_tokenizer, tiny_student, teacher_tok, teacher, tmp_path
):
    s_examples = encode_cross_pairs(tiny_tokenizer)
    t_examples = [dict(e, example_id=i) for i, e in enumerate(encode_cross_pairs(teacher_tok))]
    v_s = output_head(tiny_student).weight.shape[0]
    write_cache(teacher, teacher_tok, t_examples, tmp_path / "c", CacheSpec(kind="sampled", draws=8), progress=False)
    source = CrossTokenizerCache(
        CachedSignal(tmp_path / "c"),
        student_tokenizer=tiny_tokenizer,
        teacher_tokenizer=teacher_tok,
        teacher_examples=t_examples,
        example_map={0: 0, 2: 2},  # examples 1 and 3 have no copy in the teacher's tokens
        vocab_map=build_vocab_map(teacher_tok, tiny_tokenizer, student_vocab=v_s),
        student_vocab=v_s,
    )
    rows = [
        {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"], "labels": e["labels"], "example_id": i}
        for i, e in enumerate(s_examples)
    ]
    batch = PadCollator(tiny_tokenizer.pad_token_id)(rows)
    sig = source.signal(batch)
    n = [sum(1 for y in e["labels"][1:] if y != -100) for e in s_examples]
    starts = [sum(n[:i]) for i in range(4)]
    assert not sig.valid[starts[1] : starts[1] + n[1]].any() and not sig.valid[starts[3] :].any()
    assert sig.valid[: n[0]].any() and sig.valid[starts[2] : starts[2] + n[2]].any()
    del batch["example_id"]
    with pytest.raises(PotstillError, match="example_id"):
        source.signal(batch)


def test_rows_after_the_responses_differ_are_not_aligned(tiny_tokenizer, teacher_tok):
    from potstill.data import encode_example

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    s_ex = encode_example(tiny_tokenizer, msgs, "The capital of France is Paris.", 128)
    t_ex = encode_example(teacher_tok, msgs, "The capital of France is Lyon.", 128)
    got = response_alignment(
        tiny_tokenizer, s_ex["input_ids"], s_ex["labels"], teacher_tok, t_ex["input_ids"], t_ex["labels"]
    )
    assert got == _expected_alignment(tiny_tokenizer, s_ex, teacher_tok, t_ex)
    s_at, _ = _response_chars(tiny_tokenizer, s_ex["input_ids"], s_ex["labels"])
    t_at, _ = _response_chars(teacher_tok, t_ex["input_ids"], t_ex["labels"])
    fork = len("The capital of France is ")  # the copies agree this far, then read "Paris" / "Lyon"
    word = fork - 1  # " Paris" and " Lyon" begin at the space
    assert word in s_at and word in t_at
    assert got[s_at[word]] == t_at[word]  # same text read, so the same prediction: a target whatever follows
    assert all(got[row] == -1 for c, row in s_at.items() if c > fork)  # read different text: never paired
    assert all(got[row] == t_at[c] for c, row in s_at.items() if c <= fork and c in t_at)


def test_the_row_right_where_the_responses_part_is_aligned(tiny_tokenizer, teacher_tok):
    from potstill.data import encode_example

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    s_ex = encode_example(tiny_tokenizer, msgs, "The capital of France is Paris.", 128)
    t_ex = encode_example(teacher_tok, msgs, "The capital of France is Paris!", 128)
    got = response_alignment(
        tiny_tokenizer, s_ex["input_ids"], s_ex["labels"], teacher_tok, t_ex["input_ids"], t_ex["labels"]
    )
    s_at, _ = _response_chars(tiny_tokenizer, s_ex["input_ids"], s_ex["labels"])
    t_at, _ = _response_chars(teacher_tok, t_ex["input_ids"], t_ex["labels"])
    end = len("The capital of France is Paris")  # both copies read exactly this, then "." / "!"
    assert end in s_at and end in t_at and got[s_at[end]] == t_at[end]


# --------------------------------------------------------------------------- the certificate


def _cross_probe(tiny_tokenizer, tiny_student, teacher_tok, kinds=("exact", "normalized", "mined")):
    s_examples = [dict(e, example_id=i) for i, e in enumerate(encode_cross_pairs(tiny_tokenizer))]
    t_examples = encode_cross_pairs(teacher_tok)
    v_s = output_head(tiny_student).weight.shape[0]
    vm = build_vocab_map(teacher_tok, tiny_tokenizer, student_vocab=v_s)
    return s_examples, t_examples, Projection(vm, v_s, tuple(kinds))


def _certify_cross(teacher, student, s_examples, t_examples, proj, tiny_tokenizer, teacher_tok, **kw):
    return certify_models_cross(
        teacher,
        student,
        s_examples,
        t_examples,
        {i: i for i in range(len(s_examples))},
        "forward_kl",
        student_tokenizer=tiny_tokenizer,
        teacher_tokenizer=teacher_tok,
        projection=proj,
        pad_id=tiny_tokenizer.pad_token_id,
        teacher_pad_id=teacher_tok.pad_token_id or 0,
        **kw,
    )


@pytest.mark.parametrize("draws,kinds", [(8, ("exact", "normalized", "mined")), (1, ("exact",))])
def test_cross_certificate_measures_what_the_cross_tokenizer_reader_serves(
    tiny_tokenizer, tiny_student, teacher_tok, teacher, tmp_path, draws, kinds
):
    """The certificate of a cache in the teacher's tokens, with the cache's own draws (seed and row keys), gives
    the divergence the student trains on from that cache (CrossTokenizerCache's signal, rows with nothing
    mapped at weight 0: one draw of exact matches only leaves some), and its dense reference is the float64
    forward KL to the projected live teacher."""
    s_examples, t_examples, proj = _cross_probe(tiny_tokenizer, tiny_student, teacher_tok, kinds)
    spec = CacheSpec(kind="sampled", draws=draws, seed=3, examples_per_shard=2)
    write_cache(teacher, teacher_tok, t_examples, tmp_path / "c", spec, progress=False)
    cert = _certify_cross(
        teacher,
        tiny_student,
        s_examples,
        t_examples,
        proj,
        tiny_tokenizer,
        teacher_tok,
        kind="sampled",
        candidates=[draws],
        seeds=[3],
        dtype=spec.dtype,
    )
    source = CrossTokenizerCache(
        CachedSignal(tmp_path / "c"),
        student_tokenizer=tiny_tokenizer,
        teacher_tokenizer=teacher_tok,
        teacher_examples=t_examples,
        example_map={i: i for i in range(len(s_examples))},
        vocab_map=proj.vocab_map,
        student_vocab=proj.student_vocab,
        kinds=kinds,
    )
    columns = ("input_ids", "attention_mask", "labels", "example_id")
    batch = PadCollator(tiny_tokenizer.pad_token_id)([{k: e[k] for k in columns} for e in s_examples])
    sig = source.signal(batch)
    with torch.no_grad():
        logits = tiny_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = logits[:, :-1].reshape(-1, logits.shape[-1])[(batch["labels"][:, 1:] != -100).reshape(-1)]
    per_row = sparse_divergence("forward_kl", rows.float(), sig) * sig.valid.float()
    cov = source.coverage()
    assert (cov["kd_row_share"] < cov["aligned_row_share"]) == (draws == 1)  # aligned rows with nothing mapped
    aligned = sum(
        sum(a >= 0 for a in _expected_alignment(tiny_tokenizer, s, teacher_tok, t))
        for s, t in zip(s_examples, t_examples)
    )
    assert cert["rows"] == aligned == source.coverage()["rows"] * source.coverage()["aligned_row_share"]
    assert cert["vocab"] == len(teacher_tok) and cert["student_vocab"] == proj.student_vocab
    row = cert["candidates"][0]
    torch.testing.assert_close(torch.tensor(row["loss"] * cert["rows"]), per_row.sum(), rtol=1e-5, atol=1e-6)
    want = _reference(
        tiny_student,
        teacher,
        batch,
        s_examples,
        t_examples,
        proj.vocab_map,
        0.0,
        1.0,
        tiny_tokenizer,
        teacher_tok,
        kinds,
    )
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert cert["dense_loss"] * cert["rows"] == pytest.approx(float(want) * n_targets, rel=1e-4)
    assert 0 < cert["aligned_row_share"] < 1 and cert["criterion"] == "head" and cert["examples"] == len(s_examples)


def test_cross_certificate_of_a_whole_vocabulary_topk_is_exact_and_a_small_k_is_not(
    tiny_tokenizer, tiny_student, teacher_tok, teacher
):
    """Top-k over the teacher's whole vocabulary projects exactly like the dense projection, so every error of
    the certificate is 0; top-2 keeps a bias; sampled draws are unbiased (bias within their noise) with noise
    that falls with more draws."""
    s_examples, t_examples, proj = _cross_probe(tiny_tokenizer, tiny_student, teacher_tok)
    v_t = len(teacher_tok)
    common = dict(teacher=teacher, student=tiny_student, s_examples=s_examples, t_examples=t_examples, proj=proj)
    top = _certify_cross(
        **common, tiny_tokenizer=tiny_tokenizer, teacher_tok=teacher_tok, kind="topk", candidates=[2, v_t], dtype="fp32"
    )
    small, whole = top["candidates"]
    assert whole["k"] == v_t and whole["ok"] and top["recommendation"] == v_t
    for name in ("loss_error", "grad_error", "head_grad_bias"):
        assert whole[name] < 1e-4, name
        assert small[name] > 100 * max(whole[name], 1e-7), name
    samp = _certify_cross(
        **common,
        tiny_tokenizer=tiny_tokenizer,
        teacher_tok=teacher_tok,
        kind="sampled",
        candidates=[4, 64],
        seeds=range(8),
        dtype="fp32",
    )
    few, many = samp["candidates"]
    assert many["noise_ratio"] < few["noise_ratio"] / 4
    assert many["head_grad_bias"] < small["head_grad_bias"]
