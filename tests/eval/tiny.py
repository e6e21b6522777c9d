"""Tiny word-level tokenizer, tiny random Llamas and examples for the eval tests (no hub).

The word-level tokenizer decodes to space-separated alphanumeric words, so ROUGE-L
(whose tokenizer keeps only ``[a-z0-9]`` runs) sees every generated token.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<unk>", "<user>", "<bot>"]
WORDS = SPECIALS + [f"w{i}" for i in range(64 - len(SPECIALS))]


def make_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<bot>"],
    )


def make_llama(*, seed: int, vocab: int = 64, hidden: int = 32, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


def make_examples(tokenizer, n: int = 5, seed: int = 0) -> list[dict]:
    """Prompts of varied lengths (so batches need padding); responses end with EOS."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        prompt_words = torch.randint(5, 64, (2 + (3 * i) % 7,), generator=g).tolist()
        response_words = torch.randint(5, 64, (1 + (2 * i) % 5,), generator=g).tolist()
        prompt_ids = [3] + prompt_words + [4]
        examples.append(
            {
                "prompt_ids": prompt_ids,
                "response_ids": response_words + [tokenizer.eos_token_id],
                "reference": tokenizer.decode(response_words, skip_special_tokens=True),
            }
        )
    return examples
