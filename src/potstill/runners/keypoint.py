"""The once-before-training pass of rationale KD (KPOD, :mod:`potstill.kd.keypoint`): every training example's
per-token columns, with the teacher's answer significance of each rationale token measured once and cached.

Cache: ``<dir>/significance_<teacher weights sha256[:16]>.json`` (JSON, written atomically), a dict keyed by the example's content hash
(:func:`potstill.fingerprints.example_hash`) plus the rationale's token count and the mask id, holding the raw
significance ``s [L]`` (float64, before clipping), so a change of ``lambda`` or of the curriculum costs nothing
and a changed example, teacher or mask token is measured again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from potstill.data.rationale import split_cot_response
from potstill.errors import PotstillError
from potstill.fingerprints import example_hash, weights_fingerprint
from potstill.io import atomic_write_json
from potstill.kd.keypoint import answer_significance, keypoint_weights, response_layout, token_columns

log = logging.getLogger("potstill")


def mask_token_id(tokenizer, mask_token: str | None = None) -> int:
    """The id that replaces a rationale token: ``mask_token`` if given, else unk, pad or eos (the first set)."""
    if mask_token is not None:
        ids = tokenizer.convert_tokens_to_ids([mask_token])
        unknown = ids and ids[0] == tokenizer.unk_token_id and mask_token != tokenizer.unk_token
        if not ids or ids[0] is None or unknown:
            raise PotstillError(f"keypoint mask_token {mask_token!r} is not one token of the tokenizer; name one")
        return int(ids[0])
    for attr in ("unk_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise PotstillError("the tokenizer has no unk, pad or eos token to mask rationale tokens with; set mask_token")


def _load(path: Path | None) -> dict[str, list[float]]:
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _save(path: Path | None, cache: dict) -> None:
    if path is not None:
        atomic_write_json(path, cache, indent=None)


def keypoint_examples(
    examples: list[dict],
    teacher,
    tokenizer,
    *,
    weighting: bool,
    scale: float = 1.0,
    mask_token: str | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Copies of ``examples`` (from ``encode_pairs``: ``input_ids``, ``labels``, ``prompt_ids``,
    ``response_ids``, ``reference``) with the columns ``kd_token_weights``, ``kd_step_rank`` and
    ``kd_num_steps``, and counts of what was done.

    ``weighting``: measure the significance (``teacher`` needed) and set keypoint weights with ``scale``
    (lambda); else every weight is 1 (the progressive curriculum alone). Examples whose response is no
    ``"<rationale> The answer is X."`` target, or whose answer was cut by ``max_length``, keep weight 1 and
    take no part in the curriculum (counted as ``no_rationale`` / ``no_answer``).
    """
    mask_id = mask_token_id(tokenizer, mask_token) if weighting else -1
    path = None
    if weighting and cache_dir is not None:
        path = Path(cache_dir) / f"significance_{weights_fingerprint(teacher)[:16]}.json"
    cache = _load(path)
    counts = {"examples": len(examples), "no_rationale": 0, "no_answer": 0, "measured": 0, "cached": 0}
    was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    out = []
    try:
        for ex in examples:
            out.append(_with_columns(ex, teacher, tokenizer, weighting, scale, mask_id, batch_size, cache, counts))
    finally:
        if teacher is not None:
            teacher.train(was_training)
    if counts["no_rationale"] == len(examples):
        raise PotstillError(
            "rationale KD (token_weighting keypoint / curriculum progressive_rationale) found no "
            "'<rationale> The answer is X.' target; use data.source.mode cot"
        )
    if counts["measured"]:
        _save(path, cache)
    log.info("rationale KD columns: %s", counts)
    return out, counts


def _with_columns(ex, teacher, tokenizer, weighting, scale, mask_id, batch_size, cache, counts) -> dict[str, Any]:
    n_prompt = len(ex["prompt_ids"])
    response_ids = list(ex["input_ids"][n_prompt:])
    split = split_cot_response(ex.get("reference") or "")
    if split is None:
        counts["no_rationale"] += 1
        n = len(ex["input_ids"])
        return {**ex, "kd_token_weights": [0.0] * n_prompt + [1.0] * (n - n_prompt), **_zeros(n)}
    rationale, answer = split
    layout = response_layout(tokenizer, response_ids, rationale, rationale + answer)
    weights = None
    if not layout.answer:
        counts["no_answer"] += 1
        layout = type(layout)(kind=layout.kind, rank=[0] * len(layout.rank), steps=0)
    elif weighting:
        rat = layout.rationale
        key = f"{example_hash(ex['input_ids'], ex['labels']).hex()}:{len(rat)}:{mask_id}"
        if key in cache:
            counts["cached"] += 1
        else:
            if teacher is None:
                raise PotstillError("token_weighting 'keypoint' measures significance with the teacher; give one")
            s = answer_significance(
                teacher,
                ex["input_ids"],
                [n_prompt + j for j in rat],
                [n_prompt + j for j in layout.answer],
                mask_id,
                batch_size,
            )
            cache[key] = s.tolist()
            counts["measured"] += 1
        weights = keypoint_weights(torch.tensor(cache[key], dtype=torch.float64), scale)
    return {**ex, **token_columns(n_prompt, layout, weights)}


def _zeros(n: int) -> dict[str, list[int]]:
    return {"kd_step_rank": [0] * n, "kd_num_steps": [0] * n}


def with_keypoint_columns(run, teacher, tokenizer, examples: list[dict], cache_dir: Path | None) -> list[dict]:
    """``examples`` with the rationale KD columns when ``run`` (a ``RunConfig``) asks for them, else unchanged.

    ``cache_dir``: where the significance cache lives (the distill runner: ``<output_dir>/keypoint``, shared by
    the runs); None measures without a cache."""
    opts = getattr(run, "keypoint", None)
    if opts is None:
        return examples
    weighting = run.token_weighting == "keypoint"
    if weighting and teacher is None:
        raise PotstillError(
            f"run {run.name}: token_weighting keypoint measures significance with a live teacher; "
            "give the recipe a teacher model (a signal cache alone cannot mask tokens)"
        )
    out, _ = keypoint_examples(
        examples,
        teacher,
        tokenizer,
        weighting=weighting,
        scale=opts.scale,
        mask_token=opts.mask_token,
        batch_size=opts.batch_size,
        cache_dir=cache_dir,
    )
    return out


def keypoint_trainer_args(run) -> dict[str, Any]:
    """The ``KDConfig`` arguments of ``run``'s progressive curriculum (empty when it has none)."""
    opts = getattr(run, "keypoint", None)
    if opts is None:
        return {}
    return {"progressive_start": opts.start_fraction, "progressive_ramp": opts.ramp}
