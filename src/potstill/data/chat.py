"""Chat formatting with the tokenizer's own template, and the prompt mask.

Loss is taken only on response tokens: ``labels`` is ``-100`` on every prompt token.
The response tokens are those the template appends for the final assistant turn
(including its end-of-turn token), found by encoding the chat with and without it.
"""

from __future__ import annotations

from typing import Any

from ..errors import PotstillError


def _as_ids(out: Any) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt turns followed by the generation prompt of the assistant."""
    if getattr(tokenizer, "chat_template", None):
        return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    text = "\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_example(tokenizer, messages: list[dict[str, str]], response: str, max_length: int) -> dict[str, list[int]]:
    """``{"input_ids", "attention_mask", "labels", "prompt_ids", "response_ids"}`` for one pair.

    Truncation keeps the whole prompt when it can and cuts the response; an example whose
    prompt alone fills ``max_length`` has no response token left and is rejected.
    """
    prompt_ids = encode_prompt(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        full = _as_ids(
            tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], add_generation_prompt=False, tokenize=True
            )
        )
        if full[: len(prompt_ids)] != prompt_ids:
            raise PotstillError(
                "the chat template renders the prompt differently with and without the answer; "
                "use a tokenizer whose template is prefix-consistent or give plain prompt/response text"
            )
        response_ids = full[len(prompt_ids) :]
    else:
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            response_ids.append(tokenizer.eos_token_id)
    if len(prompt_ids) >= max_length:
        raise PotstillError(
            f"a prompt is {len(prompt_ids)} tokens, not shorter than data.max_length={max_length}; raise max_length"
        )
    response_ids = response_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
    }
