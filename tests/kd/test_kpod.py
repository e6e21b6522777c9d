"""KPOD-style rationale KD (potstill.kd.keypoint, potstill.runners.keypoint): the teacher's answer significance
of rationale tokens against a direct float64 computation, the keypoint weights' closed form, the progressive
step mask at its ends, the trainer's loss against a hand-weighted sum, and the recipe."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import kd_cfg

from potstill.data import PadCollator, encode_example
from potstill.data.collate import place_token_columns
from potstill.data.rationale import arithmetic_problems, rationale_pairs, rationale_steps
from potstill.errors import PotstillError
from potstill.kd import KDTrainer
from potstill.kd.keypoint import (
    ANSWER,
    RATIONALE,
    TAIL,
    answer_significance,
    keypoint_weights,
    progressive_fraction,
    rationale_row_weights,
    response_layout,
)
from potstill.recipes.methods import RunConfig
from potstill.runners.keypoint import keypoint_examples, mask_token_id

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


def _examples(tok, n=4, level=3):
    """cot examples of the arithmetic task as ``encode_pairs`` gives them (with ``reference``)."""
    pairs = rationale_pairs(arithmetic_problems(n, seed=0, level=level), "cot")
    out = []
    for i, p in enumerate(pairs):
        ex = encode_example(tok, p["messages"], p["response"], 160)
        out.append({**ex, "reference": p["response"], "example_id": i})
    return out


def _layout(tok, ex):
    n_prompt = len(ex["prompt_ids"])
    rationale, _, rest = ex["reference"].rpartition(" The answer is ")
    return response_layout(tok, ex["input_ids"][n_prompt:], rationale, ex["reference"])


# ------------------------------------------------------------------------------------------- layout, steps


def test_steps_are_sentences_or_lines():
    r = "7 + 5 = 12. 12 * 3 = 36. 36 - 4 = 32."
    assert [r[a:b] for a, b in rationale_steps(r)] == ["7 + 5 = 12.", " 12 * 3 = 36.", " 36 - 4 = 32."]
    g = "He has 3.5 apples. So\nhe eats 1.\nNow 2.5 left."
    assert [g[a:b] for a, b in rationale_steps(g)] == ["He has 3.5 apples. So", "\nhe eats 1.", "\nNow 2.5 left."]


def test_layout_puts_each_token_in_its_step(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = _examples(tok, 1)[0]
    lay = _layout(tok, ex)
    resp = ex["input_ids"][len(ex["prompt_ids"]) :]
    assert lay.steps == 3 and len(lay.kind) == len(resp)
    # rationale first, then the answer phrase, then the template's end tokens
    assert lay.kind == sorted(lay.kind) and set(lay.kind) == {RATIONALE, ANSWER, TAIL}
    text = {k: tok.decode([resp[j] for j in range(len(resp)) if lay.kind[j] == k]) for k in (RATIONALE, ANSWER)}
    rationale = ex["reference"].rpartition(" The answer is ")[0]
    assert text[RATIONALE] == rationale and text[ANSWER] == ex["reference"][len(rationale) :]
    spans = rationale_steps(rationale)
    for rank in (1, 2, 3):  # rank 1 = the last step
        a, b = spans[3 - rank]
        assert tok.decode([resp[j] for j in range(len(resp)) if lay.rank[j] == rank]) == rationale[a:b]


# ------------------------------------------------------------------------------------------- significance


def _answer_loglik64(model, ids: list[int], answer: list[int]) -> float:
    """log p(answer tokens | everything before them) from one float64 forward with full logits."""
    x = torch.tensor([ids])
    logp = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].double().log_softmax(-1)
    return sum(float(logp[j - 1, ids[j]]) for j in answer)


def test_significance_equals_direct_float64_log_likelihoods(tiny_teacher, tiny_tokenizer):
    tok, teacher = tiny_tokenizer, tiny_teacher
    ex = _examples(tok, 1)[0]
    lay, n_prompt = _layout(tok, ex), len(ex["prompt_ids"])
    rat = [n_prompt + j for j in lay.rationale]
    ans = [n_prompt + j for j in lay.answer]
    mask = mask_token_id(tok)
    assert mask == tok.pad_token_id  # the tiny tokenizer has no unk token
    s = answer_significance(teacher, ex["input_ids"], rat, ans, mask, batch_size=5)  # 5: chunks split unevenly
    ref_model = copy.deepcopy(teacher).double()
    with torch.no_grad():
        base = _answer_loglik64(ref_model, ex["input_ids"], ans)
        want = []
        for j in rat:
            ids = list(ex["input_ids"])
            ids[j] = mask
            want.append(base - _answer_loglik64(ref_model, ids, ans))
    assert s.dtype == torch.float64 and s.shape == (len(rat),)
    torch.testing.assert_close(s, torch.tensor(want, dtype=torch.float64), rtol=0, atol=2e-4)
    assert float(s.abs().max()) > 1e-3  # the random teacher's answer does depend on its rationale


def test_keypoint_weights_closed_form():
    s = torch.tensor([2.0, 0.0, -1.0, 1.0], dtype=torch.float64)
    w = keypoint_weights(s, 1.0)
    # clipped [2, 0, 0, 1], mean 0.75: w = (1 + s / 0.75) / 2
    torch.testing.assert_close(w, torch.tensor([(1 + 2 / 0.75) / 2, 0.5, 0.5, (1 + 1 / 0.75) / 2]))
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(keypoint_weights(s, 3.0).mean()) == pytest.approx(1.0)
    assert keypoint_weights(s, 0.0).tolist() == [1.0] * 4  # lambda 0: plain KD
    assert keypoint_weights(torch.tensor([-1.0, 0.0]), 2.0).tolist() == [1.0, 1.0]  # nothing significant
    with pytest.raises(PotstillError, match="scale"):
        keypoint_weights(s, -1.0)


def test_runner_caches_by_content_and_lambda_zero_is_plain(tiny_teacher, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    exs = _examples(tok, 3)
    other = {**encode_example(tok, [{"role": "user", "content": "Hi"}], "hola", 64), "reference": "hola"}
    out, counts = keypoint_examples(
        exs + [other], tiny_teacher, tok, weighting=True, scale=1.0, batch_size=8, cache_dir=tmp_path
    )
    assert counts["measured"] == 3 and counts["no_rationale"] == 1 and counts["cached"] == 0
    for ex in out:
        assert {len(ex[k]) for k in ("kd_token_weights", "kd_step_rank", "kd_num_steps")} == {len(ex["input_ids"])}
    lay = _layout(tok, exs[0])
    w = torch.tensor(out[0]["kd_token_weights"][len(exs[0]["prompt_ids"]) :])
    assert float(w[lay.rationale].mean()) == pytest.approx(1.0, abs=1e-6)
    assert w[[j for j, k in enumerate(lay.kind) if k != RATIONALE]].tolist() == [1.0] * (len(w) - len(lay.rationale))
    assert out[3]["kd_token_weights"][len(other["prompt_ids"]) :] == [1.0] * len(other["response_ids"])
    again, counts2 = keypoint_examples(exs, tiny_teacher, tok, weighting=True, scale=1.0, cache_dir=tmp_path)
    assert counts2["cached"] == 3 and counts2["measured"] == 0
    assert [e["kd_token_weights"] for e in again] == [e["kd_token_weights"] for e in out[:3]]
    flat, _ = keypoint_examples(exs, tiny_teacher, tok, weighting=True, scale=0.0, cache_dir=tmp_path)
    for ex in flat:
        n = len(ex["prompt_ids"])
        assert ex["kd_token_weights"] == [0.0] * n + [1.0] * (len(ex["input_ids"]) - n)
    with pytest.raises(PotstillError, match="mode cot"):
        keypoint_examples([other], tiny_teacher, tok, weighting=True)


# ------------------------------------------------------------------------------------------- progressive mask


def test_progressive_fraction_and_step_mask_at_both_ends(tiny_tokenizer):
    tok = tiny_tokenizer
    assert progressive_fraction(0.0, 0.25, 0.5) == 0.25 and progressive_fraction(0.25, 0.25, 0.5) == 0.625
    assert progressive_fraction(0.5, 0.25, 0.5) == 1.0 and progressive_fraction(0.9, 0.25, 0.0) == 1.0
    exs, _ = keypoint_examples(_examples(tok, 3, level=4), None, tok, weighting=False)
    batch = PadCollator(tok.pad_token_id)(exs)
    layouts = [_layout(tok, ex) for ex in exs]
    # the rows of the loss, in order: example by example, response tokens after the first
    kinds, ranks = [], []
    for lay in layouts:
        assert lay.steps == 4
        kinds += lay.kind
        ranks += lay.rank
    assert int((batch["labels"][:, 1:] != -100).sum()) == len(kinds)
    at_start = rationale_row_weights(batch, keypoint=False, fraction=progressive_fraction(0.0, 0.25, 0.5))
    # ceil(0.25 * 4) = 1: only the last step of each rationale, and every answer / end token
    assert at_start.tolist() == [1.0 if k != RATIONALE or r == 1 else 0.0 for k, r in zip(kinds, ranks)]
    half = rationale_row_weights(batch, keypoint=False, fraction=0.5)
    assert half.tolist() == [1.0 if k != RATIONALE or r <= 2 else 0.0 for k, r in zip(kinds, ranks)]
    at_end = rationale_row_weights(batch, keypoint=False, fraction=progressive_fraction(1.0, 0.25, 0.5))
    assert at_end.tolist() == [1.0] * len(kinds)
    assert rationale_row_weights(batch, keypoint=False, fraction=None) is None
    with pytest.raises(PotstillError, match="kd_step_rank"):
        rationale_row_weights({"labels": batch["labels"]}, keypoint=False, fraction=0.5)


def test_token_columns_sit_under_the_labels_when_packed_too(tiny_tokenizer):
    tok = tiny_tokenizer
    exs, _ = keypoint_examples(_examples(tok, 2), None, tok, weighting=False)
    n0, n1 = (len(e["input_ids"]) for e in exs)
    cols = place_token_columns(exs, [(0, 0), (0, n0)], (1, n0 + n1 + 3))  # both in one row, then padding
    rank = cols["kd_step_rank"][0]
    assert rank[:n0].tolist() == exs[0]["kd_step_rank"] and rank[n0 : n0 + n1].tolist() == exs[1]["kd_step_rank"]
    assert rank[n0 + n1 :].tolist() == [0, 0, 0] and cols["kd_token_weights"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- the trainer's loss


def _weighted_reference(student, teacher, batch, w_rows: torch.Tensor) -> torch.Tensor:
    """sum_t w_t KL(p_t || q_t) / N in float64 from full logits (alpha 0, T 1)."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    valid = batch["labels"][:, 1:] != -100
    pt = F.softmax(t[valid], -1)
    kl = (pt * (pt.log() - F.log_softmax(s[valid], -1))).sum(-1)
    return (w_rows.double() * kl).sum() / valid.sum()


@pytest.mark.parametrize("mode", ["keypoint", "progressive", "both"])
def test_kd_loss_equals_hand_weighted_sum_and_differs_from_plain(tiny_llama_pair, tmp_path, mode):
    teacher, student, tok = tiny_llama_pair
    exs, _ = keypoint_examples(_examples(tok, 4, level=4), teacher, tok, weighting=True, scale=2.0)
    batch = PadCollator(tok.pad_token_id)(exs)
    args = {}
    if mode in ("keypoint", "both"):
        args["token_weighting"] = "keypoint"
    if mode in ("progressive", "both"):
        args.update(curriculum="progressive_rationale", progressive_start=0.25, progressive_ramp=0.5)
    tr = KDTrainer(model=student, teacher_model=teacher, args=kd_cfg(tmp_path, max_steps=10, **args),
                   processing_class=tok, train_dataset=None)  # fmt: skip
    tr.state.max_steps, tr.state.global_step = 10, 0
    loss = tr.compute_loss(student, batch)
    # the rows' factors, written out from the example columns (label j + 1 is predicted at row j)
    w_rows, keep_rows = [], []
    for ex in exs:
        for j in range(1, len(ex["labels"])):
            if ex["labels"][j] == -100:
                continue
            w_rows.append(ex["kd_token_weights"][j])
            rank, steps = ex["kd_step_rank"][j], ex["kd_num_steps"][j]
            keep_rows.append(1.0 if rank == 0 or rank <= math.ceil(0.25 * steps) else 0.0)
    w = torch.ones(len(w_rows), dtype=torch.float64)
    if mode in ("keypoint", "both"):
        w = w * torch.tensor(w_rows, dtype=torch.float64)
    if mode in ("progressive", "both"):
        w = w * torch.tensor(keep_rows, dtype=torch.float64)
    assert float(w.min()) < 0.99  # the factors are not all 1 on this case
    ref = _weighted_reference(student, teacher, batch, w)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    plain = _weighted_reference(student, teacher, batch, torch.ones_like(w))
    assert abs(float(loss) - float(plain)) > 1e-3 * float(plain)  # not plain KD
    if mode == "progressive":  # at the end of the ramp every step is back: plain KD
        tr.state.global_step = 5
        torch.testing.assert_close(tr.compute_loss(student, batch).double(), plain, rtol=1e-5, atol=1e-7)


def test_keypoint_weights_need_their_column(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    tr = KDTrainer(model=student, teacher_model=teacher, args=kd_cfg(tmp_path, token_weighting="keypoint"),
                   processing_class=tok, train_dataset=None)  # fmt: skip
    batch = PadCollator(tok.pad_token_id)(_examples(tok, 2))
    with pytest.raises(PotstillError, match="kd_token_weights"):
        tr.compute_loss(student, batch)
    with pytest.raises(PotstillError, match="progressive"):
        kd_cfg(tmp_path, curriculum="progressive_rationale", progressive_start=0.0)


# ------------------------------------------------------------------------------------------- recipe


def test_recipe_validates_and_bad_shapes_are_refused():
    import potstill

    r = potstill.load_recipe(REPO / "recipes" / "rationale_kpod.yaml")
    run = r.runs[1]
    assert run.token_weighting == "keypoint" and run.curriculum == "progressive_rationale"
    assert (run.keypoint.scale, run.keypoint.start_fraction, run.keypoint.ramp) == (1.0, 0.25, 0.5)
    assert r.data.source.mode == "cot" and r.runs[0].keypoint is None
    assert "keypoint" not in r.runs[0].flat_dump()  # old runs' fingerprints unchanged
    with pytest.raises(ValueError, match="neither token_weighting keypoint"):
        RunConfig.model_validate({"name": "a", "method": {"kind": "kd", "keypoint": {"scale": 1.0}}})
    with pytest.raises(ValueError, match="needs method kind kd"):
        RunConfig.model_validate({"name": "a", "method": {"kind": "on_policy", "token_weighting": "keypoint"}})
    with pytest.raises(ValueError, match="start_fraction"):
        RunConfig.model_validate(
            {
                "name": "a",
                "method": {"kind": "kd", "curriculum": "progressive_rationale", "keypoint": {"start_fraction": 0}},
            }
        )


def test_columns_reach_the_loss_through_the_trainers_dataloader(tiny_llama_pair, tmp_path):
    """Two SGD steps through Trainer.train(): the dataset's columns survive the dataloader and the collator,
    and the KPOD run's student differs from the plain run's."""
    from datasets import Dataset

    teacher, student, tok = tiny_llama_pair
    exs, _ = keypoint_examples(_examples(tok, 8, level=3), teacher, tok, weighting=True, scale=2.0)
    cols = ("input_ids", "attention_mask", "labels", "kd_token_weights", "kd_step_rank", "kd_num_steps")
    ds = Dataset.from_list([{k: ex[k] for k in cols} for ex in exs])
    kpod = dict(token_weighting="keypoint", curriculum="progressive_rationale")
    trained = []
    for kw in ({}, kpod):
        model = copy.deepcopy(student)
        tr = KDTrainer(model=model, teacher_model=teacher, args=kd_cfg(tmp_path, max_steps=2, **kw),
                       train_dataset=ds, processing_class=tok)  # fmt: skip
        seen = []
        real = tr._kd_weights
        tr._kd_weights = lambda *a, _s=seen, _r=real, **k: _s.append(_r(*a, **k)) or _s[-1]
        tr.train()
        assert len(seen) == 2 and (seen[0] is None) == (not kw)
        if kw:  # step 0: only the last of 3 steps and the answer; the weights are the keypoint ones there
            assert float(seen[0].min()) == 0.0 and float(seen[0].max()) > 1.0
        trained.append(model)
    diff = max(float((a - b).abs().max()) for a, b in zip(trained[0].parameters(), trained[1].parameters()))
    assert diff > 1e-6
