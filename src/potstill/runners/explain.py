"""``potstill explain``: CC-SHAP (Parcalabescu & Frank 2024) of each recipe model on the same examples.

Writes into ``output_dir``: ``recipe.yaml`` (resolved), ``cc_shap_<name>.json`` per model (every example's
answer, explanation, contribution ratios and CC-SHAP; their mean and std; answer accuracy) and ``summary.json``
(one row per model), each atomically.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import yaml

from potstill.data.classification import Example, load_sms_spam
from potstill.errors import PotstillError
from potstill.eval.cc_shap import cc_shap_example, summarize
from potstill.io import atomic_write_json, atomic_write_text
from potstill.models.loading import load_model
from potstill.recipes.explain import ExplainRecipe

__all__ = ["balanced_draw", "explain_model", "run", "summary_line"]

log = logging.getLogger(__name__)


def balanced_draw(examples: list[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples, the labels taking turns (as far as each label lasts), each label's order seeded."""
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    for rows in by_label.values():
        rng.shuffle(rows)
    picked, labels, i = [], sorted(by_label), 0
    while len(picked) < min(n, len(examples)):
        rows = by_label[labels[i % len(labels)]]
        if rows:
            picked.append(rows.pop())
        i += 1
    return picked


def _mask_id(tokenizer, mask: str | None) -> int | None:
    if mask is None:
        return None
    ids = tokenizer(mask, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise PotstillError(
            f"shap.mask_token '{mask}' is {len(ids)} tokens for this tokenizer; pick a string that is one token, "
            "or null to remove masked tokens"
        )
    return int(ids[0])


def explain_model(model, tokenizer, examples: list[Example], recipe: ExplainRecipe) -> dict:
    """CC-SHAP of one loaded model on ``examples``: a report with every example and the summary statistics."""
    p, s = recipe.prompt, recipe.shap
    messages = ([{"role": "system", "content": p.system}] if p.system else []) + [
        {"role": "user", "content": p.question}
    ]
    shap_kw = dict(
        algorithm=s.algorithm,
        max_evals=s.max_evals,
        seed=s.seed,
        score=s.score,
        mask_token_id=_mask_id(tokenizer, s.mask_token),
        batch_size=s.batch_size,
    )
    rows, t0 = [], time.perf_counter()
    for i, ex in enumerate(examples):
        r = cc_shap_example(
            model,
            tokenizer,
            ex.text,
            answer_messages=messages,
            why_prompt=p.why,
            labels=p.labels,
            max_explanation_tokens=p.max_explanation_tokens,
            max_text_tokens=p.max_text_tokens,
            **shap_kw,
        )
        gold = p.labels[ex.label] if ex.label < len(p.labels) else None
        log.info(
            "example %d/%d: answer %s (gold %s), CC-SHAP %.3f, %.0f s",
            i + 1,
            len(examples),
            r["answer"],
            gold,
            r["cc_shap"],
            r["seconds"],
        )
        rows.append({"index": i, "text": ex.text, "gold": gold, "correct": r["answer"] == gold, **r})
    return {
        "cc_shap": summarize([r["cc_shap"] for r in rows]),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "seconds": time.perf_counter() - t0,
        "examples": rows,
    }


def run(recipe: ExplainRecipe) -> dict:
    """``potstill explain``: every model of the recipe explained on the same draw of examples."""
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    examples = balanced_draw(load_sms_spam(recipe.data.path), recipe.data.num_examples, recipe.data.seed)
    summary: dict = {"method": "CC-SHAP (Parcalabescu & Frank 2024)", "num_examples": len(examples), "models": {}}
    for m in recipe.models:
        model, tokenizer = load_model(m.model, dtype=m.dtype)
        report = {"name": m.name, "model": m.model, **explain_model(model, tokenizer, examples, recipe)}
        atomic_write_json(out / f"cc_shap_{m.name}.json", report)
        summary["models"][m.name] = {k: report[k] for k in ("cc_shap", "accuracy", "seconds")}
        del model
    atomic_write_json(out / "summary.json", summary)
    return summary


def summary_line(result: dict) -> str:
    parts = [
        f"{name}: CC-SHAP {r['cc_shap']['mean']:.3f} ± {r['cc_shap']['std']:.3f} (n={r['cc_shap']['n']}), "
        f"accuracy {r['accuracy']:.2f}"
        for name, r in result["models"].items()
    ]
    return "; ".join(parts)
