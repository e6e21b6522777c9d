"""Problems with rationales, and the prompt/response pairs of rationale distillation.

A :class:`Problem` is a question, a step-by-step rationale and a final numeric answer.
Two sources: :func:`arithmetic_problems`, a deterministic multi-step arithmetic task built
here (no download, exact rationales), and :func:`load_gsm8k`, the grade-school maths set of
Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems" (arXiv:2110.14168).

:func:`rationale_pairs` turns problems into training pairs for a decoder-only student in
one of three ways:

* ``answer_only``: question -> answer; the baseline of standard fine-tuning.
* ``multitask``: "Distilling step-by-step" (Hsieh et al. 2023, arXiv:2305.02301):
  the same question appears twice, once with an answer prefix and the answer as target,
  once with a rationale prefix and the rationale as target, so the summed loss over the
  pairs is ``L = L_label + L_rationale`` (their multi-task loss with lambda = 1). At
  inference only the answer prompt is used, so no rationale is generated.
* ``cot``: question -> rationale then "The answer is X." in one target; the student learns
  to reason before answering (Ho et al. 2023, "Large Language Models Are Reasoning
  Teachers", arXiv:2212.10071; Magister et al. 2023, "Teaching Small Language Models to
  Reason", arXiv:2212.08410), with the answer phrase of Wei et al. 2022 (arXiv:2201.11903).

Hsieh et al. use an encoder-decoder (T5) with prefixes ``[label]``/``[rationale]`` on the
input; here the prefix starts the user turn, which a decoder-only student reads the same way.
Pairs have the shape of :func:`potstill.data.loading.records_to_pairs`, plus ``task`` and
``problem`` (index into the problem list) so evaluation can group them.

For rationale KD inside one ``cot`` target (KPOD, :mod:`potstill.kd.keypoint`),
:func:`split_cot_response` separates the rationale from the answer phrase and :func:`rationale_steps`
cuts the rationale into its steps (lines, else sentences).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import PotstillError
from ..paths import data_root  # noqa: F401  (re-exported: the data loaders name their directory by it)

ANSWER_PREFIX = "[answer] "
RATIONALE_PREFIX = "[rationale] "

Mode = Literal["answer_only", "multitask", "cot"]
MODES: tuple[str, ...] = ("answer_only", "multitask", "cot")

# Range of every intermediate value of an arithmetic problem: short integer strings.
_LOW, _HIGH = -99, 999
_MAX_LEVEL = 5
_OPERANDS = {"+": range(1, 21), "-": range(1, 21), "*": range(2, 6)}
_VERBS = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}


@dataclass(frozen=True)
class Problem:
    """One problem: ``answer`` is the final number as a canonical string (``"72"``, ``"-3"``)."""

    question: str
    rationale: str
    answer: str


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    return value * operand


def _arithmetic_problem(seed: int, level: int, index: int) -> Problem:
    # A string seed is hashed with SHA-512 by ``random.Random`` (not with ``hash()``), so it
    # is stable across runs and PYTHONHASHSEED, and problem ``index`` does not depend on ``n``.
    rng = random.Random(f"potstill.arithmetic:{seed}:{level}:{index}")
    value = start = rng.randint(1, 20)
    verbs, steps = [], []
    for _ in range(level):
        # Draw among the (op, operand) choices that keep the value in range: the same as
        # re-drawing until in range, but bounded. Some choice always exists (+1 or -1).
        ops = [op for op in _OPERANDS if any(_LOW <= _apply(value, op, k) <= _HIGH for k in _OPERANDS[op])]
        op = rng.choice(ops)
        operand = rng.choice([k for k in _OPERANDS[op] if _LOW <= _apply(value, op, k) <= _HIGH])
        result = _apply(value, op, operand)
        verbs.append(_VERBS[op].format(operand))
        steps.append(f"{value} {op} {operand} = {result}.")
        value = result
    instructions = ", then ".join(verbs)
    question = f"Start with {start}. {instructions[0].upper()}{instructions[1:]}. What is the result?"
    return Problem(question=question, rationale=" ".join(steps), answer=str(value))


def arithmetic_problems(n: int, *, seed: int = 0, level: int = 2) -> list[Problem]:
    """``n`` multi-step arithmetic problems with exact rationales, deterministic in ``(seed, level)``.

    Problem ``i`` starts from a number in 1..20 and applies ``level`` operations, each ``+``
    or ``-`` a number in 1..20 or ``*`` a number in 2..5; every intermediate value stays in
    -99..999. Each problem has its own generator seeded from ``(seed, level, i)``, so the
    first ``m`` problems are the same for any ``n >= m``. Example (level 3)::

        question:  Start with 7. Add 5, then multiply by 3, then subtract 4. What is the result?
        rationale: 7 + 5 = 12. 12 * 3 = 36. 36 - 4 = 32.
        answer:    32
    """
    if not isinstance(n, int) or n < 1:
        raise PotstillError(f"arithmetic_problems needs n >= 1 problems, got {n!r}; pass a positive count")
    if not isinstance(level, int) or not 1 <= level <= _MAX_LEVEL:
        raise PotstillError(
            f"arithmetic_problems level is the number of operations, 1..{_MAX_LEVEL}, got {level!r}; pick one in range"
        )
    return [_arithmetic_problem(seed, level, i) for i in range(n)]


_ANNOTATION = re.compile(r"<<[^>]*>>")


def load_gsm8k(path: str | Path, *, limit: int | None = None) -> list[Problem]:
    """GSM8K rows (JSONL with ``question`` and ``answer``) as problems; at most ``limit`` of them.

    The GSM8K ``answer`` is the worked solution, one step a line, with calculator annotations
    ``<<48/2=24>>`` (Cobbe et al. 2021), then ``#### 72``. The rationale is the text before
    ``####`` with annotations dropped and all whitespace (newlines included) collapsed to
    single spaces; the answer is the text after ``####`` with commas removed (``1,000`` ->
    ``1000``). Blank lines are skipped.
    """
    p = Path(path)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise PotstillError(f"load_gsm8k limit must be a positive number of rows or None, got {limit!r}; fix limit")
    if not p.is_file():
        raise PotstillError(
            f"GSM8K file '{p}' does not exist; give the path of a GSM8K .jsonl file (see POTSTILL_DATA)"
        )
    problems: list[Problem] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PotstillError(
                    f"GSM8K file '{p}' line {lineno} is not JSON ({err.msg}); fix or remove that line"
                ) from None
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("question"), str)
                or not isinstance(row.get("answer"), str)
            ):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise PotstillError(
                    f"GSM8K file '{p}' line {lineno} lacks string fields 'question' and 'answer' (found {found}); "
                    'give rows like {"question": ..., "answer": "... #### 72"}'
                )
            solution, sep, final = row["answer"].rpartition("####")
            answer = final.replace(",", "").strip()
            if not sep or not answer:
                raise PotstillError(
                    f"GSM8K file '{p}' line {lineno} has an answer without a final '#### <number>' line; "
                    "end each answer with '#### <number>'"
                )
            rationale = " ".join(_ANNOTATION.sub("", solution).split())
            problems.append(Problem(question=row["question"].strip(), rationale=rationale, answer=answer))
    if not problems:
        raise PotstillError(f"GSM8K file '{p}' has no rows; give a .jsonl file with at least one problem")
    return problems


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PotstillError(f"unknown rationale mode '{mode}'; use one of {', '.join(MODES)}")


def inference_prompt(problem: Problem, mode: str) -> str:
    """The user prompt at evaluation: ``ANSWER_PREFIX + question`` for ``answer_only``/``multitask``.

    For ``cot`` it is the bare question, as in training.
    """
    _check_mode(mode)
    return problem.question if mode == "cot" else ANSWER_PREFIX + problem.question


def _pair(prompt: str, response: str, task: str, index: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "response": response, "task": task, "problem": index}


def rationale_pairs(problems: Sequence[Problem], mode: str) -> list[dict[str, Any]]:
    """Training pairs ``{"messages", "response", "task", "problem"}`` for ``mode`` (see the module docstring).

    ``multitask`` gives two pairs per problem, answer then rationale (Hsieh et al. 2023,
    multi-task training); ``answer_only`` and ``cot`` give one. ``problem`` is the index in ``problems``.
    """
    _check_mode(mode)
    pairs: list[dict[str, Any]] = []
    for i, pr in enumerate(problems):
        if mode == "cot":
            pairs.append(_pair(pr.question, f"{pr.rationale} The answer is {pr.answer}.", "cot", i))
            continue
        pairs.append(_pair(ANSWER_PREFIX + pr.question, pr.answer, "answer", i))
        if mode == "multitask":
            pairs.append(_pair(RATIONALE_PREFIX + pr.question, pr.rationale, "rationale", i))
    return pairs


ANSWER_PHRASE = " The answer is "
_STEP_END = re.compile(r"(?<=[.!?])(?=\s)")


def split_cot_response(response: str) -> tuple[str, str] | None:
    """A ``cot`` target ``"<rationale> The answer is X."`` as ``(rationale, " The answer is X.")``.

    Split at the last :data:`ANSWER_PHRASE`; ``None`` when the response has no such phrase or an empty
    rationale (an ``answer_only`` or ``multitask`` target: no rationale/answer pair in one sequence).
    """
    rationale, sep, rest = response.rpartition(ANSWER_PHRASE)
    if not sep or not rationale.strip():
        return None
    return rationale, sep + rest


def rationale_steps(rationale: str) -> list[tuple[int, int]]:
    """The reasoning steps of a rationale as character spans ``[(start, end), ...]`` that tile ``[0, len)``.

    Steps are lines when the rationale has newlines, else sentences (a ``.``/``!``/``?`` followed by
    whitespace ends one; ``3.5`` does not). The whitespace between two steps opens the later one, so a
    byte-level token such as ``" 12"`` (space first) falls in the step its text belongs to. The arithmetic
    task (``"7 + 5 = 12. 12 * 3 = 36."``) and GSM8K as :func:`load_gsm8k` gives it (lines joined by spaces)
    have no newlines: their steps are sentences.
    """
    if not rationale:
        return []
    if "\n" in rationale.strip():
        cuts = [m.start() for m in re.finditer(r"\n+", rationale)]
    else:
        cuts = [m.start() for m in _STEP_END.finditer(rationale)]
    cuts = [c for c in cuts if 0 < c < len(rationale) and rationale[c:].strip()]
    bounds = [0, *cuts, len(rationale)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


_NUMBER = r"-?\d(?:[\d,]*\d)?(?:\.\d+)?"
_THE_ANSWER_IS = re.compile(r"the answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str:
    """Canonical form of a number string: no commas, no trailing period, no trailing decimal zeros.

    ``"1,234."`` -> ``"1234"``, ``"72.0"`` -> ``"72"``, ``"3.50"`` -> ``"3.5"``.
    """
    s = text.strip().replace(",", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def extract_answer(text: str) -> str | None:
    """The final number of a generated text, normalized; ``None`` if it has no number.

    The number after the first "The answer is" (the ``cot`` target phrase), else after the
    first "####" (GSM8K's marker), else the last number in the text. The first marker wins
    because a small model often runs on into a new, made-up question after answering.
    """
    for pattern in (_THE_ANSWER_IS, _HASHES):
        m = pattern.search(text)
        if m:
            return normalize_number(m.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Fraction of predictions whose :func:`extract_answer` equals the normalized gold answer."""
    if len(predictions) != len(golds):
        raise PotstillError(
            f"exact_match got {len(predictions)} predictions for {len(golds)} gold answers; give one per gold"
        )
    if not golds:
        raise PotstillError("exact_match got no predictions; give at least one prediction and gold answer")
    hits = sum(extract_answer(p) == normalize_number(g) for p, g in zip(predictions, golds))
    return hits / len(golds)


def subset(problems: Sequence[Problem], fraction: float, seed: int = 0) -> list[Problem]:
    """The first ``max(1, round(fraction * len))`` problems of a permutation seeded by ``seed``.

    Subsets of one seed are nested (25% is inside 50% is inside 100%), so a data-size sweep
    (as in Hsieh et al. 2023's training-set-size curves) adds examples instead of swapping them.
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise PotstillError(f"subset fraction must be in (0, 1], got {fraction!r}; e.g. 0.25 for a quarter")
    if not problems:
        raise PotstillError("subset got no problems; give at least one problem")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(problems)))
    return [problems[i] for i in order[:k]]
