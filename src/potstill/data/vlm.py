"""Image-text examples for vision-language KD: one collator runs the teacher's and the student's processor.

An example is ``{"image": PIL.Image | path, "prompt": str, "answer": str}``. Each model's own processor
expands the image into its own number of image tokens (patch size, image size, scale factor, crops), so
the two sequences differ in length; the *text* tokens are the same ids in the same order in both, when
both processors share one tokenizer (checked: refused otherwise). Text token ``j`` of the teacher's
sequence is aligned with text token ``j`` of the student's; image tokens carry no label (``-100``).

Example (hand-checkable, one image first, Idefics3-style spans)::

    teacher: [<fake> <global-img> <image> x 16 <fake>] w0 w1 w2      text at positions 19, 20, 21
    student: [<fake> <global-img> <image> x 4  <fake>] w0 w1 w2      text at positions  7,  8,  9

Labels ``[B, T]`` hold the token id at loss positions and ``-100`` elsewhere (image span, prompt when
``loss_on="answer"``, padding, position 0). A causal LM's row ``t`` predicts ``labels[t + 1]`` (``potstill.signals
.target_index``), so the rows of both sides are listed in the same order -- batch-major, then text token
``j`` -- and row ``i`` of the teacher predicts the same token as row ``i`` of the student. The row that
predicts the first text token after an image is the image span's last position: it carries loss (it
predicts text), while every row whose target is an image token carries none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import PotstillError
from .collate import pad_id

__all__ = ["LOSS_ON", "VLMPairCollator", "check_same_tokenizer", "image_token_ids", "side_inputs"]

LossOn = Literal["answer", "text"]
LOSS_ON: tuple[str, ...] = ("answer", "text")

# Keys a processor returns that are not model inputs, or that the collator rebuilds itself.
_TEXT_KEYS = ("input_ids", "attention_mask")
_NOT_MODEL = ("mm_token_type_ids", "text_replacement_offsets")
TEACHER = "teacher_"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def check_same_tokenizer(teacher_processor, student_processor) -> None:
    """``PotstillError`` unless both processors' tokenizers map every token to the same id (text tokens are
    aligned by id: a student fed another tokenizer's ids learns garbage, TRL #4562)."""
    vt, vs = _tokenizer(teacher_processor).get_vocab(), _tokenizer(student_processor).get_vocab()
    if vt != vs:
        diff = len(set(vt.items()) ^ set(vs.items()))
        raise PotstillError(
            f"teacher and student processors use different tokenizers ({len(vt)} vs {len(vs)} tokens, {diff} "
            "entries differ); vision-language KD aligns text tokens by id: pick a student of the teacher's family"
        )


def image_token_ids(processor) -> set[int]:
    """The ids a processor writes into an image span: its image token, the boundary / global tokens it names
    (``fake_image_token``, ``global_image_token``, ``boi_token``, ...) and row/column tags ``<row_i_col_j>``."""
    import re

    vocab = _tokenizer(processor).get_vocab()
    ids: set[int] = set()
    for name in dir(processor):
        if name.startswith("_") or not ("image" in name or name.startswith(("boi_", "eoi_"))):
            continue
        value = getattr(processor, name, None)
        if name.endswith("token_id") and isinstance(value, int):
            ids.add(value)
        elif name.endswith("token") and isinstance(value, str) and value in vocab:
            ids.add(vocab[value])
    ids.update(i for t, i in vocab.items() if re.fullmatch(r"<row_\d+_col_\d+>", t))
    return ids


def _prompt_text(processor, prompt: str) -> str:
    """The prompt with one image placeholder: the processor's chat template when it has one, else
    ``<image>prompt\\n``."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    token = getattr(processor, "image_token", None)
    if token is None:
        raise PotstillError(
            f"{type(processor).__name__} has neither a chat template nor an image_token; use a VLM processor"
        )
    return f"{token}{prompt}\n"


def _load_image(image):
    if isinstance(image, (str, Path)):
        from PIL import Image

        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except OSError as err:
            raise PotstillError(f"image '{image}' cannot be read ({err}); fix the path in the data file") from None
    return image


def _span(marked: Tensor) -> Tensor:
    """``[T]`` bool: the image span of one prompt with one image, from its first marked (image) token to its last,
    so separators a processor writes between crops (SmolVLM's newlines between rows) belong to the image too."""
    where = marked.nonzero().squeeze(1)
    span = torch.zeros_like(marked)
    if where.numel():
        span[int(where[0]) : int(where[-1]) + 1] = True
    return span


class VLMPairCollator:
    """``[{"image", "prompt", "answer"}] -> batch`` with the student's encoding and the teacher's (``teacher_*``).

    Keys (``B`` examples; ``Ts`` / ``Tt`` the padded student / teacher lengths; right padding):

    * ``input_ids``, ``attention_mask``, ``labels``: ``[B, Ts]``, the student's;
      ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``: ``[B, Tt]``.
    * every other tensor its processor returns (``pixel_values [B, crops, 3, H, W]``, ``pixel_attention_mask``,
      ``image_grid_thw``, ...), the teacher's prefixed ``teacher_``; per-token ones are padded like ``input_ids``.
    * ``student_label_pos``, ``teacher_label_pos``: ``[n, 2]`` long, ``(example, position)`` of the label of
      text token ``j`` on each side, in the same order: row ``i`` of one is aligned with row ``i`` of the other.

    ``loss_on``: ``"answer"`` (the answer's tokens, prompt masked) or ``"text"`` (every text token, prompt too);
    image tokens never carry loss. One image per example: its span runs from the first to the last token marked
    as image (the processor's ``mm_token_type_ids``, or an id of :func:`image_token_ids`), so tags and newlines a
    processor writes between crops belong to it. The answer is tokenized once, without special tokens, plus EOS, and appended
    to the processed prompt on both sides (so the answer's ids are identical by construction).
    """

    def __init__(
        self,
        teacher_processor,
        student_processor,
        *,
        loss_on: LossOn = "answer",
        max_length: int | None = None,
        add_eos: bool = True,
    ):
        if loss_on not in LOSS_ON:
            raise PotstillError(f"loss_on '{loss_on}' is unknown; use one of {LOSS_ON}")
        check_same_tokenizer(teacher_processor, student_processor)
        self.teacher_processor = teacher_processor
        self.student_processor = student_processor
        self.loss_on = loss_on
        self.max_length = max_length
        self.add_eos = add_eos
        self.tokenizer = _tokenizer(student_processor)
        self.pad_token_id = pad_id(self.tokenizer)

    # ------------------------------------------------------------------ one side
    def _answer_ids(self, answer: str) -> list[int]:
        ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if self.add_eos and eos is not None:
            ids.append(int(eos))
        return ids

    def _encode_side(self, processor, images: list, prompts: list[str], answers: list[list[int]]) -> dict:
        texts = [_prompt_text(processor, p) for p in prompts]
        enc = processor(
            images=[[im] for im in images],
            text=texts,
            padding=True,
            return_tensors="pt",
            return_mm_token_type_ids=True,
        )
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        marked = torch.isin(ids, torch.tensor(sorted(image_token_ids(processor)), dtype=ids.dtype))
        if enc.get("mm_token_type_ids") is not None:
            marked |= enc["mm_token_type_ids"].bool()
        seqs, is_img, labels = [], [], []
        for b in range(ids.shape[0]):
            p_ids, p_img = ids[b][mask[b]].tolist(), _span(marked[b][mask[b]]).tolist()
            a_ids = answers[b]
            text_labels = [(-100 if im else t) if self.loss_on == "text" else -100 for t, im in zip(p_ids, p_img)]
            seqs.append(p_ids + a_ids)
            is_img.append(p_img + [False] * len(a_ids))
            labels.append(text_labels + a_ids)
        n = max(len(s) for s in seqs)
        if self.max_length is not None and n > self.max_length:
            raise PotstillError(
                f"an example expands to {n} tokens (image tokens included), over max_length={self.max_length}; "
                "raise max_length or shorten the prompt/answer"
            )
        out = {
            "input_ids": torch.full((len(seqs), n), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(seqs), n), dtype=torch.long),
            "labels": torch.full((len(seqs), n), -100, dtype=torch.long),
        }
        text = torch.zeros((len(seqs), n), dtype=torch.bool)
        for b, (s, lab, im) in enumerate(zip(seqs, labels, is_img)):
            out["input_ids"][b, : len(s)] = torch.tensor(s)
            out["attention_mask"][b, : len(s)] = 1
            out["labels"][b, : len(s)] = torch.tensor(lab)
            text[b, : len(s)] = ~torch.tensor(im, dtype=torch.bool)
        # the first token is predicted by no row: unlabelled, so every label is a loss row and Trainer's
        # num_items_in_batch (shifted or not) equals the rows of both sides
        out["labels"][:, 0] = -100
        for key, value in enc.items():
            if key in _TEXT_KEYS or key in _NOT_MODEL or not torch.is_tensor(value):
                continue
            if value.shape == ids.shape:  # per-token (token_type_ids): zeros past the prompt
                grown = torch.zeros((len(seqs), n), dtype=value.dtype)
                for b in range(len(seqs)):
                    k = int(mask[b].sum())
                    grown[b, :k] = value[b][mask[b]]
                value = grown
            out[key] = value
        out["_text"] = text
        return out

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        for f in features:
            missing = [k for k in ("image", "prompt", "answer") if k not in f]
            if missing:
                raise PotstillError(f"a VLM example lacks {missing}; each needs image, prompt and answer")
        images = [_load_image(f["image"]) for f in features]
        prompts = [str(f["prompt"]) for f in features]
        answers = [self._answer_ids(str(f["answer"])) for f in features]
        student = self._encode_side(self.student_processor, images, prompts, answers)
        teacher = self._encode_side(self.teacher_processor, images, prompts, answers)
        s_pos, t_pos = self._align(student, teacher)
        batch = {k: v for k, v in student.items() if k != "_text"}
        batch.update({TEACHER + k: v for k, v in teacher.items() if k != "_text"})
        batch["student_label_pos"], batch["teacher_label_pos"] = s_pos, t_pos
        return batch

    @staticmethod
    def _align(student: dict, teacher: dict) -> tuple[Tensor, Tensor]:
        """``(student_label_pos, teacher_label_pos)``, each ``[n, 2]``; refuses when the text tokens or the
        labels of an example differ between the two sides."""
        for b in range(student["input_ids"].shape[0]):
            s_text = student["input_ids"][b][student["_text"][b] & student["attention_mask"][b].bool()]
            t_text = teacher["input_ids"][b][teacher["_text"][b] & teacher["attention_mask"][b].bool()]
            if not torch.equal(s_text, t_text):
                raise PotstillError(
                    f"example {b}: the teacher's and the student's text tokens differ ({t_text.numel()} vs "
                    f"{s_text.numel()}) outside the image span; use processors with one tokenizer and chat template"
                )
        s_pos = (student["labels"] != -100).nonzero()
        t_pos = (teacher["labels"] != -100).nonzero()
        s_lab = student["labels"][s_pos[:, 0], s_pos[:, 1]]
        t_lab = teacher["labels"][t_pos[:, 0], t_pos[:, 1]]
        if s_pos.shape != t_pos.shape or not torch.equal(s_lab, t_lab) or not torch.equal(s_pos[:, 0], t_pos[:, 0]):
            raise PotstillError(
                "the teacher's and the student's labels do not align token for token; use processors with one "
                "tokenizer and chat template"
            )
        return s_pos, t_pos


def side_inputs(batch: dict[str, Tensor], side: Literal["student", "teacher"]) -> tuple[Tensor, Tensor, Tensor, dict]:
    """``(input_ids, attention_mask, labels, extra model kwargs)`` of one side of a :class:`VLMPairCollator`
    batch (``pixel_values``, ``pixel_attention_mask``, ... go in the kwargs)."""
    prefix = TEACHER if side == "teacher" else ""
    skip = {"student_label_pos", "teacher_label_pos", "labels", "input_ids", "attention_mask"}
    extras = {}
    for key, value in batch.items():
        if side == "teacher":
            if not key.startswith(TEACHER) or key in skip:
                continue
            name = key[len(TEACHER) :]
        else:
            if key.startswith(TEACHER) or key in skip:
                continue
            name = key
        if name in skip:
            continue
        extras[name] = value
    return batch[prefix + "input_ids"], batch[prefix + "attention_mask"], batch[prefix + "labels"], extras
