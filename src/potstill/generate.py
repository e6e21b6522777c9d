"""Batched generation with the KV cache (left padding, stop on EOS): the one engine.

Used for the teacher's cached answers and for evaluation. Generation temperature is a
sampling parameter and has nothing to do with the distillation temperature of
:mod:`potstill.kd`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data.collate import pad_id as data_pad_id


@dataclass
class Generations:
    """``token_ids[i]``: the new tokens of prompt ``i``, EOS and anything after it removed.

    ``num_tokens`` counts generated tokens up to and including the first EOS (padding
    after it is not counted); ``seconds`` is the timed generation wall time.
    """

    token_ids: list[list[int]]
    num_tokens: int
    seconds: float
    stops: list[int | None] | None = None  # the EOS id each generation stopped on (None: it ran to the cap)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")


def eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS plus the model's ``generation_config.eos_token_id`` (int or list)."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def pad_id(tokenizer) -> int:
    """The id generation pads with (pad, else EOS); ``ValueError`` without either."""
    return data_pad_id(tokenizer, required=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded so that each ends at the last column, where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _generation_config(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, eos: set[int], pad: int):
    """The ``transformers.GenerationConfig`` of :func:`generate`: greedy, or plain tempered top-p sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        eos_token_id=sorted(eos) if eos else None,
        pad_token_id=pad,
        use_cache=True,
        # Sampling draws from softmax(logits / T) cut at top_p and nothing else: the model's own
        # generation_config would otherwise fill these in (e.g. an instruct model's repetition penalty),
        # and on-policy losses that assume the student's distribution would be silently wrong.
        **(
            {
                "temperature": temperature,
                "top_p": top_p,
                "top_k": 0,
                "min_p": 0.0,
                "typical_p": 1.0,
                "repetition_penalty": 1.0,
                "no_repeat_ngram_size": 0,
                "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0,
            }
            if do_sample
            else {}
        ),
    )


def _cut_at_eos(new: list[int], eos: set[int]) -> tuple[list[int], int | None, int]:
    """``(tokens before the first EOS, that EOS or None, tokens generated up to and including it)``."""
    cut = next((j for j, t in enumerate(new) if t in eos), None)
    if cut is None:
        return new, None, len(new)
    return new[:cut], int(new[cut]), cut + 1


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    sort_by_length: bool = True,
    warmup: bool = False,
    progress: bool = True,
    desc: str = "generate",
    on_batch: Callable[[], None] | None = None,
    processor: Callable[[torch.Tensor, torch.Tensor], object] | None = None,
) -> Generations:
    """Continue each tokenized prompt; returns the new tokens in the input order.

    Prompts are (optionally) sorted by length into batches, so less padding is computed,
    left-padded and run with the KV cache. Greedy unless ``do_sample``. ``warmup`` runs
    one untimed 2-token call first so that tokens/s does not favour whichever model is
    timed second. ``no_grad`` rather than ``inference_mode``: buffers that models build
    lazily (rotary caches) would otherwise become inference tensors and break training.
    ``processor(ids, mask)`` (optional) makes a ``transformers`` logits processor for each
    left-padded batch, e.g. MiniLLM's teacher-mixed sampling.
    """
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    from .models.placement import input_device

    device = input_device(model)  # a model spread by a device map: where its embeddings run
    pad = pad_id(tokenizer)
    eos = eos_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if sort_by_length else list(range(len(prompts)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    config = _generation_config(max_new_tokens, do_sample, temperature, top_p, eos, pad)
    out: list[list[int]] = [[] for _ in prompts]
    stops: list[int | None] = [None for _ in prompts]
    num_tokens, seconds = 0, 0.0
    try:
        if warmup and batches and max_new_tokens > 0:
            ids, mask = left_pad([prompts[i] for i in batches[0]], pad, device)
            warm = GenerationConfig(**{**config.to_dict(), "max_new_tokens": min(2, max_new_tokens)})
            model.generate(input_ids=ids, attention_mask=mask, generation_config=warm)
        if do_sample:
            torch.manual_seed(seed)
        for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
            if max_new_tokens == 0:
                if on_batch:
                    on_batch()
                continue
            ids, mask = left_pad([prompts[i] for i in idx], pad, device)
            _sync(device)
            t0 = time.perf_counter()
            extra = {} if processor is None else {"logits_processor": [processor(ids, mask)]}
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
            _sync(device)
            seconds += time.perf_counter() - t0
            for r, new in zip(idx, seqs[:, ids.shape[1] :].tolist()):
                out[r], stops[r], counted = _cut_at_eos(new, eos)
                num_tokens += counted
            if on_batch:
                on_batch()
    finally:
        if was_training:
            model.train()
    return Generations(out, num_tokens, seconds, stops)
