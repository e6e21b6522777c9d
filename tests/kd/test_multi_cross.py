"""Multi-teacher KD across tokenizers: a teacher with another tokenizer joins a MultiTeacher
through the vocabulary-map projection, on the rows where the two tokenizations align.

References are independent of the production path: the projected teacher is recomputed from
the teacher's full float64 logits on the CrossTokenizerCollator's view and a dense 0/1 map
matrix; the mixture by hand, row by row.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import encode_cross_pairs, random_llama

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.kd.cross_tokenizer import CrossTokenizerCollator, build_vocab_map, target_alignment
from potstill.signals import DenseSignal, MultiTeacher, OnlineTeacher, target_index
from potstill.signals.cross import CrossTokenizerTeacher, MaskedDenseSignal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def other_teacher(teacher_tok):
    return random_llama(len(teacher_tok), seed=11, hidden=48)


def _batch(stok):
    feats = [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_cross_pairs(stok)]
    return PadCollator(stok.pad_token_id)(feats), feats


def _reference_projection(teacher, stok, ttok, feats, vm, v_s, T):
    """Per student target row: the teacher's projected distribution (float64) or None where unaligned."""
    view = CrossTokenizerCollator(stok, ttok)(feats)
    with torch.no_grad():
        logits = teacher(input_ids=view["teacher_input_ids"], attention_mask=view["teacher_attention_mask"]).logits
    logits = logits.double().reshape(-1, logits.shape[-1])
    m = torch.zeros(logits.shape[-1], v_s, dtype=torch.float64)
    for t in range(vm.teacher_vocab):
        if vm.student_ids[t] >= 0:
            m[t, int(vm.student_ids[t])] = 1.0
    row_map = target_alignment(view["labels"], view["teacher_positions"], view["teacher_input_ids"].shape[1])
    out = []
    for j in row_map.tolist():
        if j < 0:
            out.append(None)
            continue
        p = torch.softmax(logits[j] / T, -1) @ m
        out.append(p / p.sum() if p.sum() > 0 else None)
    return out


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cross_source_is_the_projected_teacher_on_aligned_rows(tiny_tokenizer, teacher_tok, other_teacher, T):
    v_s = len(tiny_tokenizer)
    batch, feats = _batch(tiny_tokenizer)
    src = CrossTokenizerTeacher(
        other_teacher, teacher_tok, tiny_tokenizer, student_vocab=v_s, temperature=T, chunk_size=3
    )
    sig = src.signal(batch)
    ref = _reference_projection(other_teacher, tiny_tokenizer, teacher_tok, feats, src.vocab_map, v_s, T)
    assert sig.logits.shape == (target_index(batch["labels"]).numel(), v_s) == (len(ref), v_s)
    assert sig.valid.tolist() == [r is not None for r in ref]
    assert 0 < int(sig.valid.sum()) < len(ref), "some rows must be aligned and some not for the test to bite"
    got = torch.softmax(sig.logits.double() / T, -1)
    for i, r in enumerate(ref):
        if r is not None:
            torch.testing.assert_close(got[i], r, rtol=1e-4, atol=1e-6)
    cov = src.coverage()
    assert cov["valid_row_share"] == pytest.approx(float(sig.valid.float().mean()))
    assert 0 < cov["teacher_mass_used"] <= 1


class Fixed:
    def __init__(self, p, valid=None):
        self.p, self.valid = p, valid
        self.vocab_size = p.shape[-1]
        if valid is not None:
            self.partial = True

    def signal(self, batch):
        if self.valid is None:
            return DenseSignal(logits=self.p.log())
        return MaskedDenseSignal(logits=torch.where(self.valid[:, None], self.p.log(), 0.0), valid=self.valid)


LABELS = {"labels": torch.tensor([[-100, 0, 1], [-100, 2, 3]])}  # 4 target rows, 2 examples
PA = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.1, 0.1, 0.7, 0.1], [0.4, 0.3, 0.2, 0.1]])
PB = torch.tensor([[0.25] * 4, [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]])
VALID_B = torch.tensor([True, False, True, True])


def _p(sig):
    return torch.softmax(sig.logits, -1)


def test_mean_and_confidence_give_a_partial_teacher_weight_zero_where_it_is_silent():
    valid = torch.tensor([False, True, True, False])  # B silent on rows where A is not uniform
    a, b = Fixed(PA), Fixed(PB, valid)
    got = _p(MultiTeacher([a, b], mode="mean", weights=[1, 3]).signal(LABELS))
    want = torch.where(valid[:, None], 0.25 * PA + 0.75 * PB, PA)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got = _p(MultiTeacher([a, b], mode="confidence", confidence="maxprob").signal(LABELS))
    ca, cb = PA.max(-1).values, PB.max(-1).values * valid
    want = (ca[:, None] * PA + cb[:, None] * PB) / (ca + cb)[:, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_select_ranks_a_partial_teacher_on_the_rows_it_covers():
    # targets: example 0 rows 0, 1 -> ids 0, 1; example 1 rows 2, 3 -> ids 2, 3
    pb = torch.tensor([[0.25] * 4, [0.1, 0.8, 0.05, 0.05], [0.1, 0.1, 0.5, 0.3], [0.1, 0.1, 0.1, 0.7]])
    ce = lambda p, rows: -sum(math.log(p[r, t]) for r, t in rows) / len(rows)  # noqa: E731
    # example 1: B explains its targets better than A on both rows -> B
    assert ce(pb, [(2, 2), (3, 3)]) < ce(PA, [(2, 2), (3, 3)])
    # example 0: over both rows B is better, over the only row it covers (row 0) it is worse
    assert ce(pb, [(0, 0), (1, 1)]) < ce(PA, [(0, 0), (1, 1)])
    assert ce(pb, [(0, 0)]) > ce(PA, [(0, 0), (1, 1)])
    full = MultiTeacher([Fixed(PA), Fixed(pb, torch.ones(4, dtype=torch.bool))], mode="select")
    torch.testing.assert_close(_p(full.signal(LABELS)), pb, rtol=1e-5, atol=1e-6)
    assert full.selected_counts == [0, 2]
    part = MultiTeacher([Fixed(PA), Fixed(pb, VALID_B)], mode="select")  # B silent on row 1
    torch.testing.assert_close(_p(part.signal(LABELS)), torch.stack([PA[0], PA[1], pb[2], pb[3]]), rtol=1e-5, atol=1e-6)
    assert part.selected_counts == [1, 1]


def test_partial_teachers_alone_are_refused():
    with pytest.raises(PotstillError, match="shares the student's tokenizer"):
        MultiTeacher([Fixed(PB, VALID_B), Fixed(PA, VALID_B)])


def test_kd_loss_with_a_cross_tokenizer_extra_teacher_matches_a_row_by_row_reference(
    tiny_tokenizer, tiny_student, tiny_teacher, teacher_tok, other_teacher, tmp_path
):
    """KDTrainer + MultiTeacher(same-tokenizer teacher, other-tokenizer teacher), forward KL, T = 2."""
    from datasets import Dataset

    from potstill.kd import KDConfig, KDTrainer

    T = 2.0
    v_s = len(tiny_tokenizer)
    batch, feats = _batch(tiny_tokenizer)
    mt = MultiTeacher(
        [
            OnlineTeacher(tiny_teacher),
            CrossTokenizerTeacher(other_teacher, teacher_tok, tiny_tokenizer, student_vocab=v_s, temperature=T),
        ],
        mode="mean",
        temperature=T,
    )
    args = KDConfig(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        alpha=0.0,
        temperature=T,
        divergence="forward_kl",
        disable_tqdm=True,
    )
    tr = KDTrainer(
        model=tiny_student,
        args=args,
        signal_source=mt,
        train_dataset=Dataset.from_list(feats),
        processing_class=tiny_tokenizer,
    )
    tiny_student.train()
    got = tr.compute_loss(tiny_student, batch)

    ref_b = _reference_projection(other_teacher, tiny_tokenizer, teacher_tok, feats, mt.sources[1].vocab_map, v_s, T)
    labels = batch["labels"]
    s_logits = tiny_student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    with torch.no_grad():
        t_logits = tiny_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, k = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p_a = torch.softmax(t_logits[b, t, :v_s] / T, -1)
            p = p_a if ref_b[k] is None else (p_a + ref_b[k]) / 2
            q = torch.log_softmax(s_logits[b, t] / T, -1)
            total = total + (p * (p.clamp_min(1e-300).log() - q)).sum()
            k += 1
    want = total / k
    if args.scale_t2:
        want = want * T * T
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_vocab_map_is_built_once_and_kinds_are_checked(tiny_tokenizer, teacher_tok, other_teacher):
    vm = build_vocab_map(teacher_tok, tiny_tokenizer, student_vocab=len(tiny_tokenizer))
    src = CrossTokenizerTeacher(
        other_teacher, teacher_tok, tiny_tokenizer, student_vocab=len(tiny_tokenizer), vocab_map=vm, kinds=["exact"]
    )
    assert src.vocab_map is vm and src.kinds == ("exact",)
    with pytest.raises(PotstillError, match="not vocab-map match kinds"):
        CrossTokenizerTeacher(
            other_teacher, teacher_tok, tiny_tokenizer, student_vocab=len(tiny_tokenizer), vocab_map=vm, kinds=["fuzzy"]
        )
