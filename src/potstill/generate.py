"""Batched generation with the KV cache (left padding, stop on EOS).

Generation temperature is a sampling parameter and has nothing to do with the
distillation temperature of :mod:`potstill.kd`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Generations:
    """``token_ids[i]``: the new tokens of prompt ``i`` (EOS and anything after it removed)."""

    token_ids: list[list[int]]
    seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


@torch.inference_mode()
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
    progress: bool = True,
    desc: str = "generate",
) -> Generations:
    """Generate continuations of tokenized ``prompts`` (each a list of ids).

    Prompts are sorted by length into batches (less padding), left-padded, run with the
    KV cache, and returned in the input order. Greedy unless ``do_sample``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        n = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), n), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, n - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[r, n - len(p) :] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
        if eos:
            kwargs["eos_token_id"] = sorted(eos)
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = seqs[:, n:].tolist()
        for r, i in enumerate(idx):
            toks = new[r]
            cut = next((j for j, t in enumerate(toks) if t in eos), None)
            out[i] = toks[:cut] if cut is not None else toks
    seconds = time.perf_counter() - start
    if was_training:
        model.train()
    return Generations(out, seconds)
