"""Task quality through lm-evaluation-harness (``pip install 'potstill[harness]'``): the teacher and every student
scored by ``lm_eval.simple_evaluate`` on the same tasks, with ``limit`` examples per task so a CPU run stays bounded.

potstill ships task definitions over the offline data in ``$POTSTILL_DATA`` (no hub access):

* ``potstill_sms_spam`` / ``potstill_sst2``: multiple choice (ham / spam, negative / positive) by log-likelihood,
  ``acc``; SMS spam is the whole collection in file order, SST-2 its dev split;
* ``potstill_pubmedqa``: the 500 PQA-L test ids, abstract + question, yes / no / maybe by log-likelihood (as
  lm-eval's own ``pubmedqa`` task, which reads the hub's bigbio copy);
* ``potstill_gsm8k``: lm-eval's own ``gsm8k`` task (5-shot, greedy, ``exact_match`` after its strict and
  flexible answer filters) pointed at the local ``gsm8k/{train,test}.jsonl``.

Any other name is passed to lm-eval as it is (a standard task, which downloads its data: a user with a network).
The documents of the shipped tasks are written once to ``work_dir`` as JSONL (lm-eval reads them with the
``json`` loader of ``datasets``). Scores come back flat, ``{"<task>/<metric>": value}`` per model, with the
metric's filter when lm-eval names one (``gsm8k/exact_match,strict-match``).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PotstillError

log = logging.getLogger("potstill")

__all__ = ["SHIPPED_TASKS", "harness_scores", "shipped_task"]

SHIPPED_TASKS = ("potstill_sms_spam", "potstill_sst2", "potstill_pubmedqa", "potstill_gsm8k")


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise PotstillError(
            "eval.harness needs lm-evaluation-harness; pip install 'potstill[harness]' (or remove eval.harness)"
        ) from None
    return lm_eval


def _write_jsonl(path: Path, rows: Sequence[dict]) -> str:
    """The task's documents in one seeded shuffle: lm-eval's ``limit`` takes the first documents, and a source
    file ordered by label (PubMedQA's ground truth lists every *yes*, then every *no*, then every *maybe*) would
    hand a limited run one class only."""
    import random

    from ..io import atomic_write_text

    rows = list(rows)
    random.Random(0).shuffle(rows)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _multiple_choice(name: str, data: str, text: str, choices: list[str]) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_choice": choices,
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def shipped_task(name: str, data_root: Path, work_dir: Path) -> dict[str, Any]:
    """The lm-eval task config of one of :data:`SHIPPED_TASKS` over ``data_root`` (documents under ``work_dir``)."""
    from ..data.classification import load_sms_spam, load_sst2

    work_dir = Path(work_dir)
    if name == "potstill_sms_spam":
        rows = [{"text": e.text, "label": e.label} for e in load_sms_spam(data_root / "sms_spam/SMSSpamCollection")]
        data = _write_jsonl(work_dir / f"{name}.jsonl", rows)
        return _multiple_choice(name, data, "Message: {{text}}\nIs this message spam or ham?\nAnswer:", ["ham", "spam"])
    if name == "potstill_sst2":
        rows = [{"text": e.text, "label": e.label} for e in load_sst2("dev", data_root / "sst2/dev.tsv")]
        data = _write_jsonl(work_dir / f"{name}.jsonl", rows)
        return _multiple_choice(
            name, data, "Review: {{text}}\nIs this review negative or positive?\nAnswer:", ["negative", "positive"]
        )
    if name == "potstill_pubmedqa":
        folder = data_root / "pubmedqa"
        try:
            rows = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
            truth = json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PotstillError(f"cannot read PubMedQA from {folder} ({err}); set POTSTILL_DATA") from None
        choices = ["yes", "no", "maybe"]
        docs = [
            {
                "context": " ".join(" ".join(rows[k]["CONTEXTS"]).split()),
                "question": rows[k]["QUESTION"],
                "label": choices.index(str(v).lower()),
            }
            for k, v in truth.items()
        ]
        data = _write_jsonl(work_dir / f"{name}.jsonl", docs)
        return _multiple_choice(name, data, "Abstract: {{context}}\nQuestion: {{question}}\nAnswer:", choices)
    if name == "potstill_gsm8k":
        import yaml

        lm_eval = _require_lm_eval()
        spec = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
        cfg = yaml.safe_load(spec.read_text(encoding="utf-8"))
        cfg.pop("tag", None)
        files = {s: str(data_root / "gsm8k" / f"{s}.jsonl") for s in ("train", "test")}
        return cfg | {
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
        }
    raise PotstillError(
        f"'{name}' is not a task potstill ships; use one of {list(SHIPPED_TASKS)} or an lm-eval task name"
    )


def harness_scores(
    models: Mapping[str, tuple[Any, Any]],
    tasks: Sequence[str],
    *,
    limit: int | None,
    work_dir: str | Path,
    data_root: Path,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{model name: {"<task>/<metric>": value}}`` of lm-eval on ``tasks`` for each ``(model, tokenizer)``;
    ``max_gen_toks`` caps generation tasks (lm-eval's default is 256)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..models.placement import input_device

    configs = [shipped_task(t, data_root, Path(work_dir)) if t in SHIPPED_TASKS else t for t in tasks]
    manager = TaskManager()
    out: dict[str, dict[str, float]] = {}
    for name, (model, tokenizer) in models.items():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
        res = simple_evaluate(
            model=lm,
            tasks=copy.deepcopy(configs),
            limit=limit,
            num_fewshot=num_fewshot,
            gen_kwargs=None if max_gen_toks is None else {"max_gen_toks": max_gen_toks},
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        flat: dict[str, float] = {}
        for task, metrics in (res or {}).get("results", {}).items():
            for key, value in metrics.items():
                if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric = key.removesuffix(",none")
                flat[f"{task}/{metric}"] = float(value)
        out[name] = flat
        log.info("harness %s: %s", name, flat)
    return out
