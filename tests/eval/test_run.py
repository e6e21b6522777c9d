"""evaluate_runs on tiny random Llamas: closed forms, an independent reference, call counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import potstill.models
from potstill.errors import PotstillError, VocabMismatchError
from potstill.eval.metrics import distinct_n
from potstill.eval.run import GENERATIONS_KEY, METRIC_KEYS, collect_samples, evaluate_runs, metrics_only

from .tiny import make_examples, make_llama


@pytest.fixture(scope="module")
def teacher():
    return make_llama(seed=0, hidden=32, layers=2)


@pytest.fixture(scope="module")
def other():
    return make_llama(seed=1, hidden=32, layers=1)


def _run(students, teacher, tok, examples, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("progress", False)
    return evaluate_runs(students, teacher, tok, examples, **kw)


def _reference_stats(student, teacher, examples):
    """Per-example, unbatched, float64: mean forward KL, agreement, perplexity (independent code)."""
    kl, agree, nll, n = 0.0, 0, 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["prompt_ids"] + ex["response_ids"]])
        p0 = len(ex["prompt_ids"])
        with torch.no_grad():
            lt = teacher(ids).logits[0].double()
            ls = student(ids).logits[0].double()
        for pos, tok in enumerate(ex["response_ids"]):
            row = p0 + pos - 1  # logits at row predict the token at row + 1
            p = torch.softmax(lt[row], -1)
            kl += float((p * (torch.log(p) - torch.log_softmax(ls[row], -1))).sum())
            agree += int(lt[row].argmax() == ls[row].argmax())
            nll -= float(torch.log_softmax(ls[row], -1)[tok])
            n += 1
    return kl / n, agree / n, math.exp(nll / n)


def test_self_student_is_zero_and_other_student_matches_reference(teacher, other, word_tokenizer):
    examples = make_examples(word_tokenizer, n=5)
    same = copy.deepcopy(teacher)
    res = _run({"same": same, "other": other}, teacher, word_tokenizer, examples)

    assert list(res) == ["teacher", "same", "other"]
    for name, run in res.items():
        assert set(run) == set(METRIC_KEYS) | {GENERATIONS_KEY}
        assert isinstance(run["params"], int)
        for key in ("forward_kl", "top1_agreement", "perplexity", "rouge_l", "tokens_per_s"):
            assert type(run[key]) is float, (name, key)
        assert len(run[GENERATIONS_KEY]) == len(examples)
        for n in (1, 2):  # diversity of the very generations reported (nan only if they hold no n-gram)
            want = distinct_n(run[GENERATIONS_KEY], n)
            assert run[f"distinct_{n}"] == pytest.approx(want, nan_ok=True)

    for name in ("teacher", "same"):
        assert abs(res[name]["forward_kl"]) < 1e-6
        assert res[name]["top1_agreement"] == 1.0
    assert res["same"]["perplexity"] == pytest.approx(res["teacher"]["perplexity"], rel=1e-6)
    assert res["same"][GENERATIONS_KEY] == res["teacher"][GENERATIONS_KEY]
    assert res["same"]["rouge_l"] == res["teacher"]["rouge_l"]
    assert res["same"]["params"] == res["teacher"]["params"] > res["other"]["params"]

    kl, agree, ppl = _reference_stats(other, teacher, examples)
    assert res["other"]["forward_kl"] > 0.01
    assert res["other"]["forward_kl"] == pytest.approx(kl, rel=1e-4)
    assert res["other"]["top1_agreement"] == pytest.approx(agree)
    assert res["other"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    _, _, teacher_ppl = _reference_stats(teacher, teacher, examples)
    assert res["teacher"]["perplexity"] == pytest.approx(teacher_ppl, rel=1e-4)
    assert res["other"]["ece"] == pytest.approx(_reference_ece(other, examples), abs=1e-6)
    assert res["same"]["ece"] == pytest.approx(res["teacher"]["ece"])


def _reference_ece(model, examples, n_bins=15):
    """ECE of next-token predictions vs the reference tokens, written from Guo et al.'s definition."""
    confs, hits = [], []
    for ex in examples:
        ids = torch.tensor([ex["prompt_ids"] + ex["response_ids"]])
        p0 = len(ex["prompt_ids"])
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0].double(), -1)
        for pos, tok in enumerate(ex["response_ids"]):
            row = probs[p0 + pos - 1]
            confs.append(float(row.max()))
            hits.append(float(int(row.argmax()) == tok))
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(confs) if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            acc = sum(hits[i] for i in members) / len(members)
            conf = sum(confs[i] for i in members) / len(members)
            total += len(members) / len(confs) * abs(acc - conf)
    return total


def test_rouge_l_is_one_against_own_greedy_output(teacher, word_tokenizer):
    examples = make_examples(word_tokenizer, n=4, seed=3)
    for ex in examples:  # reference := the teacher's own unbatched greedy continuation
        out = teacher.generate(
            torch.tensor([ex["prompt_ids"]]), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=1
        )
        ex["reference"] = word_tokenizer.decode(out[0, len(ex["prompt_ids"]) :], skip_special_tokens=True)
        assert ex["reference"].strip(), "setup: the teacher should generate some words"
    res = _run({"copy": copy.deepcopy(teacher)}, teacher, word_tokenizer, examples, max_new_tokens=5, batch_size=4)
    assert res["teacher"]["rouge_l"] == pytest.approx(1.0)
    assert res["copy"]["rouge_l"] == pytest.approx(1.0)


def test_left_padded_batched_generation_equals_unbatched(teacher, word_tokenizer):
    examples = make_examples(word_tokenizer, n=5, seed=7)
    assert len({len(ex["prompt_ids"]) for ex in examples}) > 1  # the batch needs padding
    batched = _run({}, teacher, word_tokenizer, examples, batch_size=5, max_new_tokens=8)
    single = _run({}, teacher, word_tokenizer, examples, batch_size=1, max_new_tokens=8)
    assert batched["teacher"][GENERATIONS_KEY] == single["teacher"][GENERATIONS_KEY]
    for ex, text in zip(examples, batched["teacher"][GENERATIONS_KEY]):
        out = teacher.generate(
            torch.tensor([ex["prompt_ids"]]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=1
        )
        new = out[0, len(ex["prompt_ids"]) :].tolist()
        if 1 in new:
            new = new[: new.index(1)]
        assert text == word_tokenizer.decode(new, skip_special_tokens=True)
    # right-padded teacher-forced metrics do not depend on the batching either
    for key in ("perplexity",):
        assert batched["teacher"][key] == pytest.approx(single["teacher"][key], rel=1e-5)


def test_teacher_forward_runs_once_per_batch(teacher, word_tokenizer, monkeypatch):
    examples = make_examples(word_tokenizer, n=5)
    real = potstill.models.final_hidden
    forced: list[object] = []

    def counting(model, *args, **kwargs):
        forced.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(potstill.models, "final_hidden", counting)
    forwards = []
    handle = teacher.register_forward_hook(lambda *a: forwards.append(1))
    try:
        counts = {}
        for n_students in (1, 3):
            forced.clear()
            forwards.clear()
            students = {f"s{i}": make_llama(seed=10 + i) for i in range(n_students)}
            _run(students, teacher, word_tokenizer, examples, batch_size=2, max_new_tokens=3)
            n_batches = 3
            assert sum(m is teacher for m in forced) == n_batches
            assert sum(m is s for m in forced for s in students.values()) == n_batches * n_students
            counts[n_students] = len(forwards)
    finally:
        handle.remove()
    assert counts[1] == counts[3]  # teacher-forced + generation calls, independent of students


def test_vocab_padding_rows_are_aligned(teacher, word_tokenizer):
    examples = make_examples(word_tokenizer, n=4)
    padded = make_llama(seed=5, vocab=72)
    trimmed = make_llama(seed=5, vocab=64)
    with torch.no_grad():
        trimmed.get_input_embeddings().weight.copy_(padded.get_input_embeddings().weight[:64])
        trimmed.get_output_embeddings().weight.copy_(padded.get_output_embeddings().weight[:64])
        for (_, a), (_, b) in zip(trimmed.model.layers.named_parameters(), padded.model.layers.named_parameters()):
            a.copy_(b)
        trimmed.model.norm.weight.copy_(padded.model.norm.weight)
    res = _run({"padded": padded, "trimmed": trimmed}, teacher, word_tokenizer, examples, max_new_tokens=2)
    for key in ("forward_kl", "top1_agreement", "perplexity"):
        assert res["padded"][key] == pytest.approx(res["trimmed"][key], rel=1e-5), key
    assert res["padded"]["forward_kl"] > 0
    # a padded teacher is aligned the same way: its own row is unchanged
    padded_teacher = make_llama(seed=5, vocab=72)
    res2 = _run({"trimmed": trimmed}, padded_teacher, word_tokenizer, examples, max_new_tokens=2)
    res3 = _run({"padded": padded}, trimmed, word_tokenizer, examples, max_new_tokens=2)
    assert res2["teacher"]["perplexity"] == pytest.approx(res3["teacher"]["perplexity"], rel=1e-5)
    assert res2["trimmed"]["forward_kl"] == pytest.approx(0.0, abs=1e-6)
    assert res3["padded"]["forward_kl"] == pytest.approx(0.0, abs=1e-6)

    with pytest.raises(VocabMismatchError, match="vocab_size"):
        _run({"padded": padded}, teacher, word_tokenizer, examples, vocab_size=72)
    small = make_llama(seed=6, vocab=60)  # smaller than the tokenizer: not a padding difference
    with pytest.raises(PotstillError, match="resize"):
        _run({"small": small}, teacher, word_tokenizer, examples)


def test_bad_input_errors(teacher, word_tokenizer):
    with pytest.raises(PotstillError, match="no evaluation examples; check the eval split"):
        _run({}, teacher, word_tokenizer, [])
    examples = make_examples(word_tokenizer, n=1)
    with pytest.raises(PotstillError, match="reserved"):
        _run({"teacher": teacher}, teacher, word_tokenizer, examples)
    with pytest.raises(PotstillError, match="lacks reference"):
        _run({}, teacher, word_tokenizer, [{"prompt_ids": [3], "response_ids": [1]}])


def test_training_modes_restored(word_tokenizer):
    teacher = make_llama(seed=0)
    student = make_llama(seed=1)
    student.train()
    student.model.layers[0].mlp.eval()  # a deliberately frozen submodule stays in eval
    _run({"s": student}, teacher, word_tokenizer, make_examples(word_tokenizer, n=2), max_new_tokens=2)
    assert not teacher.training
    assert student.training and student.model.training
    assert not student.model.layers[0].mlp.training


def test_samples_and_metrics_only(teacher, word_tokenizer):
    examples = make_examples(word_tokenizer, n=5)
    res = _run({"same": teacher}, teacher, word_tokenizer, examples, max_new_tokens=2)
    assert res["same"] == res["teacher"]  # the same object is evaluated once
    samples = collect_samples(res, examples, k=3, tokenizer=word_tokenizer)
    assert len(samples) == 3
    assert samples[0]["prompt"].startswith("w")  # decoded without <user>/<bot>
    assert samples[-1]["reference"] == examples[-1]["reference"]
    assert set(samples[0]["outputs"]) == {"teacher", "same"}
    only = metrics_only(res)
    assert all(GENERATIONS_KEY not in run for run in only.values())


def test_end_to_end_report(teacher, other, word_tokenizer, tmp_path):
    from potstill.eval.report import read_metrics, write_report

    examples = make_examples(word_tokenizer, n=3)
    res = _run({"other": other}, teacher, word_tokenizer, examples, max_new_tokens=3)
    samples = collect_samples(res, examples, k=2, tokenizer=word_tokenizer)
    paths = write_report(tmp_path, res, loss_curves={"other": [(0, 1.0), (1, 0.5)]}, title="e2e", samples=samples)
    assert len(paths) == 4
    assert read_metrics(tmp_path / "metrics.json") == metrics_only(res)
    assert res["other"][GENERATIONS_KEY][-1] in (tmp_path / "report.md").read_text()


def test_zero_new_tokens_skips_generation_and_keeps_teacher_forced_metrics(teacher, other, word_tokenizer, monkeypatch):
    examples = make_examples(word_tokenizer, n=5)
    full = _run({"other": other}, teacher, word_tokenizer, examples)

    def no_generate(*a, **k):
        raise AssertionError("generate must not run with max_new_tokens=0")

    monkeypatch.setattr("potstill.generate.generate", no_generate)
    res = _run({"other": other}, teacher, word_tokenizer, examples, max_new_tokens=0)
    for name in ("teacher", "other"):
        for key in ("forward_kl", "top1_agreement", "perplexity"):
            assert res[name][key] == full[name][key]
        assert math.isnan(res[name]["rouge_l"]) and math.isnan(res[name]["tokens_per_s"])
        assert res[name][GENERATIONS_KEY] == [""] * len(examples)
