"""Vision-language KD on tiny random Idefics3 (SmolVLM-shaped) pairs whose processors expand one image into
different numbers of tokens: text-token alignment by hand, image tokens carry no loss, parity with a float64
forward KL written from the definition, a real training run, the runner end to end, and refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from potstill.data.vlm import VLMPairCollator
from potstill.errors import PotstillError
from potstill.kd.vlm import VLMKDConfig, VLMKDTrainer, vlm_forward_kl

pytestmark = pytest.mark.usefixtures("one_thread")

SPAN_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>"]
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
# SmolVLM's turn layout, small: "<|im_start|>User:<image>prompt<end_of_utterance>\nAssistant:"
TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
WORDS = "the cat sat on a red mat and the dog ran to the park with two small apples".split()
PROMPTS = ["What is in the picture?", "Describe the image.", "What color is it?"]


def _vlm_tokenizer(base):
    tok = copy.deepcopy(base)
    tok.chat_template = None
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", *SPAN_TOKENS, "<end_of_utterance>", *ROW_COL]}
    )
    return tok


def _processor(tok, *, patch: int, scale: int, split: bool = False, size: int = 32):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * size if split else size},
        max_image_size={"longest_edge": size},
        do_image_splitting=split,
    )
    # image_seq_len = (image_size / patch)^2 / scale^2 (Idefics3's pixel shuffle)
    seq = (size // patch) ** 2 // scale**2
    return Idefics3Processor(
        image_processor=ip, tokenizer=copy.deepcopy(tok), image_seq_len=seq, chat_template=TEMPLATE
    )


def _vlm(proc, *, patch: int, scale: int, hidden: int, layers: int, seed: int, size: int = 32):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tok = proc.tokenizer
    vision = Idefics3VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=size,
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
        scale_factor=scale,
        image_token_id=proc.image_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Idefics3ForConditionalGeneration(cfg).float().eval()


def _examples(n: int, seed: int, size: int = 32) -> list[dict]:
    from PIL import Image

    rs = np.random.RandomState(seed)
    return [
        {
            "image": Image.fromarray(rs.randint(0, 255, (size, size, 3), dtype=np.uint8)),
            "prompt": PROMPTS[i % len(PROMPTS)],
            "answer": " ".join(rs.choice(WORDS, 4 + i % 3)),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def vlm_tok(_tiny_tokenizer_session):
    return _vlm_tokenizer(_tiny_tokenizer_session)


@pytest.fixture(scope="module")
def _pair_session(vlm_tok):
    """Teacher: patch 4 -> 16 image tokens, 2 text layers of 64; student: patch 8 -> 4 image tokens, 1 layer of 32."""
    tp, sp = _processor(vlm_tok, patch=4, scale=2), _processor(vlm_tok, patch=8, scale=2)
    teacher = _vlm(tp, patch=4, scale=2, hidden=64, layers=2, seed=0)
    student = _vlm(sp, patch=8, scale=2, hidden=32, layers=1, seed=1)
    return teacher, student, tp, sp


@pytest.fixture
def pair(_pair_session):
    teacher, student, tp, sp = _pair_session
    return copy.deepcopy(teacher), copy.deepcopy(student), tp, sp


def _trainer(student, teacher, collator, out, *, steps: int = 1, data=(), **kw) -> VLMKDTrainer:
    args = VLMKDConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=kw.pop("lr", 3e-3),
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        loss_on=collator.loss_on,
        **kw,
    )
    return VLMKDTrainer(student, teacher, args, data_collator=collator, train_dataset=list(data))


# ---------------------------------------------------------------------------------------------- alignment


def test_text_token_j_of_teacher_is_text_token_j_of_student_by_hand(pair, vlm_tok):
    _, _, tp, sp = pair
    ex = _examples(1, seed=3)
    batch = VLMPairCollator(tp, sp, loss_on="text")(ex)
    t_ids, s_ids = batch["teacher_input_ids"][0], batch["input_ids"][0]
    # "<|im_start|>User:" then the span [<fake> <global-img> <image> x N <fake>]: N = 16 (teacher), 4 (student)
    image = vlm_tok.convert_tokens_to_ids("<image>")
    assert int((t_ids == image).sum()) == 16 and int((s_ids == image).sum()) == 4
    start = int((s_ids == vlm_tok.convert_tokens_to_ids("<fake_token_around_image>")).nonzero()[0])
    assert start == int((t_ids == vlm_tok.convert_tokens_to_ids("<fake_token_around_image>")).nonzero()[0])
    # the text after the span sits 16 - 4 = 12 positions later in the teacher's sequence
    t_pos, s_pos = batch["teacher_label_pos"], batch["student_label_pos"]
    after = s_pos[:, 1] > start
    assert torch.equal(t_pos[after, 1], s_pos[after, 1] + 12)
    assert torch.equal(t_pos[~after, 1], s_pos[~after, 1])  # the prefix before the image is shared
    assert int(s_pos[after, 1].min()) == start + 1 + 1 + 4 + 1  # first text token after <fake><global>4x<fake>
    assert torch.equal(t_ids[t_pos[:, 1]], s_ids[s_pos[:, 1]])
    # no label on any image-span token, on either side
    for ids, labels in ((t_ids, batch["teacher_labels"][0]), (s_ids, batch["labels"][0])):
        span = torch.isin(ids, torch.tensor(vlm_tok.convert_tokens_to_ids(SPAN_TOKENS)))
        assert bool((labels[span] == -100).all()) and bool((labels[1:][~span[1:]] != -100).all())
        assert labels[0] == -100  # position 0 is predicted by no row


def test_alignment_with_image_splitting_and_answer_only_labels(vlm_tok):
    # the teacher cuts a 64 px image into 2 x 2 crops + a global image (5 x 16 tokens, row/col tags and newlines
    # inside the span); the student sees one 32 px image (4 tokens)
    tp = _processor(vlm_tok, patch=4, scale=2, split=True)
    sp = _processor(vlm_tok, patch=8, scale=2)
    ex = _examples(2, seed=5, size=64)
    col = VLMPairCollator(tp, sp, loss_on="answer")
    batch = col(ex)
    image = vlm_tok.convert_tokens_to_ids("<image>")
    assert (batch["teacher_input_ids"][0] == image).sum() == 5 * 16 and (batch["input_ids"][0] == image).sum() == 4
    answers = [col._answer_ids(e["answer"]) for e in ex]
    s_pos, t_pos = batch["student_label_pos"], batch["teacher_label_pos"]
    assert s_pos.shape[0] == sum(len(a) for a in answers)
    for side, pos in (("", s_pos), ("teacher_", t_pos)):
        got = batch[side + "input_ids"][pos[:, 0], pos[:, 1]]
        assert got.tolist() == [t for a in answers for t in a]  # answer tokens, in order, on both sides


class _MarksOnlyImageTokens:
    """A processor whose ``mm_token_type_ids`` mark only ``<image>`` tokens (what SmolVLMProcessor's generic
    ProcessorMixin marks) or are absent: the span's tags and newlines must still be found."""

    def __init__(self, inner, drop: bool):
        self.inner, self.drop = inner, drop

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __dir__(self):
        return dir(self.inner)

    def __call__(self, *args, **kwargs):
        enc = self.inner(*args, **kwargs)
        mm = enc.pop("mm_token_type_ids")
        if not self.drop:
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.inner.image_token_id).long()
        assert mm is not None
        return enc


@pytest.mark.parametrize("drop", [False, True], ids=["image-only-marks", "no-marks"])
def test_alignment_without_full_span_marks_matches(vlm_tok, drop):
    tp = _processor(vlm_tok, patch=4, scale=2, split=True)
    sp = _processor(vlm_tok, patch=8, scale=2)
    ex = _examples(2, seed=5, size=64)
    want = VLMPairCollator(tp, sp, loss_on="text")(ex)
    got = VLMPairCollator(_MarksOnlyImageTokens(tp, drop), _MarksOnlyImageTokens(sp, drop), loss_on="text")(ex)
    newline = vlm_tok.convert_tokens_to_ids("Ċ")  # byte-level "\n", written between the teacher's crop rows
    assert int((want["teacher_input_ids"] == newline).sum()) >= 2
    for key in ("labels", "teacher_labels", "student_label_pos", "teacher_label_pos"):
        assert torch.equal(got[key], want[key]), key


def test_different_tokenizers_are_refused_in_one_line(vlm_tok):
    other = copy.deepcopy(vlm_tok)
    other.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<extra_student_token>"]})
    with pytest.raises(PotstillError, match="different tokenizers") as err:
        VLMPairCollator(_processor(vlm_tok, patch=4, scale=2), _processor(other, patch=8, scale=2))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- the loss


def _reference_kl(teacher, student, tp, sp, examples) -> float:
    """Mean forward KL(p_t || q_s) in float64 over the text tokens, from the definition: each example alone
    (no padding), full logits, text positions = tokens outside the image span, paired in order."""
    span_ids = torch.tensor(tp.tokenizer.convert_tokens_to_ids(SPAN_TOKENS))
    t64, s64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for e in examples:
        logps, texts = [], []
        for model, proc in ((t64, tp), (s64, sp)):
            prompt = proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e["prompt"]}]}],
                add_generation_prompt=True,
            )
            enc = proc(images=[[e["image"]]], text=[prompt], return_tensors="pt")
            answer = proc.tokenizer(e["answer"], add_special_tokens=False)["input_ids"] + [proc.tokenizer.eos_token_id]
            ids = torch.cat([enc["input_ids"][0], torch.tensor(answer)])[None]
            with torch.no_grad():
                logits = model(
                    input_ids=ids,
                    pixel_values=enc["pixel_values"].double(),
                    pixel_attention_mask=enc["pixel_attention_mask"],
                ).logits[0]
            logps.append(torch.log_softmax(logits.double(), -1))
            texts.append((~torch.isin(ids[0], span_ids)).nonzero().squeeze(1))
        (lt, ls), (pt_, ps_) = logps, texts
        assert len(pt_) == len(ps_)
        for a, b in zip(pt_.tolist(), ps_.tolist()):
            if a == 0 or b == 0:  # the first token has no prediction
                continue
            p = lt[a - 1].exp()
            total += (p * (lt[a - 1] - ls[b - 1])).sum()
            count += 1
    return float(total / count)


def test_loss_equals_float64_text_only_forward_kl(pair, tmp_path):
    teacher, student, tp, sp = pair
    ex = _examples(3, seed=7)
    col = VLMPairCollator(tp, sp, loss_on="text")
    trainer = _trainer(student, teacher, col, tmp_path)
    loss = trainer.compute_loss(student, col(ex))
    assert float(loss) > 0
    torch.testing.assert_close(float(loss), _reference_kl(teacher, student, tp, sp, ex), rtol=1e-5, atol=1e-8)
    assert float(vlm_forward_kl(student, teacher, ex, col)) == pytest.approx(float(loss), rel=1e-5)


def _perturb_rows(teacher, rows: list[tuple[int, int]]):
    """A hook adding noise to the teacher's final hidden states at ``(example, position)``: its logits there change."""
    g = torch.Generator().manual_seed(0)

    def hook(module, args, output):
        output = output.clone()
        for b, p in rows:
            output[b, p] += 5.0 * torch.randn(output.shape[-1], generator=g)
        return output

    return teacher.model.text_model.norm.register_forward_hook(hook)


def test_teacher_logits_at_image_positions_do_not_change_the_loss(pair, tmp_path):
    teacher, student, tp, sp = pair
    col = VLMPairCollator(tp, sp, loss_on="text")
    batch = col(_examples(2, seed=11))
    trainer = _trainer(student, teacher, col, tmp_path)
    base = trainer.compute_loss(student, batch)
    ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    span = torch.isin(ids, torch.tensor(tp.tokenizer.convert_tokens_to_ids(SPAN_TOKENS))) & mask.bool()
    # rows whose target (the next token) is an image-span token
    image_rows = [(b, p - 1) for b, p in span.nonzero().tolist()]
    handle = _perturb_rows(teacher, image_rows)
    try:
        assert torch.equal(trainer.compute_loss(student, batch), base)
    finally:
        handle.remove()
    # control: the span's last position predicts the first text token after the image, so it carries loss
    last = [(b, int(span[b].nonzero().max())) for b in range(ids.shape[0])]
    handle = _perturb_rows(teacher, last)
    try:
        assert not torch.allclose(trainer.compute_loss(student, batch), base)
    finally:
        handle.remove()


def test_two_micro_batches_give_the_gradients_of_one_batch(pair, tmp_path):
    # normalized by the global count of text tokens (TRL #4719): two halves, each padded to its own length and
    # image expansion, sum to the whole batch, in loss and in the student's gradients
    teacher, student, tp, sp = pair
    col = VLMPairCollator(tp, sp, loss_on="text")
    ex = _examples(4, seed=13)
    trainer = _trainer(student, teacher, col, tmp_path)
    whole = col(ex)
    n = int((whole["labels"] != -100).sum())
    assert n == whole["student_label_pos"].shape[0]  # every label is a loss row (position 0 holds none)

    def grads(batches):
        student.zero_grad()
        total = sum(trainer.compute_loss(student, b, num_items_in_batch=n) for b in batches)
        total.backward()
        return total.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    student.train()
    l1, g1 = grads([whole])
    l2, g2 = grads([col(ex[:1]), col(ex[1:])])
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-8)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- training


def test_training_lowers_heldout_text_kl(pair, tmp_path):
    teacher, student, tp, sp = pair
    col = VLMPairCollator(tp, sp, loss_on="answer")
    train, held = _examples(16, seed=0), _examples(8, seed=1)
    before = vlm_forward_kl(student, teacher, held, col)
    torch.manual_seed(0)
    trainer = _trainer(student, teacher, col, tmp_path, steps=8, data=train)
    trainer.train()
    after = vlm_forward_kl(student, teacher, held, col)
    assert after < 0.7 * before, (before, after)
    # every loss token is an answer token: the image tokens never reached the loss
    epochs = 8 * 4 // len(train)  # 8 steps of 4 examples: each example twice
    assert trainer.loss_tokens == epochs * sum(len(col._answer_ids(e["answer"])) for e in train)


def test_config_refusals():
    with pytest.raises(PotstillError, match="loss_on"):
        VLMKDConfig(output_dir="x", loss_on="image", report_to=[])
    with pytest.raises(PotstillError, match="curriculum"):
        VLMKDConfig(output_dir="x", curriculum="easy_to_hard", report_to=[])


# ---------------------------------------------------------------------------------------------- recipe + runner


def _recipe(data: dict, base_dir=None):
    from potstill.recipes.base import validate_recipe
    from potstill.recipes.distill_vlm import VLMRecipe

    return validate_recipe(VLMRecipe, data, "distill-vlm", base_dir)


def test_example_recipe_validates_and_bad_keys_are_one_line(tmp_path):
    from pathlib import Path

    from potstill.recipes.base import read_recipe_file

    path = Path(__file__).parents[2] / "recipes" / "distill_vlm_smolvlm.yaml"
    r = _recipe(read_recipe_file(path), path.parent)
    assert r.verb == "distill-vlm" and not r.teacher.trust_remote_code and not r.student.trust_remote_code
    assert r.data.train.endswith("vlm/train.jsonl") and "$POTSTILL_DATA" not in r.data.train
    bad = {**read_recipe_file(path), "loss": {"loss_on": "image"}}
    with pytest.raises(PotstillError, match="loss.loss_on") as err:
        _recipe(bad)
    assert "\n" not in str(err.value)


def test_runner_end_to_end_on_saved_tiny_pair(pair, tmp_path):
    from transformers import AutoModelForImageTextToText

    from potstill.runners.distill_vlm import run, summary_line

    teacher, student, tp, sp = pair
    for name, model, proc in (("teacher", teacher, tp), ("student", student, sp)):
        model.save_pretrained(tmp_path / name)
        proc.save_pretrained(tmp_path / name)
    lines = []
    for i, e in enumerate(_examples(20, seed=2)):
        e["image"].save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": e["prompt"], "answer": e["answer"]}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    recipe = _recipe(
        {
            "verb": "distill-vlm",
            "teacher": {"model": "teacher"},
            "student": {"model": "student"},
            "data": {"train": "data.jsonl", "eval_fraction": 0.2},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "use_cpu": True},
            "output_dir": str(tmp_path / "out"),
        },
        tmp_path,
    )
    metrics = run(recipe)
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "student" / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert metrics["n_train"] == 16 and metrics["n_eval"] == 4
    assert metrics["heldout_forward_kl_after"] < metrics["heldout_forward_kl_before"]
    reloaded = AutoModelForImageTextToText.from_pretrained(out / "student")
    initial = AutoModelForImageTextToText.from_pretrained(tmp_path / "student")
    changed = [not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), initial.state_dict().values())]
    assert any(changed)  # the saved student is the trained one
    assert "held-out forward KL" in summary_line(metrics)
