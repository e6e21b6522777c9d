"""Plain helpers shared by several test modules (fixtures live in conftest.py).

* CLI: ``PAIRS`` (the tiny data set of the ``assets`` fixture; ``pair_examples``: its evaluation examples),
  ``scaled_student`` (a recipe's tiny student),
  ``recipe`` (a distill recipe dict over ``assets`` with dotted-key patches) and ``write`` (a file from text
  or a YAML dump).
* select: ``pool_pairs`` (the selection pool of the ``data_file`` fixture, with an exact and a near
  duplicate of ``DUP``) and ``srecipe`` (a select recipe dict).
* classifier KD: ``toy_examples`` (a linearly separable toy task), ``tiny_bert_tokenizer`` and ``tiny_bert``.
* dataset distillation: the classifier toy of condense / select / eval-data (``DD_FILLER``,
  ``dd_toy_examples``, ``dd_tokenizer``, ``dd_bert``) and the a*/b* word toy of condense / protocol
  (``AB_WORDS``, ``ab_word_tokenizer``).
* cross-tokenizer KD: ``make_metaspace_tokenizer`` (a Gemma-like teacher tokenizer), ``random_llama``
  and ``encode_cross_pairs``.
* multi-process runs: ``accelerate_launch`` (the command of an ``accelerate launch`` on N CPU processes).
* KD trainers: ``one_step_cpu_args`` (the arguments of one seeded SGD step on CPU, for any trainer config).
* logit KD: ``KD_PAIRS``, ``encode_kd_pairs``, ``kd_dataset``, ``kd_cfg`` (a one-step CPU ``KDConfig``) and
  ``kd_ref_loss`` (an independent full-logit reference of the KD loss).
* on-policy / contrastive / MiniLLM KD: ``FakeCache`` (a cache that must never be read), ``contrastive_cfg``,
  ``fake_samples`` (deterministic stand-in student samples) and ``minillm_cfg``.
* divergences: ``DIVERGENCE_PARAMS`` and the parametrization ``DIVERGENCE_CASES`` / ``DIVERGENCE_IDS``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import yaml

from potstill.divergences import DIVERGENCES

if TYPE_CHECKING:
    from potstill.data.classification import Example

# ------------------------------------------------------------------------------ CLI

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Count from one to five:", "one, two, three, four, five"),
    ("Translate hello into Spanish:", "hola"),
    ("Please answer in one short sentence.", "Sure, here is a short answer."),
    ("What do the children do?", "They play in the park."),
    ("Name a fruit.", "I like apples."),
]


def scaled_student() -> dict:
    """A recipe's tiny ``scaled`` student (1 layer, width 32, 2 heads, 1 kv head), a fresh dict each call."""
    return {"kind": "scaled", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}


def recipe(assets, out: Path, **patch) -> dict:
    root, teacher, _, _, data = assets
    r = {
        "output_dir": str(out),
        "teacher": {"model": str(teacher)},
        "student": scaled_student(),
        "data": {"source": {"kind": "file", "path": str(data)}, "eval_size": 3, "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3},
        "runs": [{"name": "sft", "alpha": 1.0}, {"name": "kd", "alpha": 0.0, "divergence": {"name": "forward_kl"}}],
        # the embedding spread loads an encoder: tests that want it turn it on (tests/eval/test_diversity.py)
        "eval": {"max_new_tokens": 4, "batch_size": 4, "embedding_diversity": False},
        "device": "cpu",
    }
    for key, value in patch.items():
        node = r
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value
    return r


def pair_examples(tok, n: int = 4) -> list[dict]:
    """The first ``n`` of ``PAIRS`` as evaluation examples: ``prompt_ids``, ``response_ids`` (+ EOS), ``reference``."""
    return [
        {
            "prompt_ids": tok(p, add_special_tokens=False)["input_ids"],
            "response_ids": tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            "reference": r,
        }
        for p, r in PAIRS[:n]
    ]


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


# --------------------------------------------------------------------------- select

_TOPICS = [
    "the sea",
    "a red apple",
    "the park",
    "seven days",
    "the blue sky",
    "a small model",
    "Paris",
    "the lazy dog",
    "a book",
    "the children",
    "four numbers",
    "the weather",
    "a short poem",
    "the teacher",
]
DUP = "The quick brown fox jumps over the lazy dog and the small model learns from the large model today."
NEAR = "The quick brown fox jumps over the lazy dog and the small model learns from the large model now."


def pool_pairs() -> list[tuple[str, str]]:
    pairs = [
        (f"Write one sentence about {t}.", f"Here is a sentence about {t}: I like {t} very much.") for t in _TOPICS
    ]
    pairs += [
        (f"What do you know about {t}?", f"{t.capitalize()} is nice, and the weather is good.") for t in _TOPICS[:8]
    ]
    # an exact duplicate (after case/space normalization) and a near-duplicate of one text
    pairs += [
        ("Tell me about the fox.", DUP),
        ("tell me  about the fox.", DUP.lower()),
        ("Tell me about the fox.", NEAR),
    ]
    return pairs


def srecipe(assets, data_file, out: Path, **select) -> dict:
    return {
        "output_dir": str(out),
        "teacher": {"model": str(assets[1])},
        "student": {"kind": "from_teacher", "layers": 1},
        "data": {"source": {"kind": "file", "path": str(data_file)}, "eval_size": 4, "max_length": 64},
        "select": {"budget": 0.25, "batch_size": 8, **select},
        "device": "cpu",
    }


# -------------------------------------------------------------------- classifier KD

FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
    "really",
    "quite",
    "very",
    "plot",
    "acting",
    "story",
    "it",
    "this",
    "one",
]
POSITIVE = ["good", "great", "fine"]
NEGATIVE = ["bad", "awful", "poor"]


def toy_examples(n: int, seed: int, *, filler: list[str] = FILLER, max_words: int = 7) -> list[Example]:
    """Filler words (2..``max_words`` of ``filler``) plus one class word: label 1 iff the class word is
    positive (linearly separable)."""
    from potstill.data.classification import Example

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(filler) for _ in range(rng.randint(2, max_words))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        out.append(Example(" ".join(words), label))
    rng.shuffle(out)
    return out


def tiny_bert_tokenizer(filler: list[str] = FILLER):
    """A word-level BERT-style tokenizer over the toy vocabulary (``[CLS] text [SEP]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + filler + POSITIVE + NEGATIVE)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    )


def tiny_bert(tok, *, layers=3, hidden=32, heads=2, seed=0):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(cfg, add_pooling_layer=False).eval()


# --------------------------------------------------------------- cross-tokenizer KD

TEACHER_CORPUS = """
The capital of France is Paris. Paris is a large city and the capital is old.
What is two plus two? Two plus two is four. Count from one to ten, please.
The sea is blue and the waves are loud at night. A student learns from a teacher.
Knowledge distillation trains a small model to imitate a large model on the same text.
"""


def fast_tokenizer(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **special)


def make_metaspace_tokenizer(vocab_size: int = 160):
    """A Gemma-like teacher tokenizer: BPE on "▁"-marked text with byte fallback and a BOS
    post-processor (offsets of "▁x" tokens include the space; bytes share one span)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False
    )
    lines = [x for x in TEACHER_CORPUS.strip().splitlines() if x.strip()]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = n + b
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return fast_tokenizer(tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def random_llama(vocab: int, seed: int, hidden: int = 32, layers: int = 1):
    """A seeded random ``LlamaForCausalLM`` (2 heads, 1 kv head), fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


CROSS_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Two plus two is four, café."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("Count from one to ten:", "one, two, three"),
]


def encode_cross_pairs(tok):
    """``CROSS_PAIRS`` encoded as chat examples (max length 128) by ``tok``."""
    from potstill.data import encode_example

    return [encode_example(tok, [{"role": "user", "content": p}], r, 128) for p, r in CROSS_PAIRS]


# ----------------------------------------------------------- multi-process runs (kd/test_ddp.py, ...)


def accelerate_launch(*args: str, processes: int = 2) -> list[str]:
    """The command that runs ``args`` (a script and its arguments, or ``-m module ...``) as ``processes``
    processes of one machine under ``accelerate launch``: its torchrun path (``--multi_gpu``; without GPUs
    the run's ``use_cpu`` / ``device: cpu`` makes them CPU processes with gloo), no mixed precision, no
    dynamo, a free port."""
    from helpers_proc import free_port

    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]


# ------------------------------------------------------------------ KD trainer arguments


def one_step_cpu_args(tmp_path, **overrides) -> dict:
    """The trainer arguments of the KD tests' one CPU step: batch 4, one step of plain SGD at lr 0.1 on a
    constant schedule, seeded (``seed`` and ``data_seed`` 0), logging every step, no saving, no report, no
    progress bar, under ``tmp_path / "out"``; ``overrides`` replace or add keys."""
    return (
        dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            logging_steps=1,
            seed=0,
            data_seed=0,
            disable_tqdm=True,
        )
        | overrides
    )


# ------------------------------------------------------------ logit KD (kd/test_logit.py)

KD_PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night, so we walk to the park."),
    ("How many days are in a week?", "Seven."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Count from one to ten:", "one, two, three, four, five, six, seven, eight, nine, ten"),
    ("Translate hello into Spanish:", "hola"),
    ("Please answer the question in one short sentence.", "Sure, here is a short answer."),
]


def encode_kd_pairs(tok):
    """``KD_PAIRS`` encoded as chat examples (max length 128) by ``tok``."""
    from potstill.data import encode_example

    return [encode_example(tok, [{"role": "user", "content": p}], r, 128) for p, r in KD_PAIRS]


def kd_dataset(tok):
    """``encode_kd_pairs(tok)`` as a ``datasets.Dataset`` (input_ids, attention_mask, labels)."""
    from datasets import Dataset

    return Dataset.from_list(
        [{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encode_kd_pairs(tok)]
    )


def kd_cfg(tmp_path, **kw):
    """A one-step CPU ``KDConfig`` (batch 4, SGD at lr 0.1, constant schedule, seeded) under ``tmp_path / "out"``."""
    from potstill.kd import KDConfig

    return KDConfig(**(one_step_cpu_args(tmp_path, dataloader_drop_last=False) | kw))


def kd_ref_loss(student, teacher, batch, alpha, T=1.0):
    """Independent reference: full logits, torch's own kl_div / cross_entropy, mean over valid tokens."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    y = batch["labels"][:, 1:]
    valid = y != -100
    ce = F.cross_entropy(s[valid], y[valid], reduction="sum")
    if alpha == 1.0:
        return ce / valid.sum()
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    kl = F.kl_div(F.log_softmax(s[valid] / T, -1), F.log_softmax(t[valid] / T, -1), log_target=True, reduction="sum")
    return (alpha * ce + (1 - alpha) * kl) / valid.sum()


# ---------------------------------------------------------- on-policy KD (kd/test_onpolicy.py)


class FakeCache:
    """A teacher-signal cache that must never be read (the trainer has to refuse it first)."""

    temperature = None
    vocab_size = None

    def signal(self, batch):
        raise AssertionError


# ------------------------------------------------------- contrastive KD (kd/test_contrastive.py)


def contrastive_cfg(tmp_path, **kw):
    """A one-step CPU ``ContrastiveConfig`` (skew forward KL on the data side, skew reverse KL on the student's)."""
    from potstill.kd import ContrastiveConfig

    base = one_step_cpu_args(
        tmp_path,
        gen_max_new_tokens=6,
        divergence="skew_forward_kl",
        divergence_kwargs={"alpha": 0.1},
        student_divergence="skew_reverse_kl",
        student_divergence_kwargs={"alpha": 0.2},
    )
    return ContrastiveConfig(**(base | kw))


def fake_samples(batch: dict, tok, longer: bool = False) -> list[dict]:
    """Deterministic 'student samples' for a data batch: its prompts + the response reversed, minus a token
    (``longer``: the reversed response twice, so the student side is the wider one)."""
    feats = []
    for i in range(batch["input_ids"].shape[0]):
        ids, lab, m = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        k = int(m.sum())
        p = int((lab != -100).nonzero()[0])
        resp = ids[p:k].flip(0)[: max(1, k - p - 1)].tolist()
        resp = resp + resp if longer else resp
        feats.append(
            {"input_ids": ids[:p].tolist() + resp, "attention_mask": [1] * (p + len(resp)), "labels": [-100] * p + resp}
        )
    return feats


# ---------------------------------------------------------------- MiniLLM (kd/test_minillm.py)


def minillm_cfg(tmp_path, **kw):
    """A one-step CPU ``MiniLLMConfig`` (reverse KL, 6 new tokens per rollout)."""
    from potstill.kd import MiniLLMConfig

    return MiniLLMConfig(**(one_step_cpu_args(tmp_path, gen_max_new_tokens=6, divergence="reverse_kl") | kw))


# ---------------------------------------------------------- divergences (divergences/test_dense.py)

# Parameter settings per divergence, including the non-default corners of each.
DIVERGENCE_PARAMS = {
    "forward_kl": [{}],
    "reverse_kl": [{}],
    "generalized_jsd": [{}, {"beta": 0.1}, {"beta": 0.9}],
    "skew_forward_kl": [{}, {"alpha": 0.5}],
    "skew_reverse_kl": [{}, {"alpha": 0.5}],
    "total_variation": [{}],
    "alpha_beta_divergence": [
        {},
        {"alpha": 0.2, "beta": 0.7},
        {"alpha": 1.5, "beta": -0.5},
        {"alpha": 1.0, "beta": 0.0},
        {"alpha": 0.0, "beta": 1.0},
        {"alpha": 0.5, "beta": 0.0},
        {"alpha": 0.0, "beta": 0.3},
        {"alpha": 0.4, "beta": -0.4},
        {"alpha": 0.0, "beta": 0.0},
    ],
    "adaptive_kl": [{}, {"mu": 0.8}],
    "bild": [{}, {"top_k": 3}, {"top_k": 5, "student_led": False}],
}
# (name, params) for every registered divergence and each of its settings, and their pytest ids.
DIVERGENCE_CASES = [(n, p) for n in list(DIVERGENCES) for p in DIVERGENCE_PARAMS[n]]
DIVERGENCE_IDS = [f"{n}-{p}" for n, p in DIVERGENCE_CASES]


# ------------------------------------------ dataset distillation (dd/test_condense_recipe.py, ...)

DD_FILLER = FILLER[:12]  # the condense / select / eval-data toy: fewer filler words, 2..6 a sentence


def dd_toy_examples(n: int, seed: int) -> list[Example]:
    """The dd classifier toy (:func:`toy_examples` over ``DD_FILLER``, 2..6 filler words)."""
    return toy_examples(n, seed, filler=DD_FILLER, max_words=6)


def dd_tokenizer():
    """The word-level BERT-style tokenizer over the dd toy's vocabulary."""
    return tiny_bert_tokenizer(DD_FILLER)


def dd_bert(tok, seed: int = 0):
    """The dd toy's encoder: a 2-layer, 32-wide BERT."""
    return tiny_bert(tok, layers=2, seed=seed)


# a*/b* words (dd/test_condense.py, dd/test_protocol.py): class 0 draws a*, class 1 b*
AB_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]


def ab_word_tokenizer():
    """A whitespace word-level tokenizer over ``AB_WORDS`` (``[CLS] text [SEP]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(AB_WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
