"""Rationale distillation data: the arithmetic task, GSM8K loading, multi-task pairs, answer extraction."""

import json
import operator
import os
import re
from pathlib import Path

import pytest

from potstill.data.rationale import (
    ANSWER_PREFIX,
    RATIONALE_PREFIX,
    Problem,
    arithmetic_problems,
    data_root,
    exact_match,
    extract_answer,
    inference_prompt,
    load_gsm8k,
    rationale_pairs,
    subset,
)
from potstill.errors import PotstillError

STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
VERB = {"add": "+", "subtract": "-", "multiply by": "*"}

REAL_GSM8K = (
    Path(os.environ.get("POTSTILL_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
    / "gsm8k"
    / "train.jsonl"
)


# ---- arithmetic_problems -------------------------------------------------------------------------


def test_arithmetic_is_deterministic_and_prefix_stable():
    a = arithmetic_problems(50, seed=3, level=3)
    assert a == arithmetic_problems(50, seed=3, level=3)
    assert arithmetic_problems(7, seed=3, level=3) == a[:7]
    assert arithmetic_problems(1, seed=3, level=3) == a[:1]
    assert arithmetic_problems(50, seed=4, level=3) != a
    assert len({p.question for p in a}) > 40  # not one problem repeated


def test_arithmetic_golden_values():
    # Pinned output: fails if the seeding goes through hash() (randomized per process) or the
    # generator changes, either of which would silently change every benchmark's data.
    assert arithmetic_problems(2, seed=0, level=3) == [
        Problem(
            "Start with 16. Subtract 17, then subtract 13, then add 18. What is the result?",
            "16 - 17 = -1. -1 - 13 = -14. -14 + 18 = 4.",
            "4",
        ),
        Problem(
            "Start with 12. Subtract 19, then subtract 1, then add 19. What is the result?",
            "12 - 19 = -7. -7 - 1 = -8. -8 + 19 = 11.",
            "11",
        ),
    ]


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_every_rationale_reevaluates_and_matches_question(level):
    for p in arithmetic_problems(200, seed=11, level=level):
        steps = STEP.findall(p.rationale)
        assert len(steps) == level, p
        assert " ".join(f"{x} {op} {y} = {z}." for x, op, y, z in steps) == p.rationale
        start = int(steps[0][0])
        assert 1 <= start <= 20
        assert p.question.startswith(f"Start with {start}. ") and p.question.endswith(" What is the result?")
        value = start
        verbs = re.findall(r"(add|subtract|multiply by) (\d+)", p.question, flags=re.IGNORECASE)
        assert len(verbs) == level
        for (x, op, y, z), (verb, arg) in zip(steps, verbs):
            assert int(x) == value  # each step continues from the previous result
            assert VERB[verb.lower()] == op and arg == y
            assert int(z) == OPS[op](int(x), int(y))
            assert (1 <= int(y) <= 20) if op in "+-" else (2 <= int(y) <= 5)
            assert -99 <= int(z) <= 999
            value = int(z)
        assert p.answer == str(value)


def test_arithmetic_example_shape():
    p = arithmetic_problems(1, seed=0, level=1)[0]
    assert re.fullmatch(r"Start with \d+\. (Add|Subtract|Multiply by) \d+\. What is the result\?", p.question)
    q = arithmetic_problems(1, seed=0, level=3)[0].question
    assert q.count(", then ") == 2


def test_arithmetic_uses_all_ops_and_reaches_range_edges():
    probs = arithmetic_problems(400, seed=0, level=5)
    ops = {op for p in probs for _, op, _, _ in STEP.findall(p.rationale)}
    assert ops == {"+", "-", "*"}
    assert any(int(p.answer) < 0 for p in probs)
    assert any(int(p.answer) > 99 for p in probs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n": 0}, "n >= 1"), ({"n": 3, "level": 0}, "level"), ({"n": 3, "level": 6}, r"1\.\.5")],
)
def test_arithmetic_rejects_bad_arguments(kwargs, match):
    n = kwargs.pop("n")
    with pytest.raises(PotstillError, match=match):
        arithmetic_problems(n, **kwargs)


# ---- load_gsm8k ----------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_gsm8k_strips_annotations_and_commas(tmp_path):
    rows = [
        {
            "question": "  Natalia sold 48 clips in April and half as many in May. How many? ",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72",
        },
        {"question": "How many grams?", "answer": "It is 10*100 = <<10*100=1000>>1000  grams.\n\n#### 1,000"},
        {"question": "Debt?", "answer": "She owes 3 dollars.\n#### -3 "},
    ]
    path = _write_jsonl(tmp_path / "g.jsonl", rows + [""])  # a trailing blank line is skipped
    got = load_gsm8k(path)
    assert got == [
        Problem(
            "Natalia sold 48 clips in April and half as many in May. How many?",
            "Natalia sold 48/2 = 24 clips in May. In total 48+24 = 72 clips.",
            "72",
        ),
        Problem("How many grams?", "It is 10*100 = 1000 grams.", "1000"),
        Problem("Debt?", "She owes 3 dollars.", "-3"),
    ]
    assert load_gsm8k(str(path), limit=2) == got[:2]


@pytest.mark.skipif(not REAL_GSM8K.exists(), reason="GSM8K train.jsonl not in the shared data directory")
def test_load_real_gsm8k():
    probs = load_gsm8k(REAL_GSM8K)
    assert len(probs) == 7473
    assert probs[0].answer == "72"
    assert probs[0].rationale == (
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert not any("<<" in p.rationale or "\n" in p.rationale or "####" in p.rationale for p in probs)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in probs)
    assert load_gsm8k(REAL_GSM8K, limit=5) == probs[:5]


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], "no rows"),
        (["", "  "], "no rows"),
        ([{"question": "q", "answer": "a\n#### 1"}, "{not json"], "line 2 is not JSON"),
        ([{"question": "q"}], r"line 1 lacks.*'answer'.*found \['question'\]"),
        ([["q", "a"]], "line 1 lacks"),
        ([{"question": "q", "answer": "a\n#### 1"}, {"question": "q", "answer": "just 5"}], "line 2.*'#### <number>'"),
        ([{"question": "q", "answer": "a\n####  "}], "line 1.*'#### <number>'"),
    ],
)
def test_load_gsm8k_errors_name_the_problem(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    if lines:
        _write_jsonl(path, lines)
    else:
        path.write_text("")
    with pytest.raises(PotstillError, match=match) as err:
        load_gsm8k(path)
    assert "\n" not in str(err.value) and "; " in str(err.value)  # one line: problem; fix


def test_load_gsm8k_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(PotstillError, match="does not exist.*POTSTILL_DATA"):
        load_gsm8k(tmp_path / "nope.jsonl")
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a\n#### 1"}])
    with pytest.raises(PotstillError, match="limit"):
        load_gsm8k(path, limit=0)


def test_data_root_reads_env(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv("POTSTILL_DATA", str(tmp_path / "missing"))
    with pytest.raises(PotstillError, match="POTSTILL_DATA"):
        data_root()


# ---- pairs ---------------------------------------------------------------------------------------

PROBS = [
    Problem("Start with 2. Add 3. What is the result?", "2 + 3 = 5.", "5"),
    Problem("Start with 4. Multiply by 2. What is the result?", "4 * 2 = 8.", "8"),
]


def _user(text):
    return [{"role": "user", "content": text}]


def test_answer_only_pairs():
    assert rationale_pairs(PROBS, "answer_only") == [
        {
            "messages": _user("[answer] Start with 2. Add 3. What is the result?"),
            "response": "5",
            "task": "answer",
            "problem": 0,
        },
        {
            "messages": _user("[answer] Start with 4. Multiply by 2. What is the result?"),
            "response": "8",
            "task": "answer",
            "problem": 1,
        },
    ]


def test_multitask_pairs_answer_then_rationale():
    pairs = rationale_pairs(PROBS, "multitask")
    assert len(pairs) == 2 * len(PROBS)
    order = [(p["task"], p["problem"]) for p in pairs]
    assert order == [("answer", 0), ("rationale", 0), ("answer", 1), ("rationale", 1)]
    assert pairs[0] == {
        "messages": _user("[answer] " + PROBS[0].question),
        "response": "5",
        "task": "answer",
        "problem": 0,
    }
    assert pairs[1] == {
        "messages": _user("[rationale] " + PROBS[0].question),
        "response": "2 + 3 = 5.",
        "task": "rationale",
        "problem": 0,
    }
    assert pairs[3]["response"] == "4 * 2 = 8."
    assert ANSWER_PREFIX == "[answer] " and RATIONALE_PREFIX == "[rationale] "


def test_cot_pairs():
    assert rationale_pairs(PROBS, "cot") == [
        {"messages": _user(PROBS[0].question), "response": "2 + 3 = 5. The answer is 5.", "task": "cot", "problem": 0},
        {"messages": _user(PROBS[1].question), "response": "4 * 2 = 8. The answer is 8.", "task": "cot", "problem": 1},
    ]
    # the cot target is read back by extract_answer
    assert [extract_answer(p["response"]) for p in rationale_pairs(PROBS, "cot")] == ["5", "8"]


def test_inference_prompt_matches_the_answer_training_prompt():
    p = PROBS[1]
    for mode in ("answer_only", "multitask", "cot"):
        first = rationale_pairs([p], mode)[0]
        assert inference_prompt(p, mode) == first["messages"][0]["content"]
    assert inference_prompt(p, "multitask") == "[answer] " + p.question
    assert inference_prompt(p, "cot") == p.question


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(PotstillError, match="unknown rationale mode 'label'.*answer_only, multitask, cot"):
        rationale_pairs(PROBS, "label")
    with pytest.raises(PotstillError, match="answer_only, multitask, cot"):
        inference_prompt(PROBS[0], "distill")


# ---- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.", "1234"),
        ("so 3.50", "3.5"),
        ("#### -7", "-7"),
        ("no number", None),
        ("", None),
        ("7 + 5 = 12. 12 * 3 = 36. The answer is 36.", "36"),
        ("The answer is 36. Question: what is 99 + 1? The answer is 100.", "36"),  # first marker wins
        ("the answer is: $18", "18"),
        ("It costs 5 then 7 then 72.0", "72"),
        ("she paid 1,000,000 dollars.", "1000000"),
        ("Steps 3, 4 and 10", "10"),
        ("x is 12\n#### 1,500\nmore 9", "1500"),
        ("The answer is unclear, maybe 4", "4"),  # no number after the marker: last number
        ("it is -0.0", "0"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_exact_match():
    preds = ["The answer is 72.", "so 1,000", "#### 3.50", "nothing", "The answer is 5."]
    golds = ["72", "1000", "3.5", "0", "6"]
    assert exact_match(preds, golds) == pytest.approx(3 / 5)
    assert exact_match(["x = 1,000."], ["1,000"]) == 1.0  # gold normalized the same way
    with pytest.raises(PotstillError, match="no predictions"):
        exact_match([], [])
    with pytest.raises(PotstillError, match="2 predictions for 1 gold"):
        exact_match(["1", "2"], ["1"])


# ---- subset --------------------------------------------------------------------------------------


def test_subset_sizes_and_nesting():
    probs = arithmetic_problems(40, seed=0, level=2)
    quarter, half, full = (subset(probs, f, seed=5) for f in (0.25, 0.5, 1.0))
    assert (len(quarter), len(half), len(full)) == (10, 20, 40)
    assert half[:10] == quarter and full[:20] == half
    assert sorted(full, key=probs.index) == probs  # a permutation of all of them
    assert subset(probs, 0.25, seed=5) == quarter  # deterministic
    assert subset(probs, 0.25, seed=6) != quarter
    assert quarter != probs[:10]  # shuffled, not a head
    assert len(subset(probs, 0.001)) == 1  # at least one problem
    assert len(subset(probs[:7], 0.7)) == 5  # round(4.9), not truncation


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan")])
def test_subset_rejects_bad_fraction(fraction):
    with pytest.raises(PotstillError, match=r"fraction must be in \(0, 1\]"):
        subset(PROBS, fraction)


def test_subset_rejects_empty():
    with pytest.raises(PotstillError, match="no problems"):
        subset([], 0.5)
