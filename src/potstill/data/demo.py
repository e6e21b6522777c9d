"""The embedded default data: prompts written for this project, answered by the teacher.

The teacher's greedy answers are the targets (sequence-level KD data, Kim & Rush 2016).
They are generated once and cached as JSON under the user cache dir, keyed by the
teacher's identity, the prompts, the chat template and the generation settings (the
backend included: with ``generation.backend: vllm`` a vLLM engine writes them).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

from ..errors import PotstillError
from ..io import atomic_write_json


def demo_prompts(n: int | None = None) -> list[dict]:
    """The embedded prompts: ``[{"id", "category", "prompt"}]`` (240 in all)."""
    text = resources.files("potstill").joinpath("resources/demo_prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if n is not None:
        if n > len(rows):
            raise PotstillError(f"data.source.num_prompts={n} but only {len(rows)} demo prompts exist; lower it")
        rows = rows[:n]
    return rows


def teacher_responses(
    teacher,
    tokenizer,
    teacher_id: str,
    prompts: list[dict],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    system_prompt: str | None = None,
    generation=None,
) -> list[dict]:
    """``[{"messages", "response", "id"}]``: the teacher's greedy answer to each prompt, cached.

    ``generation``: the recipe's ``config.GenerationOptions`` (``None``: the hf backend). With
    ``backend: vllm`` a :class:`~potstill.vllm_engine.VLLMEngine` for the teacher generates
    (checked up front: no CUDA or no vllm is a one-line error); it starts only if an answer is missing.
    """
    from ..models.offline import cache_root
    from .chat import encode_prompt

    engine = None
    if generation is not None and generation.backend == "vllm":
        from ..vllm_engine import VLLMEngine

        engine = VLLMEngine.from_options(teacher, tokenizer, generation.vllm)  # lazy: starts on a missing chunk

    def msgs(p: dict) -> list[dict]:
        m = [{"role": "user", "content": p["prompt"]}]
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + m

    key = hashlib.sha256(
        json.dumps(
            {
                "teacher": teacher_id,
                "prompts": [[p["id"], p["prompt"]] for p in prompts],
                "template": getattr(tokenizer, "chat_template", None),
                "system": system_prompt,
                "max_new_tokens": max_new_tokens,
                "decoding": "greedy",
                **({} if engine is None else {"backend": engine.identity}),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    path = cache_root() / "generations" / f"demo-{key}.json"
    if path.is_file():  # the whole-file cache of earlier versions
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key and len(cached["responses"]) == len(prompts):
                return [
                    {"id": p["id"], "messages": msgs(p), "response": r} for p, r in zip(prompts, cached["responses"])
                ]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a corrupt cache is regenerated
    from ..generation_cache import GenerationParams, generate_cached

    # Chunks written atomically as they finish: an interrupted run resumes where it stopped.
    prompt_ids = [encode_prompt(tokenizer, msgs(p)) for p in prompts]
    try:
        gen = generate_cached(
            teacher,
            tokenizer,
            prompt_ids,
            path.with_suffix(""),
            GenerationParams(max_new_tokens),
            model_id=teacher_id,
            batch_size=batch_size,
            engine=engine,
        )
    finally:
        if engine is not None:
            engine.close()
    responses = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.token_ids]
    responses = [r if r else "I don't know." for r in responses]
    atomic_write_json(path, {"key": key, "teacher": teacher_id, "responses": responses})
    return [{"id": p["id"], "messages": msgs(p), "response": r} for p, r in zip(prompts, responses)]
