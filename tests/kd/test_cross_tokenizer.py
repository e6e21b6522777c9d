"""Cross-tokenizer KD: character alignment, vocabulary map and projection, ULD, the trainer.

References are written independently of the production code: alignment is checked against
prefix *decoding* (not offsets), the projection against a probability-space sum, ULD against
hand values and finite differences, the trainer's loss against full-logit float64 loops.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from datasets import Dataset
from helpers import CROSS_PAIRS, encode_cross_pairs, fast_tokenizer, one_step_cpu_args, random_llama

from potstill.data import PadCollator, encode_example
from potstill.errors import PotstillError
from potstill.kd import KDConfig
from potstill.kd.cross_tokenizer import (
    KINDS,
    LOG_FLOOR,
    CrossTokenizerAligner,
    CrossTokenizerCollator,
    CrossTokenizerKDTrainer,
    VocabMap,
    align_positions,
    build_vocab_map,
    project_teacher,
    target_alignment,
    token_bytes,
    token_starts,
    uld_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- tiny tokenizers


@pytest.fixture(scope="module")
def _teacher_model(teacher_tok):
    return random_llama(len(teacher_tok), seed=7, hidden=48)


@pytest.fixture
def teacher_model(_teacher_model):
    return copy.deepcopy(_teacher_model)


def _dataset(tok):
    return Dataset.from_list(
        [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tok)]
    )


# ------------------------------------------------------------------------- alignment


def test_token_starts_and_alignment_on_hand_offsets():
    text = "Hello world, it"
    # Student: byte-level style, leading spaces inside the spans.
    student = [(0, 5), (5, 11), (11, 12), (12, 15)]
    # Teacher: BOS (zero width) and trimmed offsets (spaces outside the spans).
    teacher = [(0, 0), (0, 5), (6, 11), (11, 12), (13, 15)]
    assert token_starts(student, text) == [0, 5, 11, 12]
    assert token_starts(teacher, text) == [-1, 0, 5, 11, 12]
    # boundary 5: student pos 0 ("Hello"), teacher pos 1 ("Hello"); 11: (1, 2); 12: (2, 3).
    # Boundary 0 has no student predicting position; the teacher's BOS would predict it.
    assert align_positions(student, teacher, text) == [(0, 1), (1, 2), (2, 3)]


def test_alignment_skips_byte_pieces_of_one_character():
    text = "a日b"
    student = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]  # 日 as three byte tokens sharing one span
    teacher = [(0, 1), (1, 2), (2, 3)]
    assert token_starts(student, text) == [0, 1, -1, -1, 2]
    assert align_positions(student, teacher, text) == [(0, 0), (3, 1)]
    # A byte-level piece whose span over-reaches (" 日" reported as the first byte's token).
    text = "x 日本"
    student = [(0, 1), (1, 3), (2, 3), (2, 3), (3, 4)]
    teacher = [(0, 1), (1, 3), (3, 4)]
    assert token_starts(student, text) == [0, 1, -1, -1, 3]
    assert align_positions(student, teacher, text) == [(0, 0), (3, 1)]


def test_alignment_needs_a_common_boundary_and_ordinary_tokens():
    text = "unbelievable"
    assert align_positions([(0, 2), (2, 9), (9, 12)], [(0, 6), (6, 12)], text) == []
    text = "ab<|end|>c"
    student = [(0, 1), (1, 2), (2, 9), (9, 10)]
    teacher = [(0, 1), (1, 2), (2, 4), (4, 9), (9, 10)]
    assert align_positions(student, teacher, text) == [(0, 0), (1, 1), (2, 3)]
    # The student's control token at 2 is never a boundary: the row predicting it stays unaligned.
    assert align_positions(student, teacher, text, student_special={2}) == [(0, 0), (2, 3)]
    # Uncovered non-space text (dropped by a normalizer) makes the next start unclean.
    assert token_starts([(0, 1), (2, 3)], "a\x00b") == [0, -1]


def _boundaries_by_decoding(tok, ids, first, skip_special):
    """{char: token index} of clean token starts, from prefix decoding only (no offsets)."""
    special = set(tok.all_special_ids)
    out = {}
    for k in range(first, len(ids)):
        a = tok.decode(ids[:k], skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
        b = tok.decode(ids[: k + 1], skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)
        if ids[k] in special or "\ufffd" in a or not b.startswith(a) or len(b) == len(a):
            continue
        out[len(a)] = k
    return out


def _expected_positions(student_tok, teacher_tok, ids, labels, t_ids):
    s_b = _boundaries_by_decoding(student_tok, ids, 1, False)
    t_b = _boundaries_by_decoding(teacher_tok, t_ids, 2, True)  # t_ids[0] is the BOS
    want = [-1] * len(ids)
    for c, k in s_b.items():
        if c in t_b and labels[k] != -100:
            want[k - 1] = t_b[c] - 1
    return want


def test_teacher_view_matches_prefix_decoding(tiny_tokenizer, teacher_tok):
    aligner = CrossTokenizerAligner(tiny_tokenizer, teacher_tok)
    for ex in encode_cross_pairs(tiny_tokenizer):
        view = aligner(ex["input_ids"], ex["labels"])
        ids, labels, t_ids = ex["input_ids"], ex["labels"], view["teacher_input_ids"]
        # The text round-trips: re-tokenizing it gives the student's ids back.
        assert tiny_tokenizer(view["text"], add_special_tokens=False)["input_ids"] == ids
        assert t_ids[0] == teacher_tok.bos_token_id
        assert view["teacher_positions"] == _expected_positions(tiny_tokenizer, teacher_tok, ids, labels, t_ids)
        aligned = [(t, j) for t, j in enumerate(view["teacher_positions"]) if j >= 0]
        assert aligned, "the response words should align"
        for t, j in aligned:  # both positions have read the same text
            s_text = tiny_tokenizer.decode(ids[: t + 1], skip_special_tokens=False)
            t_text = teacher_tok.decode(t_ids[: j + 1], skip_special_tokens=True)
            assert s_text == t_text
        # The row predicting the end-of-turn token is never aligned.
        eos = tiny_tokenizer.eos_token_id
        eos_rows = [t for t in range(len(ids) - 1) if ids[t + 1] == eos and labels[t + 1] != -100]
        assert eos_rows and all(view["teacher_positions"][t] == -1 for t in eos_rows)
    assert aligner.reproduced == len(CROSS_PAIRS) and aligner.fallbacks == 0


def test_teacher_view_falls_back_for_non_canonical_ids(tiny_tokenizer, teacher_tok):
    ex = encode_cross_pairs(tiny_tokenizer)[0]
    # Spell the response one character per token: valid ids that re-tokenizing would merge.
    prompt = ex["prompt_ids"]
    chars = [tiny_tokenizer.convert_tokens_to_ids(c) for c in "TheĠcapital"]  # "Ġ": byte-level space
    assert None not in chars
    ids = prompt + chars + [tiny_tokenizer.eos_token_id]
    labels = [-100] * len(prompt) + ids[len(prompt) :]
    aligner = CrossTokenizerAligner(tiny_tokenizer, teacher_tok)
    view = aligner(ids, labels)
    assert aligner.fallbacks == 1
    assert view["teacher_positions"] == _expected_positions(
        tiny_tokenizer, teacher_tok, ids, labels, view["teacher_input_ids"]
    )
    assert sum(j >= 0 for j in view["teacher_positions"]) >= 2


def test_collator_pads_teacher_view_and_target_alignment(tiny_tokenizer, teacher_tok):
    feats = [
        {k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tiny_tokenizer)[:2]
    ]
    aligner = CrossTokenizerAligner(tiny_tokenizer, teacher_tok)
    views = [aligner(f["input_ids"], f["labels"]) for f in feats]
    coll = CrossTokenizerCollator(tiny_tokenizer, teacher_tok)
    batch = coll(feats)
    keys = ("teacher_input_ids", "teacher_positions")
    pre = coll([{**f, **{k: v[k] for k in keys}} for f, v in zip(feats, views, strict=True)])
    for k in batch:
        assert torch.equal(batch[k], pre[k]), k
    t_len = max(len(v["teacher_input_ids"]) for v in views)
    assert batch["teacher_input_ids"].shape == (2, t_len)
    assert batch["teacher_positions"].shape == batch["input_ids"].shape
    for i, v in enumerate(views):
        k = len(v["teacher_input_ids"])
        assert batch["teacher_input_ids"][i, :k].tolist() == v["teacher_input_ids"]
        assert (batch["teacher_input_ids"][i, k:] == teacher_tok.pad_token_id).all()
        assert batch["teacher_attention_mask"][i].sum() == k
        assert (batch["teacher_positions"][i, len(v["teacher_positions"]) :] == -1).all()
    # Rows of target_index in row-major order, pointing into the flat [B * T_t] teacher grid.
    flat = target_alignment(batch["labels"], batch["teacher_positions"], t_len)
    want = []
    for i in range(2):
        for t in range(batch["labels"].shape[1] - 1):
            if batch["labels"][i, t + 1] != -100:
                j = int(batch["teacher_positions"][i, t])
                want.append(i * t_len + j if j >= 0 else -1)
    assert flat.tolist() == want


def test_max_teacher_length_truncates_and_drops_alignments(tiny_tokenizer, teacher_tok):
    ex = encode_cross_pairs(tiny_tokenizer)[2]
    full = CrossTokenizerAligner(tiny_tokenizer, teacher_tok)(ex["input_ids"], ex["labels"])
    cut = len(full["teacher_input_ids"]) - 5
    short = CrossTokenizerAligner(tiny_tokenizer, teacher_tok, max_teacher_length=cut)(ex["input_ids"], ex["labels"])
    assert short["teacher_input_ids"] == full["teacher_input_ids"][:cut]
    # A teacher position j needs token j + 1 (the one starting at the boundary) inside the cut.
    assert short["teacher_positions"] == [j if j + 1 < cut else -1 for j in full["teacher_positions"]]
    assert any(j >= 0 for j in short["teacher_positions"]) and short != full


def test_target_alignment_hand_example():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    positions = torch.tensor([[0, 3, -1, -1], [-1, 2, -1, -1]])
    # target rows: (0,0),(0,1),(1,1),(1,2); teacher length 4
    assert target_alignment(labels, positions, 4).tolist() == [0, 3, 4 + 2, -1]


# ------------------------------------------------------------------ vocabulary map


def _constructed_pair():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    t_vocab = [
        "<pad>",
        "<eos>",
        "▁the",
        "▁Paris",
        "▁THE",
        "ﬁ",
        "▁Parisian",
        "<0xC3>",
        "é",
        "▁café",
        "zq",
        "▁tHe",
        "▁The",
        "A",
    ]
    t = Tokenizer(models.BPE({w: i for i, w in enumerate(t_vocab)}, [], byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    s_vocab = ["<|endoftext|>", "Ġthe", "ĠParis", "fi", "Ã", "Ã©", "ĠcafÃ©", "ĠThe", "ĠPar", "A"]
    s = Tokenizer(models.WordLevel({w: i for i, w in enumerate(s_vocab)}, unk_token="<|endoftext|>"))
    s.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    s.decoder = decoders.ByteLevel()
    return fast_tokenizer(t, pad_token="<pad>", eos_token="<eos>"), fast_tokenizer(s, eos_token="<|endoftext|>")


def test_token_bytes_share_one_space_and_byte_form():
    teacher, student = _constructed_pair()
    tb, sb = token_bytes(teacher), token_bytes(student)
    assert tb[0] is None and tb[1] is None and sb[0] is None  # specials
    assert tb[9] == sb[6] == " café".encode()  # "▁café" and "ĠcafÃ©"
    assert tb[7] == sb[4] == b"\xc3"  # byte fallback "<0xC3>" and byte-level "Ã"
    assert tb[2] == sb[1] == b" the"


def test_vocab_map_kinds_on_constructed_pair():
    teacher, student = _constructed_pair()
    vm = build_vocab_map(teacher, student)
    got = {i: (int(vm.student_ids[i]), KINDS[int(vm.kinds[i])]) for i in range(vm.teacher_vocab)}
    want = {
        0: (-1, "none"),
        1: (-1, "none"),  # special tokens
        2: (1, "exact"),
        3: (2, "exact"),
        12: (7, "exact"),
        13: (9, "exact"),
        7: (4, "exact"),
        8: (5, "exact"),
        9: (6, "exact"),  # bytes / non-ASCII through "Ġ" vs "▁"
        4: (1, "normalized"),  # " THE" -> casefold " the": " the" (id 1) and " The" (id 7) tie -> smallest id
        11: (1, "normalized"),
        5: (3, "normalized"),  # NFKC("ﬁ") == "fi"
        6: (2, "mined"),  # " Parisian": longest student prefix " Paris" (not " Par")
        10: (-1, "none"),  # "zq": no candidate at all
    }
    assert got == want
    assert vm.counts() == {"none": 3, "exact": 7, "normalized": 3, "mined": 1}
    assert torch.equal(build_vocab_map(teacher, student).student_ids, vm.student_ids)  # deterministic


def test_vocab_map_prefers_ordinary_tokens_over_byte_fallback():
    teacher, student = _constructed_pair()
    # Reverse direction: the SentencePiece-style tokenizer is the student; its "<0xC3>" (id 7)
    # and nothing else spell b"\xc3"; "A" (id 13) is the only spelling of b"A".
    vm = build_vocab_map(student, teacher)
    assert (int(vm.student_ids[4]), KINDS[int(vm.kinds[4])]) == (7, "exact")  # "Ã" -> <0xC3>
    assert (int(vm.student_ids[9]), KINDS[int(vm.kinds[9])]) == (13, "exact")
    from tokenizers import Tokenizer, models

    both = Tokenizer(models.BPE({"<0x41>": 0, "x": 1, "A": 2}, [], byte_fallback=True))
    vm = build_vocab_map(student, fast_tokenizer(both))
    assert int(vm.student_ids[9]) == 2  # "A" over the smaller-id "<0x41>"


# ----------------------------------------------------------------------- projection


def _hand_map():
    # teacher ids 0..4 -> student ids (vocab 4): t0->s1 exact, t1->s1 mined, t2->s3 normalized,
    # t3 unmapped, t4->s0 exact.
    return VocabMap(torch.tensor([1, 1, 3, -1, 0]), torch.tensor([1, 3, 2, 0, 1]), 4)


def test_projection_hand_example():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]], dtype=torch.float64)
    out, mass = project_teacher(p.log(), _hand_map())
    torch.testing.assert_close(mass, torch.tensor([0.85], dtype=torch.float64))
    want = torch.tensor([[0.25 / 0.85, 0.3 / 0.85, 0.0, 0.3 / 0.85]], dtype=torch.float64)
    torch.testing.assert_close(out.exp(), want, rtol=1e-12, atol=0)
    assert out[0, 2] == LOG_FLOOR
    out, mass = project_teacher(p.log(), _hand_map(), kinds=("exact",))
    torch.testing.assert_close(mass, torch.tensor([0.35], dtype=torch.float64))
    torch.testing.assert_close(
        out.exp(), torch.tensor([[0.25 / 0.35, 0.1 / 0.35, 0.0, 0.0]], dtype=torch.float64), rtol=1e-12, atol=0
    )


def _reference_projection(p, src_dst, v_s):
    """Probability space, as a product with a 0/1 matrix: ``p_S = p_T @ M / mass``."""
    m = torch.zeros(p.shape[-1], v_s, dtype=torch.float64)
    for t, s in src_dst:
        m[t, s] = 1.0
    out = p.double() @ m
    mass = out.sum(-1)
    return out / mass[:, None], mass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_matches_reference_preserves_shared_mass_and_stays_finite(dtype):
    g = torch.Generator().manual_seed(0)
    v_t, v_s, n = 37, 11, 6
    ids = torch.randint(0, 9, (v_t,), generator=g)  # student ids 9 and 10 get no preimage...
    ids[:2] = -1  # (two unmapped teacher tokens)
    ids[3] = 10  # ...then student id 10 gets exactly one, teacher 3
    kinds = torch.where(ids >= 0, torch.randint(1, 4, (v_t,), generator=g), torch.zeros_like(ids))
    vm = VocabMap(ids, kinds, v_s)
    logits = torch.randn(n, v_t, generator=g, dtype=torch.float64) * 4
    logits[0, :] = -60.0
    logits[0, 3] = 60.0  # almost all mass on one shared token, the rest below float32's exp range
    lp = torch.log_softmax(logits, -1).to(dtype)
    out, mass = project_teacher(lp, vm)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(mass).all()
    torch.testing.assert_close(
        out.double().exp().sum(-1),
        torch.ones(n, dtype=torch.float64),
        rtol=0,
        atol=1e-6 if dtype == torch.float32 else 1e-12,
    )
    assert (out[:, 9] == LOG_FLOOR).all()
    pairs = [(t, int(ids[t])) for t in range(v_t) if ids[t] >= 0]
    want, want_mass = _reference_projection(lp.double().exp(), pairs, v_s)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.double().exp(), want, **tol)
    torch.testing.assert_close(mass.double(), want_mass, **tol)
    # A lone preimage keeps its log-probability exactly (up to the mass): log p_S = log p_T - log M.
    exact_tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out[:, 10] + mass.log(), lp[:, 3], rtol=0, atol=exact_tol)
    # Tiny probabilities survive (no exp underflow): row 0 has p_T ~ e^-120 on the other tokens.
    mapped = ids.unique()[ids.unique() >= 0]
    assert (out[0][mapped] > -130).all() and (out[0][mapped] < -110).sum() == mapped.numel() - 1


def test_projection_row_without_mapped_mass():
    vm = VocabMap(torch.tensor([0, -1, 1]), torch.tensor([1, 0, 3]), 2)
    lp = torch.log(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.25, 0.25]]))
    out, mass = project_teacher(lp, vm)
    assert torch.isfinite(out).all() and not torch.isnan(out).any()
    assert mass[0] == 0 and (out[0] == LOG_FLOOR).all()
    torch.testing.assert_close(out[1].exp(), torch.tensor([2 / 3, 1 / 3]))
    _, mass = project_teacher(lp, vm, kinds=("normalized",))
    assert (mass == 0).all()


# ------------------------------------------------------------------------------ ULD


def test_uld_hand_values():
    s = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    t = torch.tensor([[0.1, 0.6, 0.1, 0.2]], dtype=torch.float64).log()
    # sorted q = [.5, .3, .2, 0], sorted p = [.6, .2, .1, .1]: |.1| + |.1| + |.1| + |.1|
    torch.testing.assert_close(uld_loss(s, t), torch.tensor([0.4], dtype=torch.float64))
    # Student vocabulary larger: p = [.7, .3] padded -> [.7, .3, 0, 0]; q = [.4, .3, .2, .1]
    s = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64).log()
    t = torch.tensor([[0.3, 0.7]], dtype=torch.float64).log()
    torch.testing.assert_close(uld_loss(s, t), torch.tensor([0.3 + 0.0 + 0.2 + 0.1], dtype=torch.float64))
    # Disjoint one-hot-like: the maximum is 2 only when supports cannot match after sorting; sorted
    # one-hots coincide, so ULD is 0 although the tokens differ (its known blind spot).
    s = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0, 0.0, 50.0]], dtype=torch.float64)
    assert float(uld_loss(s, t)) < 1e-20


def test_uld_temperature_permutations_and_zero():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 11, generator=g, dtype=torch.float64)
    base = uld_loss(s, t, temperature=2.0)
    torch.testing.assert_close(base, uld_loss(s / 2.0, t / 2.0))
    shuffled = uld_loss(s[:, torch.randperm(7, generator=g)], t[:, torch.randperm(11, generator=g)], temperature=2.0)
    torch.testing.assert_close(base, shuffled)
    assert ((base > 0) & (base <= 2)).all()
    # Same sorted distribution (a permutation, padded with zero-probability ids) -> 0.
    t_same = torch.cat([s[:, torch.randperm(7, generator=g)], torch.full((5, 4), -1e4, dtype=torch.float64)], -1)
    torch.testing.assert_close(uld_loss(s, t_same), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_uld_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 9, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, t, temperature=1.5), (s,), eps=1e-6, atol=1e-7)
    s2 = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: uld_loss(x, t2), (s2,), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- trainer


def cfg(tmp_path, **kw):
    base = one_step_cpu_args(
        tmp_path, per_device_train_batch_size=2, learning_rate=1.0, max_grad_norm=0.0, chunk_size=5
    )
    return KDConfig(**(base | kw))


def _trainer(student, teacher, stok, ttok, tmp_path, method="vocab_map", **kw):
    return CrossTokenizerKDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg(tmp_path, **kw),
        teacher_tokenizer=ttok,
        method=method,
        train_dataset=_dataset(stok),
        processing_class=stok,
    )


def _sorted_w1(q, p):
    """ULD written out: pad both to one length, sort, sum of absolute differences."""
    n = max(q.numel(), p.numel())
    q = torch.cat([q, q.new_zeros(n - q.numel())]).sort(descending=True).values
    p = torch.cat([p, p.new_zeros(n - p.numel())]).sort(descending=True).values
    return (q - p).abs().sum()


def reference_loss(student, teacher, batch, vm, *, alpha, T, method, scale_t2=False):
    """Full logits in float64, one row at a time."""
    s_all = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    with torch.no_grad():
        t_all = teacher(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
        ).logits.double()
    if vm is not None:
        m = torch.zeros(t_all.shape[-1], s_all.shape[-1], dtype=torch.float64)
        for t in range(vm.teacher_vocab):
            if vm.student_ids[t] >= 0:
                m[t, int(vm.student_ids[t])] = 1.0
    total, count = 0.0, 0
    for b in range(s_all.shape[0]):
        for t in range(s_all.shape[1] - 1):
            y = int(batch["labels"][b, t + 1])
            if y == -100:
                continue
            count += 1
            total = total + alpha * -torch.log_softmax(s_all[b, t], -1)[y]
            j = int(batch["teacher_positions"][b, t])
            if j < 0:
                continue
            p_t = torch.softmax(t_all[b, j] / T, -1)
            q = torch.softmax(s_all[b, t] / T, -1)
            if method == "uld":
                kd = _sorted_w1(q, p_t)
            else:
                p = p_t @ m / (p_t @ m).sum()
                kd = (p[p > 0] * (p[p > 0].log() - q[p > 0].log())).sum()
            total = total + (1 - alpha) * (T * T if scale_t2 else 1.0) * kd
    return total / count


@pytest.mark.parametrize(
    "method,alpha,T,scale_t2", [("vocab_map", 0.3, 1.0, False), ("vocab_map", 0.0, 2.0, True), ("uld", 0.4, 1.5, False)]
)
def test_loss_matches_full_logit_reference(
    tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path, method, alpha, T, scale_t2
):
    tr = _trainer(
        tiny_student,
        teacher_model,
        tiny_tokenizer,
        teacher_tok,
        tmp_path,
        method,
        alpha=alpha,
        temperature=T,
        scale_t2=scale_t2,
        chunk_size=4,
    )
    batch = tr.data_collator(
        [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tiny_tokenizer)]
    )
    tiny_student.train()
    got = tr.compute_loss(tiny_student, batch)
    want = reference_loss(
        tiny_student, teacher_model, batch, tr.vocab_map, alpha=alpha, T=T, method=method, scale_t2=scale_t2
    )
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    with torch.no_grad():  # evaluation path: no checkpointing
        torch.testing.assert_close(tr.compute_loss(tiny_student, batch), got.detach())
    (g_got,) = torch.autograd.grad(got, tiny_student.lm_head.weight)
    (g_want,) = torch.autograd.grad(want, tiny_student.lm_head.weight)
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-3, atol=1e-6)
    stats = tr.coverage_stats()
    assert 0 < stats["aligned_row_share"] < 1
    if method == "vocab_map":
        assert 0 < stats["teacher_mass_used"] <= 1
        assert abs(sum(stats[f"teacher_mass_{k}"] for k in KINDS) - 1) < 1e-4


def _sgd_grads(student, teacher, stok, ttok, tmp_path, method, **kw):
    before = copy.deepcopy(student.state_dict())
    tr = CrossTokenizerKDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg(tmp_path, **kw),
        teacher_tokenizer=ttok,
        method=method,
        processing_class=stok,
        train_dataset=_dataset(stok).select([0, 2]),
    )
    tr.train()
    after = tr.model.state_dict()
    return {k: before[k] - after[k] for k in before}  # lr = 1: the summed gradient


@pytest.mark.parametrize("method", ["vocab_map", "uld"])
def test_gradient_accumulation_equals_one_batch(
    tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path, method
):
    ex = encode_cross_pairs(tiny_tokenizer)
    counts = [sum(y != -100 for y in ex[i]["labels"][1:]) for i in (0, 2)]
    assert counts[0] != counts[1], "micro-batches must differ in token count for the test to be able to fail"
    g_big = _sgd_grads(
        copy.deepcopy(tiny_student),
        teacher_model,
        tiny_tokenizer,
        teacher_tok,
        tmp_path / "a",
        method,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        alpha=0.2,
    )
    g_acc = _sgd_grads(
        copy.deepcopy(tiny_student),
        teacher_model,
        tiny_tokenizer,
        teacher_tok,
        tmp_path / "b",
        method,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        alpha=0.2,
    )
    assert any(g.abs().max() > 0 for g in g_big.values())
    for k in g_big:
        torch.testing.assert_close(g_acc[k], g_big[k], rtol=1e-4, atol=1e-7)


def test_per_micro_batch_mean_would_differ(tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path):
    """The failure the global normalizer prevents is visible on these two examples."""
    tr = _trainer(tiny_student, teacher_model, tiny_tokenizer, teacher_tok, tmp_path, alpha=0.2)
    feats = [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tiny_tokenizer)]
    one, two = tr.data_collator([feats[0]]), tr.data_collator([feats[2]])
    both = tr.data_collator([feats[0], feats[2]])
    w = tiny_student.lm_head.weight
    n = int((both["labels"][:, 1:] != -100).sum())
    (g_big,) = torch.autograd.grad(tr.compute_loss(tiny_student, both, num_items_in_batch=n), w)
    g_sum = sum(torch.autograd.grad(tr.compute_loss(tiny_student, b, num_items_in_batch=n), w)[0] for b in (one, two))
    torch.testing.assert_close(g_sum, g_big, rtol=1e-4, atol=1e-7)
    g_mean = sum(torch.autograd.grad(tr.compute_loss(tiny_student, b), w)[0] for b in (one, two)) / 2
    assert not torch.allclose(g_mean, g_big, rtol=1e-3, atol=1e-6)


def test_alpha_one_ignores_the_teacher(tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path):
    calls = []
    teacher_model.register_forward_hook(lambda *a: calls.append(1))
    tr = _trainer(tiny_student, teacher_model, tiny_tokenizer, teacher_tok, tmp_path, alpha=1.0)
    batch = tr.data_collator(
        [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tiny_tokenizer)]
    )
    got = tr.compute_loss(tiny_student, batch)
    hf = tiny_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(got, hf, rtol=1e-5, atol=1e-6)
    tr.train()
    assert calls == []


@pytest.mark.parametrize("method", ["vocab_map", "uld"])
def test_loss_decreases_on_a_repeated_batch(tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path, method):
    with torch.no_grad():  # a confident teacher, so that there is something to learn
        teacher_model.lm_head.weight.mul_(10.0)
    tr = _trainer(tiny_student, teacher_model, tiny_tokenizer, teacher_tok, tmp_path, method, alpha=0.0)
    batch = tr.data_collator(
        [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tiny_tokenizer)[:2]]
    )
    tiny_student.train()
    opt = torch.optim.Adam(tiny_student.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = tr.compute_loss(tiny_student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("method", ["vocab_map", "uld"])
def test_trainer_trains_end_to_end(tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path, method):
    tr = _trainer(
        tiny_student,
        teacher_model,
        tiny_tokenizer,
        teacher_tok,
        tmp_path,
        method,
        max_steps=2,
        learning_rate=1e-3,
        optim="adamw_torch",
        alpha=0.1,
    )
    out = tr.train()
    assert math.isfinite(out.training_loss)
    logged = [h for h in tr.state.log_history if "ce_per_token" in h]
    assert logged and "aligned_row_share" in logged[0] and "kd_per_token" in logged[0]
    assert all(not p.requires_grad for p in teacher_model.parameters())


def test_refuses_bad_setups(tiny_tokenizer, tiny_student, teacher_tok, teacher_model, tmp_path):
    with pytest.raises(PotstillError, match="method"):
        _trainer(tiny_student, teacher_model, tiny_tokenizer, teacher_tok, tmp_path, method="kl")
    with pytest.raises(PotstillError, match="token_weighting"):
        _trainer(tiny_student, teacher_model, tiny_tokenizer, teacher_tok, tmp_path, token_weighting="teacher_maxprob")
    with pytest.raises(PotstillError, match="teacher_tokenizer"):
        CrossTokenizerKDTrainer(
            model=tiny_student, teacher_model=teacher_model, args=cfg(tmp_path), processing_class=tiny_tokenizer
        )
    tr = _trainer(tiny_student, teacher_model, tiny_tokenizer, teacher_tok, tmp_path)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(
        [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(tiny_tokenizer)[:1]]
    )
    with pytest.raises(PotstillError, match="CrossTokenizerCollator"):
        tr.compute_loss(tiny_student, batch)


# ------------------------------------------------------------------------ real pair


def _real_tokenizers():
    from potstill.models import load_tokenizer

    pytest.importorskip("gguf")
    try:
        return load_tokenizer("gemma3-270m"), load_tokenizer("smollm2-135m-instruct")
    except PotstillError as err:
        if "not installed" in str(err):
            pytest.skip(str(err))
        raise


@pytest.mark.real_model
def test_real_gemma_to_smollm2_vocab_map_and_alignment():
    gemma, smol = _real_tokenizers()
    start = time.perf_counter()
    vm = build_vocab_map(gemma, smol)
    seconds = time.perf_counter() - start
    counts = vm.counts()
    share = {k: v / vm.teacher_vocab for k, v in counts.items()}
    print(f"vocab map {vm.teacher_vocab} x {vm.student_vocab} in {seconds:.1f}s: {counts} {share}")
    assert vm.teacher_vocab == 262144 and vm.student_vocab == 49152
    assert share["none"] < 0.05  # the <unused*> / image / control tokens
    assert counts["exact"] > 0.9 * 49152  # nearly every student token has its teacher twin
    # On text, almost every teacher token maps exactly (the long tail of the 262k vocab is rare).
    text = (
        "Knowledge distillation trains a small student model to imitate a larger teacher. The capital of "
        "France is Paris, and the weather there is nice today. Two plus two is four."
    )
    t_ids = gemma(text, add_special_tokens=False)["input_ids"]
    exact = sum(KINDS[int(vm.kinds[i])] == "exact" for i in t_ids) / len(t_ids)
    print(f"exact share of the teacher's tokens in an English paragraph: {exact:.3f}")
    assert exact > 0.9
    paris = gemma.convert_tokens_to_ids("▁Paris")
    assert int(vm.student_ids[paris]) == smol.convert_tokens_to_ids("ĠParis") and KINDS[int(vm.kinds[paris])] == "exact"
    # A real chat example: every word of the answer aligns; the end-of-turn row does not.
    ex = encode_example(
        smol, [{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris.", 256
    )
    aligner = CrossTokenizerAligner(smol, gemma)
    view = aligner(ex["input_ids"], ex["labels"])
    assert aligner.reproduced == 1
    ids, t_ids = ex["input_ids"], view["teacher_input_ids"]
    rows = [t for t in range(len(ids) - 1) if ex["labels"][t + 1] != -100]
    aligned = [t for t in rows if view["teacher_positions"][t] >= 0]
    print(f"aligned {len(aligned)} of {len(rows)} target rows")
    assert [smol.decode([ids[t + 1]]) for t in aligned] == [
        "The",
        " capital",
        " of",
        " France",
        " is",
        " Paris",
        ".",
        "\n",
    ]
    for t in aligned:
        j = view["teacher_positions"][t]
        assert smol.decode(ids[: t + 1], skip_special_tokens=False) == gemma.decode(t_ids[1 : j + 1])
    assert view["teacher_positions"][rows[-2]] == -1 and ids[rows[-2] + 1] == smol.convert_tokens_to_ids("<|im_end|>")
