"""Vision-language KD on a tiny random Idefics3 (SmolVLM-shaped) pair: held-out forward KL on text tokens.

The pair: teacher (vision patch 4 -> 16 image tokens per image, text 2 x 64), student (patch 8 -> 4 image
tokens, text 1 x 32), one locally trained byte-level BPE tokenizer (no hub), random 32 px images, prompts from
a fixed list, answers of random words. Arms, each for 3 seeds (model init, data and batches seeded alike):

* ``kd``: :class:`potstill.kd.vlm.VLMKDTrainer`, forward KL on the answer tokens (alpha 0).
* ``ce_only``: the same trainer at alpha 1 (CE on the answers, no teacher): the no-teacher baseline.

Reported: held-out forward KL(p_teacher || q_student) per answer token before and after N steps, mean and std
over seeds, and the after/before ratio of each arm. With random weights the teacher is near uniform, so the
numbers say "the student moves toward the teacher on text tokens across mismatched image expansions", not
anything about real VLM quality.

Usage: ``python benchmarks/survey_vlm.py [--steps N] [--quick] [--out PATH]``; prints one line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import summary_line, write_json_atomic  # noqa: E402

SPAN = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
WORDS = "the cat sat on a red mat and the dog ran to the park with two small apples near blue water".split()
PROMPTS = ["What is in the picture?", "Describe the image.", "What color is it?", "Name one thing you see."]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *SPAN, *ROW_COL]
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS), *PROMPTS, "User: Assistant:"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        additional_special_tokens=special[2:3] + SPAN + ROW_COL,
    )


def processor(tok, patch: int, size: int = 32):
    import copy

    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": size}, max_image_size={"longest_edge": size}, do_image_splitting=False
    )
    seq = (size // patch) ** 2 // 4  # scale factor 2
    return Idefics3Processor(
        image_processor=ip, tokenizer=copy.deepcopy(tok), image_seq_len=seq, chat_template=TEMPLATE
    )


def vlm(proc, patch: int, hidden: int, layers: int, seed: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tok = proc.tokenizer
    vision = Idefics3VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        scale_factor=2,
        image_token_id=proc.image_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(cfg).float().eval()


def examples(n: int, seed: int) -> list[dict]:
    from PIL import Image

    rs = np.random.RandomState(seed)
    return [
        {
            "image": Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)),
            "prompt": PROMPTS[i % len(PROMPTS)],
            "answer": " ".join(rs.choice(WORDS, 4 + i % 4)),
        }
        for i in range(n)
    ]


def one_run(tok, seed: int, alpha: float, steps: int, n_train: int, n_eval: int) -> dict:
    from potstill.data.vlm import VLMPairCollator
    from potstill.kd.vlm import VLMKDConfig, VLMKDTrainer, vlm_forward_kl

    tp, sp = processor(tok, patch=4), processor(tok, patch=8)
    teacher = vlm(tp, patch=4, hidden=64, layers=2, seed=1000 + seed)
    student = vlm(sp, patch=8, hidden=32, layers=1, seed=2000 + seed)
    col = VLMPairCollator(tp, sp, loss_on="answer")
    train, held = examples(n_train, seed), examples(n_eval, 10_000 + seed)
    before = vlm_forward_kl(student, teacher, held, col)
    with tempfile.TemporaryDirectory() as out:
        args = VLMKDConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            logging_steps=10_000,
            disable_tqdm=True,
            seed=seed,
            use_cpu=True,
            alpha=alpha,
        )
        t0 = time.perf_counter()
        VLMKDTrainer(student, teacher, args, data_collator=col, train_dataset=train).train()
        seconds = time.perf_counter() - t0
    after = vlm_forward_kl(student, teacher, held, col)
    return {"seed": seed, "kl_before": before, "kl_after": after, "ratio": after / before, "train_s": seconds}


def stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="3 steps, 8 train / 4 eval examples (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "survey_vlm.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps, n_train, n_eval = (3, 8, 4) if a.quick else (a.steps, 32, 16)
    tok = tokenizer()
    seeds = [0, 1, 2]
    t0 = time.perf_counter()
    arms = {
        name: [one_run(tok, s, alpha, steps, n_train, n_eval) for s in seeds]
        for name, alpha in (("kd", 0.0), ("ce_only", 1.0))
    }
    summary = {
        name: {k: stats([r[k] for r in runs]) for k in ("kl_before", "kl_after", "ratio")}
        for name, runs in arms.items()
    }
    kd, ce = summary["kd"]["kl_after"], summary["ce_only"]["kl_after"]
    gap = ce["mean"] - kd["mean"]
    verdict = "kd lower" if gap > kd["std"] + ce["std"] else "no measurable difference"
    result = {
        "setting": {
            "steps": steps,
            "batch_size": 4,
            "lr": 3e-3,
            "n_train": n_train,
            "n_eval": n_eval,
            "seeds": seeds,
            "quick": a.quick,
            "loss_on": "answer",
            "teacher": "Idefics3 tiny random: vision patch 4 (16 image tokens), text 2 layers x 64",
            "student": "Idefics3 tiny random: vision patch 8 (4 image tokens), text 1 layer x 32",
            "device": "cpu, 1 thread",
        },
        "arms": arms,
        "summary": summary,
        "kd_vs_ce_only_after": {"kd_over_ce_only": kd["mean"] / ce["mean"], "verdict": verdict},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(a.out, result)
    print(
        summary_line(
            "survey_vlm",
            {
                "steps": steps,
                "kd_kl_before": summary["kd"]["kl_before"]["mean"],
                "kd_kl_after": kd["mean"],
                "kd_after_over_before": summary["kd"]["ratio"]["mean"],
                "ce_only_after_over_before": summary["ce_only"]["ratio"]["mean"],
                "kd_over_ce_only": kd["mean"] / ce["mean"],
                "verdict": verdict,
            },
        )
    )


if __name__ == "__main__":
    main()
