"""The teacher side of synthesis (:mod:`potstill.dd.synthesize`): completions, the generator protocol, the
chat-templated :class:`TeacherGenerator`, and per-stage generation settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import PotstillError
from ..generation_cache import GenerationParams

__all__ = ["Completion", "TeacherGenerator", "TextGenerator", "call_generator", "generation_params", "stage_seed"]


@dataclass(frozen=True)
class Completion:
    """A teacher completion; ``truncated`` when ``max_new_tokens`` stopped it before EOS."""

    text: str
    truncated: bool = False


class TextGenerator(Protocol):
    """``generate(prompts, tag=..., params=...)``: one completion (``str`` or :class:`Completion`) per user prompt.

    ``tag`` names the round and stage (``round-002-answer``), unique within a run.
    """

    def __call__(self, prompts: list[str], *, tag: str, params: GenerationParams) -> list[Completion | str]: ...


class TeacherGenerator:
    """Chat-templated teacher generation through :func:`~potstill.generation_cache.generate_cached`.

    Each call generates into ``cache_dir/<tag>-<sha of its prompt ids, 12 hex>``: a rerun
    with the same prompts resumes there, while prompts that changed (an earlier round came
    out differently, e.g. after a change of the filters) get a fresh directory instead of
    a refusal from the cache of the old ones. ``engine``: a :class:`~potstill.vllm_engine.VLLMEngine`
    serving ``model`` (``None``: the hf backend).
    """

    def __init__(
        self,
        model,
        tokenizer,
        cache_dir: str | Path,
        *,
        model_id: str,
        system_prompt: str | None = None,
        batch_size: int = 8,
        chunk_size: int = 64,
        progress: bool = True,
        engine=None,
    ):
        self.model, self.tokenizer, self.cache_dir = model, tokenizer, Path(cache_dir)
        self.model_id, self.system_prompt = model_id, system_prompt
        self.batch_size, self.chunk_size, self.progress = batch_size, chunk_size, progress
        self.engine = engine

    @property
    def identity(self) -> str:
        """What the generations depend on besides the prompts and params: weights, tokenizer, template, backend."""
        from potstill.fingerprints import tokenizer_fingerprint, weights_fingerprint

        template = getattr(self.tokenizer, "chat_template", None) or ""
        return json.dumps(
            [
                weights_fingerprint(self.model),
                tokenizer_fingerprint(self.tokenizer),
                hashlib.sha256(template.encode()).hexdigest(),
                self.system_prompt,
                self.chunk_size,
            ]
            + ([] if self.engine is None else [self.engine.identity])
        )

    def __call__(self, prompts: list[str], *, tag: str, params: GenerationParams) -> list[Completion]:
        from ..data.chat import encode_prompt
        from ..generation_cache import generate_cached, prompts_sha

        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        ids = [encode_prompt(self.tokenizer, system + [{"role": "user", "content": p}]) for p in prompts]
        path = self.cache_dir / f"{tag}-{prompts_sha(ids)[:12]}"
        gen = generate_cached(
            self.model,
            self.tokenizer,
            ids,
            path,
            params,
            model_id=self.model_id,
            chunk_size=self.chunk_size,
            batch_size=self.batch_size,
            progress=self.progress,
            engine=self.engine,
        )
        return [
            Completion(self.tokenizer.decode(t, skip_special_tokens=True).strip(), len(t) >= params.max_new_tokens)
            for t in gen.token_ids
        ]


def call_generator(generate: TextGenerator, prompts: list[str], tag: str, params: GenerationParams) -> list[Completion]:
    if not prompts:
        return []
    out = generate(prompts, tag=tag, params=params)
    if len(out) != len(prompts):
        raise PotstillError(f"the generator returned {len(out)} completions for {len(prompts)} prompts ({tag}); fix it")
    return [c if isinstance(c, Completion) else Completion(str(c)) for c in out]


def stage_seed(seed: int, rnd: int, stage: str) -> int:
    return int(hashlib.sha256(f"potstill.synthesize:{seed}:{rnd}:{stage}".encode()).hexdigest()[:7], 16)


def generation_params(sampling, seed: int) -> GenerationParams:
    """The :class:`~potstill.generation_cache.GenerationParams` of a sampling section
    (``do_sample``, ``temperature``, ``top_p``, ``max_new_tokens``; a
    :class:`potstill.recipes.synthesize.SamplingConfig`) with ``seed``."""
    return GenerationParams(sampling.max_new_tokens, sampling.do_sample, sampling.temperature, sampling.top_p, seed)
