"""The pure text side of teacher synthesis (:mod:`potstill.dd.synthesize`): prompts, parsing, novelty, filters.

* prompts and parsing -- the Self-Instruct list-continuation prompt and its numbered-list
  parser, the answer prompt and its ``Input:``/``Output:`` parser, the Evol-Instruct
  in-depth and in-breadth evolving prompts and their parser;
* ROUGE-L novelty -- :func:`rouge_l_f` (equal to ``rouge_score``'s ``rougeL`` F without
  stemming) and :class:`NoveltyIndex`, a pruned bit-parallel search over the pool;
* filters -- :class:`Candidate`, :func:`keep_or_drop` and the checks that drop a candidate
  with a named reason (the reasons are listed in :mod:`potstill.dd.synthesize`).

Everything here works on text alone: no model, no tokenizer, no generation, no files
(the only state is the novelty index and the duplicate sets a round's checks keep). It is
kept apart from the seeds, generators and round driver of :mod:`potstill.dd.synthesize`
so it can be read and tested on its own, and :mod:`potstill.dd.synthesize` re-exports its
public names. It imports nothing of synthesis: the checks take any :class:`FilterSettings`
(the recipe's :class:`~potstill.recipes.synthesize.FilterConfig` is one).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import PotstillError

__all__ = [
    "EVOL_OPERATIONS",
    "TEMPLATE_MARKERS",
    "Candidate",
    "Check",
    "FilterSettings",
    "Novel",
    "NoveltyIndex",
    "Seen",
    "answer_checks",
    "answer_prompt",
    "check_answer",
    "check_evolution",
    "check_instruction",
    "copies_prompt",
    "evol_prompt",
    "join",
    "keep_or_drop",
    "list_items",
    "norm",
    "parse_answer",
    "parse_evolution",
    "parse_instructions",
    "quality",
    "repetitive",
    "rouge_l_f",
    "sample_examples",
    "self_instruct_prompt",
    "truncated",
]


class FilterSettings(Protocol):
    """The quality-filter bounds the checks read (:class:`potstill.recipes.synthesize.FilterConfig` has them)."""

    min_instruction_words: int
    max_instruction_words: int
    max_non_ascii: float
    max_repetition: float
    drop_truncated: bool
    unsupported_keywords: list[str]


def join(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp else instruction


# ------------------------------------------------------------------------------ prompts and parsing


def _one_line(text: str) -> str:
    return " ".join(text.split())


def sample_examples(
    seeds: Sequence[str], generated: Sequence[str], k: int, machine: int, rng: random.Random
) -> list[str]:
    """``k`` in-context instructions: ``min(machine, len(generated))`` generated ones, the rest seeds, shuffled."""
    m = min(machine, len(generated))
    if k - m > len(seeds):
        raise PotstillError(f"k_in_context={k} needs {k - m} seed tasks but there are {len(seeds)}; lower k_in_context")
    picks = rng.sample(list(generated), m) + rng.sample(list(seeds), k - m)
    rng.shuffle(picks)
    return picks


def self_instruct_prompt(examples: Sequence[str], n_new: int) -> str:
    """The list-continuation prompt of Self-Instruct (our wording), examples numbered 1..k."""
    k = len(examples)
    listed = "\n".join(f"{i}. {_one_line(e)}" for i, e in enumerate(examples, 1))
    return (
        "Here are some tasks that people have asked a text-only AI assistant to do:\n\n"
        f"{listed}\n\n"
        f"Add {n_new} new tasks to this list, numbered {k + 1} to {k + n_new}. Each new task should differ from "
        "the ones above and from each other, in topic (for instance science, cooking, travel, writing, maths, "
        "history, programming) and in kind (questions, rewriting, classifying, planning, explaining). Write each "
        "task as one or two sentences that an assistant could complete with text alone, with no pictures, sound, "
        "files or web browsing. Write only the numbered tasks, one per line, with no comments."
    )


_ITEM = re.compile(r"^\s*(?:[#*_]+\s*)?(?:(?:task|instruction)\s*)?(\d{1,3})\s*[.):]\s*(.*)$", re.IGNORECASE)
_LABEL = re.compile(
    r"^(?:new\s+|rewritten\s+|harder\s+|evolved\s+)?(?:task|instruction|prompt|version)\s*\d*\s*:\s*", re.IGNORECASE
)


_ENUM = re.compile(r"^\d{1,3}\s*[.)]\s+")


def _unwrap(text: str) -> str:
    """Remove labels (``Task:``, ``New instruction:``), list numbers and enclosing quotes, repeatedly."""
    while True:
        before = text
        text = _ENUM.sub("", _LABEL.sub("", text)).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`" and text.count(text[0]) == 2:
            text = text[1:-1].strip()
        if text == before:
            return text


def _clean(text: str) -> str:
    return _unwrap(_one_line(text.replace("**", "").replace("__", "")))


def list_items(text: str) -> tuple[list[str], bool]:
    """The cleaned items and whether the last one runs to the end of ``text`` (so a cut can hit it)."""
    items: list[list[str]] = []
    open_item = False
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append([m.group(2)])
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1].append(line)
    return [_clean(" ".join(parts)) for parts in items], open_item


def parse_instructions(text: str) -> list[str]:
    """The items of a numbered list (``3. ...``, ``3) ...``, ``Task 3: ...``, bold markers allowed).

    Text before the first numbered line (a preamble) and after a blank line that follows
    an item (a comment, closing chatter) is ignored; other lines continue the current item.
    Items are cleaned of markdown, labels and quotes; one may come out empty (counted, not lost).
    """
    return list_items(text)[0]


def answer_prompt(instruction: str, *, with_input: bool = True) -> str:
    """The prompt that asks the teacher to carry out an instruction (optionally inventing its input)."""
    if not with_input:
        return instruction
    return (
        "Carry out the task below. If it needs something to work on (say, a passage to summarize or a list to "
        'sort), first make up a short realistic example of it after "Input:"; if it needs nothing, write '
        '"Input: none". Then give a concise answer after "Output:".\n\n'
        f"Task: {instruction}"
    )


_MARK = r"\**\s*{}\s*\**\s*:\s*\**\s*"  # "Output:", "**Output:**", "**Output**:"
_OUTPUT = re.compile(rf"^[ \t]*{_MARK.format('output')}", re.IGNORECASE | re.MULTILINE)
_INPUT = re.compile(rf"^\s*{_MARK.format('input')}", re.IGNORECASE)
_NO_INPUT = {"", "none", "n/a", "na", "no input", "<noinput>", "(none)", "nothing", "-"}


def parse_answer(text: str, *, with_input: bool = True) -> tuple[str, str] | None:
    """``(input, output)`` of an answer; ``None`` when it has an ``Input:`` but no ``Output:``.

    The output follows the first line that starts with ``Output:``; the text before it is
    the input if labelled ``Input:`` (``none`` and the like mean no input), else a preamble
    that is dropped. Without either marker the whole text is the output (the teacher just
    answered).
    """
    text = text.strip()
    if not with_input:
        return "", text
    m = _OUTPUT.search(text)
    if m:
        head = text[: m.start()]
        label = _INPUT.match(head)
        inp = head[label.end() :].strip() if label else ""
        return ("" if inp.lower().strip(" .") in _NO_INPUT else inp), text[m.end() :].strip()
    if _INPUT.match(text):
        return None
    return "", text


_DEPTH = (
    "Rewrite the task below into a harder version that a capable assistant could still answer and that a "
    "person would understand without seeing the original. {how} Add at most about 20 words, keep any text or "
    "data the task contains, and reply with the rewritten task only, without answering it.\n\nTask:\n{instruction}"
)
EVOL_OPERATIONS: dict[str, str] = {
    "constraints": _DEPTH.replace("{how}", "Make it harder by adding one more requirement the answer must meet."),
    "deepen": _DEPTH.replace("{how}", "Make it harder by asking about the subject in more depth or breadth."),
    "concretize": _DEPTH.replace("{how}", "Make it harder by replacing general ideas with more specific ones."),
    "reasoning": _DEPTH.replace(
        "{how}", "Make it harder by making it explicitly need several steps of reasoning where one step sufficed."
    ),
    "breadth": (
        "Invent a brand-new task from the same field as the task below but about a rarer, less common subject. "
        "It should be about as long and as hard as the original and doable with text alone. Reply with the new "
        "task only, without answering it.\n\nTask:\n{instruction}"
    ),
}
"""In-depth (constraints, deepen, concretize, reasoning) and in-breadth evolving prompts (our wording)."""

# Phrases of the templates that must not leak into an evolved instruction (WizardLM sec. 3.3, case 4).
TEMPLATE_MARKERS = (
    "the task below",
    "rewritten task",
    "rewrite the task",
    "original task",
    "harder version",
    "without answering it",
    "reply with the",
    "given prompt",
    "rewritten prompt",
    "given task",
    "brand-new task",
)


def evol_prompt(instruction: str, operation: str) -> str:
    if operation not in EVOL_OPERATIONS:
        raise PotstillError(f"evolution operation '{operation}' is unknown; use one of {', '.join(EVOL_OPERATIONS)}")
    return EVOL_OPERATIONS[operation].replace("{instruction}", instruction)


def parse_evolution(text: str) -> str:
    """The evolved instruction in a completion: a ``Sure, here is ...:`` first line and labels removed."""
    lines = text.strip().splitlines()
    if len(lines) > 1 and lines[0].rstrip().endswith(":") and len(lines[0].split()) <= 12:
        lines = lines[1:]
    return _unwrap("\n".join(lines).strip().replace("**", ""))


# ------------------------------------------------------------------------------ ROUGE-L novelty


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _tokens(text: str) -> list[str]:
    """ROUGE tokens: lowercase ``[a-z0-9]`` runs, as ``rouge_score``'s default tokenizer without stemming.

    Self-Instruct scores novelty without stemming. Written out here because importing
    ``rouge_score.tokenizers`` imports nltk (seconds); tests check equality with it.
    """
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _lcs(masks: dict[int, int], nbits: int, b: Sequence[int]) -> int:
    """LCS length of ``a`` (given as per-symbol bit masks of its positions) and ``b``.

    Bit-parallel (Allison & Dix 1986; Hyyro 2004): one big-int add per symbol of ``b``.
    """
    full = (1 << nbits) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return nbits - v.bit_count()


def _f(lcs: int, m: int, n: int) -> float:
    if lcs == 0:
        return 0.0
    p, r = lcs / m, lcs / n
    return 2 * p * r / (p + r)  # as rouge_score.scoring.fmeasure, so thresholds agree exactly


def rouge_l_f(a: str, b: str) -> float:
    """ROUGE-L F1 (Lin 2004) of two texts, equal to ``rouge_score``'s ``rougeL`` fmeasure without stemming."""
    vocab: dict[str, int] = {}
    ta, tb = ([vocab.setdefault(t, len(vocab)) for t in _tokens(x)] for x in (a, b))
    if not ta or not tb:
        return 0.0
    return _f(_lcs(_masks(ta), len(ta), tb), len(tb), len(ta))


def _masks(ids: Sequence[int]) -> dict[int, int]:
    masks: dict[int, int] = {}
    for i, t in enumerate(ids):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


class NoveltyIndex:
    """Instructions tokenized once; finds one whose ROUGE-L F with a query reaches a threshold.

    Incremental (``add``) and pruned: ``F = 2 LCS / (m + n)`` and ``LCS <= |bag(a) & bag(b)|
    <= min(m, n)``, so a pair whose bound is below the threshold is skipped without an LCS,
    and the exact LCS is bit-parallel.
    """

    def __init__(self, texts: Iterable[str] = ()):
        self._vocab: dict[str, int] = {}
        self._items: list[tuple[str, int, Counter, dict[int, int]]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._items)

    def _ids(self, tokens: Sequence[str]) -> list[int]:
        return [self._vocab.setdefault(t, len(self._vocab)) for t in tokens]

    def add(self, text: str) -> None:
        ids = self._ids(_tokens(text))
        self._items.append((text, len(ids), Counter(ids), _masks(ids)))

    def first_at_least(self, text: str, threshold: float) -> tuple[float, str] | None:
        """``(F, instruction)`` of the first indexed instruction with ROUGE-L F >= ``threshold``, else ``None``."""
        q = [self._vocab.get(t, -1) for t in _tokens(text)]  # an unseen word matches nothing
        m = len(q)
        if m == 0:
            return None
        bag = Counter(q)
        for other, n, obag, masks in self._items:
            if n == 0 or 2 * min(m, n) < threshold * (m + n):
                continue
            if 2 * sum((bag & obag).values()) < threshold * (m + n):
                continue
            f = _f(_lcs(masks, n, q), m, n)
            if f >= threshold:
                return f, other
        return None


# ------------------------------------------------------------------------------ filters


_REFUSAL = re.compile(  # refusals, and deflections that answer nothing ("how can I help?")
    r"\b(?:as an ai\b|as a language model|i(?:'m| am) (?:sorry|afraid|unable|not able)|"
    r"i (?:cannot|can ?not|can't|won't|am unable to)|i do(?:n't| not) have (?:access|the ability)|"
    r"i(?:'m| am) (?:here|ready) to (?:help|assist)|how (?:can|may) i (?:help|assist)|"
    r"what (?:task|question)s? would you like)",
    re.IGNORECASE,
)
_STOPWORD_TEXT = (
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these those "
    "i you he she we they me my your our their yes no not so do does did have has had will would can could here "
    "there what which who how"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass
class Candidate:
    """One synthesized item on its way through the checks; ``reason`` is set when dropped."""

    instruction: str
    round: int
    parent: str | None = None
    operation: str | None = None
    input: str = ""
    output: str = ""
    truncated: bool = False
    answer_truncated: bool = False
    answer_parsed: bool = True
    reason: str | None = None
    detail: str | None = None

    @property
    def prompt(self) -> str:
        return join(self.instruction, self.input)


Check = Callable[[Candidate], "str | tuple[str, str] | None"]
"""A check returns ``None`` to keep, or the drop reason (optionally ``(reason, detail)``)."""


def keep_or_drop(items: Iterable[Candidate], checks: Sequence[Check], dropped: list[Candidate]) -> Iterator[Candidate]:
    """Yield the items every check keeps; the others get the first failing check's reason and go to ``dropped``.

    Stateful checks (novelty, duplicates) remember an item when they pass it: put them last.
    """
    for item in items:
        for check in checks:
            out = check(item)
            if out:
                item.reason, item.detail = (out, None) if isinstance(out, str) else out
                dropped.append(item)
                break
        else:
            yield item


def _words(text: str) -> int:
    return len(text.split())


def _non_ascii(text: str, limit: float) -> bool:
    """Share of non-ASCII or control characters among the non-space ones above ``limit``."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(ord(c) > 126 or ord(c) < 32 for c in chars) / len(chars) > limit


def _keyword_re(words: Sequence[str]) -> re.Pattern | None:
    if not words:
        return None
    alts = "|".join(re.escape(w.lower()).replace(r"\ ", r"\s+") for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alts})s?\b", re.IGNORECASE)


def check_instruction(
    text: str, filters: FilterSettings, _kw: re.Pattern | None = None
) -> str | tuple[str, str] | None:
    """Reason to drop an instruction (length, punctuation, non-ASCII, modality, repetition, a refusal), or ``None``."""
    if not text.strip() or not _tokens(text):
        return "empty_instruction"
    n = _words(text)
    if n < filters.min_instruction_words:
        return "instruction_too_short"
    if n > filters.max_instruction_words:
        return "instruction_too_long"
    if not text.strip()[0].isalnum():
        return "starts_with_punctuation"
    if _non_ascii(text, filters.max_non_ascii):
        return "non_ascii"
    kw = _kw if _kw is not None else _keyword_re(filters.unsupported_keywords)
    m = kw.search(text) if kw is not None else None
    if m:
        return "unsupported_modality", m.group(0)
    if repetitive(text, filters.max_repetition):
        return "repetitive"
    if _REFUSAL.match(text):  # the teacher declined instead of writing a task
        return "refusal"
    return None


def repetitive(text: str, max_repetition: float) -> bool:
    """A degenerate loop: the share of repeated word 4-grams exceeds ``max_repetition`` (with at
    least 8 of them), or one sentence of 3+ words occurs 3+ times (after the repetition
    filters of Gopher, Rae et al. 2021, arXiv:2112.11446, appendix A)."""
    toks = _tokens(text)
    grams = list(zip(toks, toks[1:], toks[2:], toks[3:]))
    if len(grams) >= 8 and 1 - len(set(grams)) / len(grams) > max_repetition:
        return True
    sentences = Counter(" ".join(t) for t in map(_tokens, re.split(r"[.!?;\n]+", text)) if len(t) >= 3)
    return bool(sentences) and max(sentences.values()) >= 3


def check_answer(output: str, min_words: int, max_repetition: float = 0.3) -> str | None:
    """Reason to drop an answer (empty / only stop words, too short, repetitive, refusal), or ``None``."""
    toks = _tokens(output)
    if not toks or all(t in _STOPWORDS for t in toks):
        return "empty_answer"
    if _words(output) < min_words:
        return "answer_too_short"
    if repetitive(output, max_repetition):
        return "repetitive"
    if _REFUSAL.search(output[:300]) or ("sorry" in toks and len(toks) < 80):
        return "refusal"  # WizardLM sec. 3.3: "sorry" in a short answer marks a failed evolution
    return None


def check_evolution(parent: str, evolved: str) -> str | None:
    """Evol-Instruct elimination of the evolved instruction itself (WizardLM sec. 3.3), or ``None``.

    ``empty_instruction``: nothing left after parsing; ``evolution_copies_template``: it
    repeats the evolving prompt's own phrases; ``evolution_unchanged``: it adds no word the
    parent lacks (our stand-in for the paper's "no information gain" judged by ChatGPT).
    """
    toks = _tokens(evolved)
    if not toks:
        return "empty_instruction"
    low = " ".join(evolved.lower().split())
    if any(mark in low for mark in TEMPLATE_MARKERS):
        return "evolution_copies_template"
    if set(toks) <= set(_tokens(parent)):
        return "evolution_unchanged"
    return None


def norm(text: str) -> str:
    return " ".join(_tokens(text))


class Seen:
    """Drop an item whose normalized ``attr`` was seen (in the pool or earlier in the round); remember kept ones."""

    def __init__(self, seen: set[str], attr: str, reason: str):
        self.seen, self.local, self.attr, self.reason = seen, set(), attr, reason

    def __call__(self, c: Candidate) -> str | None:
        key = norm(getattr(c, self.attr))
        if key in self.seen or key in self.local:
            return self.reason
        self.local.add(key)
        return None


class Novel:
    """Self-Instruct's ROUGE-L novelty: vs the pool, then vs the round's earlier survivors."""

    def __init__(self, pool: NoveltyIndex, threshold: float):
        self.pool, self.local, self.threshold = pool, NoveltyIndex(), threshold

    def __call__(self, c: Candidate) -> tuple[str, str] | None:
        for index in (self.pool, self.local):
            hit = index.first_at_least(c.instruction, self.threshold)
            if hit:
                return "not_novel", f"rouge_l={hit[0]:.3f} vs {hit[1][:80]!r}"
        self.local.add(c.instruction)
        return None


def truncated(filters: FilterSettings) -> Check:
    return lambda c: "truncated" if filters.drop_truncated and c.truncated else None


def quality(filters: FilterSettings) -> Check:
    kw = _keyword_re(filters.unsupported_keywords)
    return lambda c: check_instruction(c.instruction, filters, kw)


def copies_prompt(output: str, prompt: str, min_tokens: int = 4) -> bool:
    """The answer (of at least ``min_tokens`` words) is a verbatim span of its own prompt.

    A short span is a legitimate answer (a label named in the instruction), a long one an echo.
    """
    out = _tokens(output)
    return len(out) >= min_tokens and f" {' '.join(out)} " in f" {' '.join(_tokens(prompt))} "


def answer_checks(filters: FilterSettings, min_words: int, seen_outputs: set[str]) -> list[Check]:
    return [
        lambda c: "truncated_answer" if filters.drop_truncated and c.answer_truncated else None,
        lambda c: None if c.answer_parsed else "unparsable_answer",
        lambda c: check_answer(c.output, min_words, filters.max_repetition),
        lambda c: "answer_copies_prompt" if copies_prompt(c.output, c.prompt) else None,
        Seen(seen_outputs, "output", "duplicate_output"),
    ]
