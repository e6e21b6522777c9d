"""Evaluate a teacher and its students on the same examples.

Two passes per model:

* **teacher-forced** on ``prompt + response``, over the response positions only:
  forward KL(teacher || student) per token, top-1 agreement with the teacher, and the
  perplexity of the reference response. The teacher's body runs once per batch; its
  final hidden states are kept and projected through its head chunk by chunk, once per
  chunk, and every student is compared against that same chunk. So neither the teacher
  forward nor the teacher's ``[n, V]`` logits are paid per student.
* **greedy generation** from the prompt (batched with left padding, KV cache, stop at EOS,
  ``do_sample=False``): ROUGE-L of the decoded text against the reference, and throughput.

The distillation temperature plays no part here: KL is at T=1 and generation is greedy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import PotstillError, VocabMismatchError
from ..generate import pad_id as generation_pad_id
from ..models.head import final_hidden
from ..models.placement import input_device
from ..signals.online import target_index, target_rows
from .diversity import loop_share, self_bleu
from .metrics import count_parameters, distinct_n, expected_calibration_error, perplexity, rouge_l, teacher_forced_stats
from .report import GENERATIONS_KEY

__all__ = [
    "GENERATIONS_KEY",
    "METRIC_KEYS",
    "TEACHER",
    "collect_samples",
    "evaluate_runs",
    "metrics_only",
    "per_example_scores",
    "teacher_forced_inputs",
]

TEACHER = "teacher"
"""The name the teacher's own row is reported under."""

METRIC_KEYS = (
    "forward_kl",
    "top1_agreement",
    "perplexity",
    "ece",
    "rouge_l",
    "distinct_1",
    "distinct_2",
    "self_bleu",
    "loop_share",
    "params",
    "tokens_per_s",
)
"""The scalar metrics of one run, in report order."""


_CHUNK_ROWS = 1024  # rows of [rows, V] logits alive at once per model


def evaluate_runs(
    students: Mapping[str, torch.nn.Module],
    teacher: torch.nn.Module | None,
    tokenizer,
    examples: Sequence[dict],
    *,
    vocab_size: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate ``teacher`` (reported as ``"teacher"``) and each of ``students`` on ``examples``.

    Args:
        students: name -> causal LM sharing the teacher's tokenizer.
        teacher: the teacher causal LM; ``None`` for a black-box teacher (known only by the
            reference responses): no teacher row, and forward KL / top-1 agreement are ``nan``.
        tokenizer: the shared tokenizer (decoding, pad/EOS ids).
        examples: dicts with ``prompt_ids: list[int]`` (chat-formatted prompt including the
            generation prompt), ``response_ids: list[int]`` (reference response incl. EOS) and
            ``reference: str`` (reference response text).
        vocab_size: compare distributions on the first ``vocab_size`` logits (at most the
            smallest head). Default: the tokenizer's token space, as in training
            (:func:`potstill.models.align_vocab`): head rows beyond it are padding (heads that
            differ only by padding rows are aligned), and every head must cover it. All
            teacher-forced metrics, the teacher's own included, use this aligned vocabulary.
        batch_size: examples per batch, for both passes.
        max_new_tokens: generation budget per example; 0 skips generation (ROUGE-L and tokens/s are nan).
        progress: show a tqdm bar.

    Returns:
        ``{name: {"forward_kl": float, "top1_agreement": float, "perplexity": float,
        "rouge_l": float, "params": int, "tokens_per_s": float, "generations": list[str]}}``,
        teacher first, then students in the given order. ``forward_kl`` is the mean per
        response token of KL(p_teacher || p_student) in nats; ``top1_agreement`` the share
        of response positions whose argmax matches the teacher's; ``generations`` (see
        :data:`GENERATIONS_KEY`) the decoded greedy outputs, one per example. Use
        :func:`metrics_only` to drop them and :func:`collect_samples` to pick a few for a report.
        Metrics with nothing to average over (all responses empty) are ``nan``.

    A model passed both as teacher and as a student (the same object) is run once.
    Models are put in eval mode and each submodule's training flag is restored after.
    """
    from ..models.placement import head_on

    examples = _check_inputs(students, teacher, examples, batch_size, max_new_tokens)
    black_box = teacher is None
    # Without a teacher, the first student stands in as the reference of the teacher-forced
    # pass (only its perplexity is kept; KL and agreement are reported as nan).
    models: dict[str, torch.nn.Module] = {
        TEACHER: teacher if not black_box else next(iter(students.values())),
        **students,
    }
    # every head read on one device (the first student's): a teacher placed on its own device or spread by a
    # device map sends its rows there and has its head copied there once (potstill.models.placement)
    common = input_device(next(iter(students.values())) if students else models[TEACHER])
    heads = {name: head_on(m, common) for name, m in models.items()}
    vocab = _aligned_vocab({name: h.vocab for name, h in heads.items()}, tokenizer, vocab_size)
    heads = {name: h.with_vocab(vocab) if h.vocab != vocab else h for name, h in heads.items()}
    pad_id = generation_pad_id(tokenizer)
    # The same object under two names is run once and its rows/generations are shared.
    canonical = {name: next(n for n, m in models.items() if m is models[name]) for name in models}
    unique = [name for name in models if canonical[name] == name]

    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    sums, generations = _run_passes(models, heads, unique, tokenizer, batches, pad_id, vocab, max_new_tokens, progress)
    references = [ex["reference"] for ex in examples]
    results: dict[str, dict] = {}
    for name, model in models.items():
        if black_box and name == TEACHER:
            continue
        s = sums[canonical[name]]
        results[name] = _result_row(model, s, generations[canonical[name]], references, black_box, max_new_tokens)
    return results


def _check_inputs(students, teacher, examples: Sequence[dict], batch_size: int, max_new_tokens: int) -> list[dict]:
    """:func:`evaluate_runs`' arguments checked (one-line :class:`PotstillError`); the examples, each checked."""
    if not examples:
        raise PotstillError("no evaluation examples; check the eval split / `eval_size`")
    if TEACHER in students:
        raise PotstillError(f"a student is named {TEACHER!r}, which is reserved for the teacher's row; rename it")
    if batch_size < 1 or max_new_tokens < 0:
        raise PotstillError(f"batch_size must be >= 1 and max_new_tokens >= 0 (got {batch_size}, {max_new_tokens})")
    examples = [_check_example(i, ex) for i, ex in enumerate(examples)]
    if teacher is None and not students:
        raise PotstillError("nothing to evaluate: no teacher and no students")
    return examples


def _run_passes(models, heads, unique, tokenizer, batches, pad_id, vocab, max_new_tokens, progress):
    """The teacher-forced pass over every batch, then greedy generation by each of the ``unique`` models.

    Returns ``(sums, generations)``: per model the teacher-forced sums and ``(texts, n_tokens, seconds)``.
    Models are in eval mode meanwhile; each submodule's training flag is restored after.
    """
    from ..models import final_hidden

    saved_modes = [(mod, mod.training) for m in models.values() for mod in m.modules()]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(batches) * (1 + len(unique)), desc="eval", disable=not progress, leave=False)
    try:
        for m in models.values():
            m.eval()
        # no_grad, not inference_mode: buffers some models create lazily (rotary caches)
        # would otherwise become inference tensors and break training after a mid-run eval.
        with torch.no_grad():
            sums = {
                name: {"kl_sum": 0.0, "agree": 0, "nll_sum": 0.0, "n": 0, "conf": [], "correct": []} for name in unique
            }
            bar.set_postfix_str("teacher-forced")
            for batch in batches:
                _teacher_forced_batch(batch, models, heads, unique, sums, pad_id, vocab, final_hidden)
                bar.update(1)
            generations: dict[str, tuple[list[str], int, float]] = {}
            for name in unique:
                bar.set_postfix_str(f"generate {name}")
                generations[name] = _generate(
                    models[name], tokenizer, batches, pad_id, max_new_tokens, on_batch=lambda: bar.update(1)
                )
    finally:
        bar.close()
        for mod, mode in saved_modes:
            mod.training = mode
    return sums, generations


def _result_row(model, s: dict, generation: tuple[list[str], int, float], references, black_box, max_new_tokens):
    """One model's row of :func:`evaluate_runs` from its teacher-forced sums ``s`` and its generations."""
    texts, n_tokens, seconds = generation
    return {
        "forward_kl": float("nan") if black_box else _ratio(s["kl_sum"], s["n"]),
        "top1_agreement": float("nan") if black_box else _ratio(s["agree"], s["n"]),
        "perplexity": perplexity(s["nll_sum"], s["n"]),
        "ece": _ece(s),
        "rouge_l": rouge_l(texts, references) if max_new_tokens else float("nan"),
        "distinct_1": distinct_n(texts, 1) if max_new_tokens else float("nan"),
        "distinct_2": distinct_n(texts, 2) if max_new_tokens else float("nan"),
        "self_bleu": self_bleu(texts) if max_new_tokens else float("nan"),
        "loop_share": loop_share(texts) if max_new_tokens else float("nan"),
        "params": count_parameters(model),
        "tokens_per_s": n_tokens / seconds if seconds > 0 else float("nan"),
        GENERATIONS_KEY: texts,
    }


def metrics_only(results: Mapping[str, Mapping]) -> dict[str, dict]:
    """``results`` without the per-run :data:`GENERATIONS_KEY` lists (what ``metrics.json`` holds)."""
    return {name: {k: v for k, v in run.items() if k != GENERATIONS_KEY} for name, run in results.items()}


def collect_samples(
    results: Mapping[str, Mapping], examples: Sequence[dict], *, k: int = 3, tokenizer=None
) -> list[dict]:
    """Pick ``k`` examples, evenly spaced, and every run's generation for each.

    Returns ``[{"prompt": str, "reference": str, "outputs": {name: str}}]`` as
    ``report.write_report(samples=...)`` takes it. ``prompt`` is ``example["prompt"]`` when
    present, else ``prompt_ids`` decoded with ``tokenizer`` (special tokens skipped), else "".
    """
    n = len(examples)
    if n == 0 or k <= 0:
        return []
    k = min(k, n)
    indices = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    samples = []
    for i in indices:
        ex = examples[i]
        prompt = ex.get("prompt")
        if prompt is None:
            prompt = tokenizer.decode(ex["prompt_ids"], skip_special_tokens=True) if tokenizer is not None else ""
        outputs = {name: run[GENERATIONS_KEY][i] for name, run in results.items() if GENERATIONS_KEY in run}
        samples.append({"prompt": prompt.strip(), "reference": ex.get("reference", ""), "outputs": outputs})
    return samples


# -- teacher-forced pass ------------------------------------------------------------------


def teacher_forced_inputs(batch: Sequence[dict], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``prompt_ids + response_ids`` of each example, right-padded: ``(input_ids, attention_mask, labels)``, each
    ``[B, T]``, with labels -100 outside the response (positions start at 0 in every row)."""
    seqs = [ex["prompt_ids"] + ex["response_ids"] for ex in batch]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (ex, seq) in enumerate(zip(batch, seqs)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        labels[row, len(ex["prompt_ids"]) : len(seq)] = torch.tensor(ex["response_ids"], dtype=torch.long)
    return input_ids, attention_mask, labels


def _teacher_forced_batch(batch, models, heads, unique, sums, pad_id, vocab, final_hidden) -> None:
    """Accumulate :func:`teacher_forced_stats` sums of every model in ``unique`` for one batch."""
    input_ids, attention_mask, labels = teacher_forced_inputs(batch, pad_id)
    index = target_index(labels)
    targets = labels[:, 1:].reshape(-1)[index]
    if targets.numel() and int(targets.max()) >= vocab:
        raise VocabMismatchError(
            f"reference token id {int(targets.max())} is outside the compared vocabulary ({vocab}); "
            "raise `vocab_size` or check that the examples were tokenized with this tokenizer"
        )

    rows: dict[str, Tensor] = {}
    for name in unique:  # the teacher first: one forward per model per batch
        model = models[name]
        dev = _device(model)
        hidden = final_hidden(model, input_ids.to(dev), attention_mask.to(dev))
        rows[name] = target_rows(hidden, index.to(hidden.device)).to(heads[name].weight.device)
        del hidden

    n = int(index.numel())
    for start in range(0, n, _CHUNK_ROWS):
        end = min(start + _CHUNK_ROWS, n)
        teacher_logits = heads[TEACHER](rows[TEACHER][start:end])  # once per chunk, shared
        for name in unique:
            student_logits = teacher_logits if name == TEACHER else heads[name](rows[name][start:end])
            stats = teacher_forced_stats(student_logits, teacher_logits, targets[start:end])
            for key, value in stats.items():
                sums[name][key] += value
            # calibration of the next-token prediction against the reference token
            conf, pred = torch.softmax(student_logits.float(), -1).max(-1)
            sums[name]["conf"].append(conf.cpu())
            sums[name]["correct"].append((pred == targets[start:end].to(pred.device)).cpu())


def _ece(s: dict) -> float:
    """ECE (15 bins) of the next-token predictions over all reference positions of a run."""
    if not s["conf"]:
        return float("nan")
    return expected_calibration_error(torch.cat(s["conf"]), torch.cat(s["correct"]))


# -- generation pass ----------------------------------------------------------------------


def _generate(model, tokenizer, batches, pad_id, max_new_tokens, on_batch) -> tuple[list[str], int, float]:
    """Greedy generation for every example -> ``(texts, generated token count, seconds)``.

    Runs :func:`potstill.generate.generate` over the same batches (no re-sorting, one untimed
    warm-up); the text is decoded without EOS and special tokens.
    """
    from ..generate import generate

    prompts = [ex["prompt_ids"] for batch in batches for ex in batch]
    if max_new_tokens == 0:  # teacher-forced metrics only: nothing generated (ROUGE-L and throughput are nan)
        for _ in batches:
            on_batch()
        return [""] * len(prompts), 0, 0.0
    gen = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=max((len(b) for b in batches), default=1),
        sort_by_length=False,
        warmup=True,
        progress=False,
        on_batch=on_batch,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.token_ids]
    return texts, gen.num_tokens, gen.seconds


# -- helpers ------------------------------------------------------------------------------


def _check_example(i: int, ex) -> dict:
    if not isinstance(ex, Mapping):
        raise PotstillError(f"evaluation example {i} is a {type(ex).__name__}, not a dict")
    missing = [k for k in ("prompt_ids", "response_ids", "reference") if k not in ex]
    if missing:
        raise PotstillError(
            f"evaluation example {i} lacks {', '.join(missing)}; each needs prompt_ids, response_ids and reference"
        )
    if len(ex["prompt_ids"]) == 0:
        raise PotstillError(f"evaluation example {i} has an empty prompt; drop it or fix the prompt formatting")
    out = dict(ex)
    out["prompt_ids"] = [int(t) for t in ex["prompt_ids"]]
    out["response_ids"] = [int(t) for t in ex["response_ids"]]
    return out


def _aligned_vocab(sizes: dict[str, int], tokenizer, vocab_size: int | None) -> int:
    smallest_name = min(sizes, key=sizes.get)
    smallest = sizes[smallest_name]
    if vocab_size is not None:
        if not 0 < vocab_size <= smallest:
            raise VocabMismatchError(
                f"vocab_size={vocab_size} but {smallest_name!r} has {smallest} output rows; "
                f"pass 0 < vocab_size <= {smallest}"
            )
        return vocab_size
    from ..models import align_vocab

    # The training rule (potstill.models.align_vocab): every model shares `tokenizer`, rows
    # beyond the tokenizer's token space are padding, and every head must cover that space.
    return align_vocab(tokenizer, tokenizer, sizes[TEACHER], smallest)


def _device(model) -> torch.device:
    return input_device(model)


def _ratio(num: float, den: int) -> float:
    return num / den if den > 0 else float("nan")


PER_EXAMPLE_METRICS = ("forward_kl", "top1_agreement", "nll")
"""What :func:`per_example_scores` gives per held-out example: means over its response tokens."""


@torch.no_grad()
def per_example_scores(
    students: Mapping[str, torch.nn.Module],
    teacher: torch.nn.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    vocab_size: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, list[float]]]:
    """Each student's teacher-forced scores per example: ``{name: {metric: [E]}}`` with forward KL(teacher ||
    student), top-1 agreement and the NLL of the reference, each the mean over the example's response tokens
    (the terms :func:`evaluate_runs` averages over all tokens; :func:`potstill.eval.verdict.compare_arms` reads
    them per example). Examples with no response token score nan."""
    from ..models.placement import head_on
    from .metrics import teacher_forced_rows

    examples = _check_inputs(students, teacher, examples, batch_size, 0)
    if teacher is None or not students:
        raise PotstillError("per-example scores compare students with a teacher model; give both")
    common = input_device(next(iter(students.values())))
    models = {TEACHER: teacher, **students}
    heads = {name: head_on(m, common) for name, m in models.items()}
    vocab = _aligned_vocab({name: h.vocab for name, h in heads.items()}, tokenizer, vocab_size)
    heads = {name: h.with_vocab(vocab) if h.vocab != vocab else h for name, h in heads.items()}
    pad = generation_pad_id(tokenizer)
    out = {name: {k: [] for k in PER_EXAMPLE_METRICS} for name in students}
    saved = [(mod, mod.training) for m in models.values() for mod in m.modules()]
    try:
        for m in models.values():
            m.eval()
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            input_ids, mask, labels = teacher_forced_inputs(batch, pad)
            index = target_index(labels)
            owner = index // (labels.shape[1] - 1)  # the batch row each target position belongs to
            targets = labels[:, 1:].reshape(-1)[index]
            rows = {}
            for name, model in models.items():
                hidden = final_hidden(model, input_ids.to(_device(model)), mask.to(_device(model)))
                rows[name] = heads[name](target_rows(hidden, index.to(hidden.device)).to(common))
            count = torch.zeros(len(batch)).index_add_(0, owner, torch.ones(owner.numel()))
            for name in students:
                terms = teacher_forced_rows(rows[name], rows[TEACHER], targets.to(common))
                for key, term in zip(PER_EXAMPLE_METRICS, ("kl", "agree", "nll"), strict=True):
                    sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(
                        0, owner, terms[term].detach().double().cpu()
                    )
                    out[name][key].extend((sums / count.double()).tolist())
    finally:
        for mod, mode in saved:
            mod.training = mode
    return out
