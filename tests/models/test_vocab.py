"""align_vocab: padding rows align, different tokenizers are refused."""

from __future__ import annotations

import pytest

from potstill.errors import PotstillError, VocabMismatchError
from potstill.fingerprints import tokenizer_fingerprint
from potstill.models.vocab import align_vocab


def _wordlevel(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


WORDS = [f"w{i}" for i in range(97)]  # 3 specials + 97 words = 100 tokens


def test_padding_rows_align():
    t, s = _wordlevel(WORDS), _wordlevel(WORDS)
    assert len(t) == 100
    assert align_vocab(t, s, 100, 128) == 100
    assert align_vocab(t, s, 128, 100) == 100
    assert align_vocab(t, t, 128, 128) == 100
    assert tokenizer_fingerprint(t) == tokenizer_fingerprint(s)


def test_head_smaller_than_tokenizer_refused():
    t = _wordlevel(WORDS)
    with pytest.raises(PotstillError, match="resize"):
        align_vocab(t, t, 100, 99)


def test_different_tokenizer_refused():
    t = _wordlevel(WORDS)
    s = _wordlevel(list(reversed(WORDS)))
    with pytest.raises(VocabMismatchError) as err:
        align_vocab(t, s, 100, 100)
    msg = str(err.value)
    assert "\n" not in msg
    assert "96 of 100 tokens" in msg  # the middle word w48 keeps its id
    assert "cross-tokenizer" in msg
    assert tokenizer_fingerprint(t) != tokenizer_fingerprint(s)


def test_different_special_tokens_refused():
    t = _wordlevel(WORDS)
    s = _wordlevel(WORDS)
    s.eos_token = "w0"
    with pytest.raises(VocabMismatchError, match="special tokens"):
        align_vocab(t, s, 100, 100)


def test_fingerprint_sees_chat_template(tiny_tokenizer):
    a = tokenizer_fingerprint(tiny_tokenizer)
    assert a == tokenizer_fingerprint(tiny_tokenizer) and len(a) == 64
    tiny_tokenizer.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(tiny_tokenizer) != a
