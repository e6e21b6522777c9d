"""PubMedQA (Jin et al. 2019, "PubMedQA: A Dataset for Biomedical Research Question Answering", EMNLP):
the 1,000 expert-labelled questions (PQA-L) as prompt/response pairs for distillation.

Each question comes with the abstract it was written from (``CONTEXTS``, minus its conclusion), a
``final_decision`` in ``yes / no / maybe`` and the abstract's conclusion as a ``LONG_ANSWER``. The
official split is by id: the 500 ids of ``test_ground_truth.json`` are the test set, the other 500
the training set (the paper's 10-fold cross-validation folds are not used).

A pair's response is the reasoned answer *decision first*: ``"yes. <long answer>"``, so that a
model is scored on the decision by the log-likelihood of its first word after the prompt, the
same way as lm-evaluation-harness's ``pubmedqa`` task (choices `` yes``, `` no``, `` maybe``), and
the explanation that follows is what the student learns to reason with. Held-out pairs carry
``answer`` (the decision) and ``choices`` so evaluation can score the decision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import PotstillError

CHOICES: tuple[str, ...] = ("yes", "no", "maybe")
INSTRUCTION = "Answer the question about the abstract with yes, no or maybe, then explain why in one or two sentences."


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PotstillError(f"PubMedQA file '{path}' not found; set POTSTILL_DATA or data.source.path to its folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PotstillError(
            f"PubMedQA file '{path}' is not JSON ({err.msg}); give ori_pqal.json as published"
        ) from None
    if not isinstance(data, dict) or not data:
        raise PotstillError(f"PubMedQA file '{path}' holds no questions; give ori_pqal.json as published")
    return data


def pubmedqa_prompt(row: dict, *, context_words: int | None = None) -> str:
    """The user turn: the abstract (its sections joined, cut to ``context_words`` words), the question and
    the instruction."""
    contexts = row["CONTEXTS"]
    text = " ".join(contexts) if isinstance(contexts, list) else str(contexts)
    words = text.split()
    if context_words is not None and len(words) > context_words:
        text = " ".join(words[:context_words]) + " ..."
    return f"Abstract: {text}\nQuestion: {row['QUESTION'].strip()}\n{INSTRUCTION}"


def _pair(pmid: str, row: dict, context_words: int | None) -> dict[str, Any]:
    decision = str(row.get("final_decision", "")).strip().lower()
    if decision not in CHOICES:
        raise PotstillError(f"PubMedQA question {pmid} has final_decision '{decision}'; expected yes, no or maybe")
    return {
        "messages": [{"role": "user", "content": pubmedqa_prompt(row, context_words=context_words)}],
        "response": f"{decision}. {' '.join(str(row.get('LONG_ANSWER', '')).split())}".strip(),
        "answer": decision,
        "choices": list(CHOICES),
        "pmid": pmid,
    }


def load_pubmedqa(
    folder: str | Path, *, context_words: int | None = 250, limit: int | None = None
) -> tuple[list[dict], list[dict]]:
    """``(train_pairs, test_pairs)`` of PQA-L, split by the ids of ``test_ground_truth.json``, each list in
    the file's order (``limit`` keeps the first N of each). Test decisions come from the ground-truth file."""
    folder = Path(folder)
    rows = _read_json(folder / "ori_pqal.json")
    truth = _read_json(folder / "test_ground_truth.json")
    missing = [k for k in truth if k not in rows]
    if missing:
        raise PotstillError(
            f"{len(missing)} test ids of test_ground_truth.json are not in ori_pqal.json (e.g. {missing[0]}); "
            "use the two files of one PubMedQA release"
        )
    train, test = [], []
    for pmid, row in rows.items():
        if pmid in truth:
            test.append(_pair(pmid, {**row, "final_decision": truth[pmid]}, context_words))
        else:
            train.append(_pair(pmid, row, context_words))
    if limit is not None:
        train, test = train[:limit], test[:limit]
    return train, test


def majority_baseline(train: list[dict], test: list[dict]) -> dict[str, Any]:
    """Accuracy and macro-F1 on ``test`` of always answering the training set's most common decision."""
    counts = {c: sum(p["answer"] == c for p in train) for c in CHOICES}
    top = max(CHOICES, key=lambda c: counts[c])
    acc = sum(p["answer"] == top for p in test) / max(len(test), 1)
    # macro-F1: only the majority class has true positives; its F1 = 2 acc / (1 + acc), the others 0
    f1_top = 2 * acc / (1 + acc) if acc else 0.0
    return {"decision": top, "accuracy": acc, "macro_f1": f1_top / len(CHOICES), "n": len(test)}
