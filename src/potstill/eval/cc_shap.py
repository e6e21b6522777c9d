"""CC-SHAP: self-consistency of a generative classifier's answer and its post-hoc explanation.

Parcalabescu & Frank 2024, "On Measuring Faithfulness or Self-consistency of Natural Language Explanations"
(ACL 2024, Sec. 4). For one example with input tokens ``j = 1..F``:

1. SHAP values ``phi^P[j, t]`` of each input token to each answer token ``t`` (the paper's prediction has one
   output token; a multi-token label such as ``spam`` = ``sp|am`` has several, aggregated like the explanation's),
   and ``phi^E[j, t]`` to each generated explanation token ``t = 1..T``.
2. Each output token's values become contribution ratios, ``C[j, t] = phi[j, t] / sum_k |phi[k, t]|``, averaged over
   the output tokens: ``C[j] = mean_t C[j, t]`` (the paper's percent; the factor 100 is dropped, cosine ignores it).
3. ``CC-SHAP = cos(C^P, C^E)`` in ``[-1, 1]``: 1 when the input drives the answer and the explanation alike.

Choices where the paper leaves room (its code explains the whole prompt and folds the template suffix into the
base value; here that is done by construction):

* The players are the tokens of the example's text only; the instruction, the chat template and, for the
  explanation, the answer and the "why?" turn are held present in every coalition. The text is tokenised on its
  own and spliced into the templated prompt, so both prompts hold the same ``F`` players.
* The value of a coalition is, per output token and by teacher forcing, the log-odds of that token
  ``log p - log(1 - p)`` (what shap's ``TeacherForcing`` model returns, which the paper used) or its log-prob.
* A masked token is replaced by ``mask_token_id`` (shap's text masker uses ``...``), or removed when it is None.
* SHAP values come from the ``shap`` package: its Partition explainer (Owen values over a balanced binary tree of
  adjacent tokens, as shap's text masker groups neighbours) or its Permutation explainer. Both satisfy
  efficiency: ``sum_j phi[j, t] = f_t(all present) - f_t(all masked)``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from potstill.errors import PotstillError

__all__ = [
    "Algorithm",
    "Attribution",
    "Score",
    "SplitPrompt",
    "TokenScorer",
    "adjacent_tree",
    "answer_attributions",
    "cc_shap",
    "cc_shap_example",
    "choose_label",
    "contribution_ratios",
    "explain_tokens",
    "explanation_attributions",
    "generate_explanation",
    "split_prompt",
    "summarize",
]

Score = Literal["logodds", "logprob"]
Algorithm = Literal["partition", "permutation"]
MASKED = -1
"""The value a masked player takes in the rows handed to a :class:`TokenScorer`."""
TEXT_SLOT = "{text}"


@dataclass(frozen=True)
class SplitPrompt:
    """A prompt as token ids: a fixed ``prefix``, the players ``features`` (the example's text), a fixed ``suffix``."""

    prefix: tuple[int, ...]
    features: tuple[int, ...]
    suffix: tuple[int, ...]

    def ids(self) -> list[int]:
        return [*self.prefix, *self.features, *self.suffix]


def _render(tokenizer, messages: Sequence[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # a base model without a template: the turns one after the other, the answer to be written after the last
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def split_prompt(tokenizer, messages: Sequence[dict], text: str, *, max_text_tokens: int | None = None) -> SplitPrompt:
    """``messages`` (chat turns, exactly one holding ``{text}``) rendered with the tokenizer's chat template (plain
    turns when it has none) and split around ``text``. Each part is tokenised on its own, so the players are the
    same ids in every prompt built for ``text``; ``max_text_tokens`` keeps only the text's first tokens."""
    sentinel = "\u2063POTSTILL_TEXT\u2063"
    slots = sum(m["content"].count(TEXT_SLOT) for m in messages)
    if slots != 1:
        raise PotstillError(f"the prompt holds {slots} '{TEXT_SLOT}' slots; write exactly one, where the text goes")
    filled = [{**m, "content": m["content"].replace(TEXT_SLOT, sentinel)} for m in messages]
    rendered = _render(tokenizer, filled)
    before, after = rendered.split(sentinel)
    enc = lambda s: tuple(tokenizer(s, add_special_tokens=False).input_ids) if s else ()  # noqa: E731
    feats = enc(text)
    if max_text_tokens is not None:
        feats = feats[:max_text_tokens]
    if not feats:
        raise PotstillError("the example's text has no tokens; drop empty examples")
    return SplitPrompt(enc(before), feats, enc(after))


class TokenScorer:
    """The value function SHAP explains: rows of players (``(n, F)`` ids, :data:`MASKED` where masked) ->
    ``(n, T)`` float64, the teacher-forced score of each of the ``T`` target tokens after
    ``prefix + players + suffix``. Counts the rows it scored in ``evaluations``."""

    def __init__(
        self,
        model,
        prompt: SplitPrompt,
        targets: Sequence[int],
        *,
        mask_token_id: int | None,
        pad_token_id: int,
        score: Score = "logodds",
        batch_size: int = 16,
    ):
        if not targets:
            raise PotstillError("nothing to explain: the output has no tokens")
        self.model, self.prompt, self.targets = model, prompt, list(targets)
        self.mask_token_id, self.pad_token_id, self.score = mask_token_id, pad_token_id, score
        self.batch_size = batch_size
        self.evaluations = 0

    def _sequence(self, row: np.ndarray) -> list[int]:
        if self.mask_token_id is None:
            feats = [int(t) for t in row if t != MASKED]
        else:
            feats = [int(t) if t != MASKED else self.mask_token_id for t in row]
        return [*self.prompt.prefix, *feats, *self.prompt.suffix, *self.targets]

    @torch.no_grad()
    def _batch(self, seqs: list[list[int]]) -> np.ndarray:
        device = next(self.model.parameters()).device
        width, T = max(map(len, seqs)), len(self.targets)
        # left padding: every sequence ends with the targets, so their logits sit at the same positions
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            att[i, width - len(s) :] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)  # positions as if unpadded
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            position_ids=pos.to(device),
            logits_to_keep=T + 1,
            use_cache=False,
        )
        logits = out.logits[:, -T - 1 : -1].float()
        tgt = torch.tensor(self.targets, device=logits.device)
        logp = logits.log_softmax(-1).gather(-1, tgt.view(1, T, 1).expand(len(seqs), T, 1))[..., 0].double()
        if self.score == "logprob":
            return logp.cpu().numpy()
        logp = logp.clamp(max=-1e-12)  # p = 1 in float32 would give infinite log-odds
        return (logp - torch.log(-torch.expm1(logp))).cpu().numpy()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows).astype(np.int64).reshape(-1, len(self.prompt.features))
        seqs = [self._sequence(r) for r in rows]
        self.evaluations += len(seqs)
        parts = [self._batch(seqs[i : i + self.batch_size]) for i in range(0, len(seqs), self.batch_size)]
        return np.concatenate(parts, 0)


def adjacent_tree(n: int) -> np.ndarray:
    """A scipy-style linkage ``(n - 1, 4)`` that merges neighbouring players pairwise, level by level (a balanced
    binary tree over the token order): the hierarchy shap's Partition explainer walks."""
    nodes, rows, level = [(i, 1) for i in range(n)], [], 0
    while len(nodes) > 1:
        level += 1
        merged = []
        for i in range(0, len(nodes) - 1, 2):
            (a, ca), (b, cb) = nodes[i], nodes[i + 1]
            rows.append([a, b, float(level), ca + cb])
            merged.append((n + len(rows) - 1, ca + cb))
        if len(nodes) % 2:
            merged.append(nodes[-1])
        nodes = merged
    return np.asarray(rows, dtype=float).reshape(-1, 4)


@dataclass
class Attribution:
    """SHAP values of ``F`` players to ``T`` outputs: ``values`` ``(F, T)``; ``base`` ``(T,)``, the score with every
    player masked; ``full`` ``(T,)``, the score with all present (efficiency: ``values.sum(0) = full - base``)."""

    values: np.ndarray
    base: np.ndarray
    full: np.ndarray
    evaluations: int

    @property
    def ratios(self) -> np.ndarray:
        return contribution_ratios(self.values)


def explain_tokens(
    f: Callable[[np.ndarray], np.ndarray],
    features: Sequence[int],
    *,
    algorithm: Algorithm = "partition",
    max_evals: int = 200,
    seed: int = 0,
) -> Attribution:
    """SHAP values of ``f`` (rows ``(n, F)`` -> ``(n, T)``; :data:`MASKED` marks a masked player) at ``features``
    against the all-masked row, by shap's Partition or Permutation explainer. ``max_evals`` is raised to the
    explainer's minimum (``2F + 1`` for one permutation)."""
    if "numba" not in sys.modules:
        # shap's numba kernels are cheap next to a model's evaluations, but compiling them takes 1-3 minutes per
        # process on a small shared CPU; run them as Python unless the user chose otherwise
        os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
    try:
        import shap
    except ImportError:
        raise PotstillError("CC-SHAP needs the shap package; pip install 'potstill[explain]'") from None

    x = np.asarray(features, dtype=np.int64)[None]
    background = np.full_like(x, MASKED)
    F = x.shape[1]
    n_evals = max(int(max_evals), 2 * F + 1)
    if algorithm == "partition":
        masker = shap.maskers.Partition(background, clustering=adjacent_tree(F)) if F > 1 else None
        masker = masker or shap.maskers.Independent(background)
        explainer = shap.explainers.Partition(f, masker) if F > 1 else shap.explainers.Exact(f, masker)
    elif algorithm == "permutation":
        explainer = shap.explainers.Permutation(f, shap.maskers.Independent(background), seed=seed)
    else:
        raise PotstillError(f"unknown SHAP algorithm '{algorithm}'; use partition or permutation")
    counted = getattr(f, "evaluations", None)
    sv = explainer(x, max_evals=n_evals, silent=True)
    values = np.asarray(sv.values[0], dtype=np.float64).reshape(F, -1)
    base = np.asarray(sv.base_values, dtype=np.float64).reshape(-1)
    evals = (f.evaluations - counted) if counted is not None else n_evals  # type: ignore[attr-defined]
    # the score of the whole text, asked of f itself, so a report can show how closely efficiency holds
    full = np.asarray(f(x), dtype=np.float64).reshape(-1)
    return Attribution(values, base, full, int(evals))


def _explain(model, tokenizer, prompt: SplitPrompt, targets: Sequence[int], **kw) -> Attribution:
    scorer = TokenScorer(
        model,
        prompt,
        targets,
        mask_token_id=kw.pop("mask_token_id", None),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        score=kw.pop("score", "logodds"),
        batch_size=kw.pop("batch_size", 16),
    )
    return explain_tokens(scorer, prompt.features, **kw)


def _ids(tokenizer, s: str | Sequence[int]) -> list[int]:
    return tokenizer(s, add_special_tokens=False).input_ids if isinstance(s, str) else [int(t) for t in s]


def answer_attributions(model, tokenizer, prompt: SplitPrompt, answer: str | Sequence[int], **shap_kw) -> Attribution:
    """SHAP values ``(F, T_answer)`` of the text's tokens to the answer's tokens after the answer ``prompt``
    (``shap_kw``: ``algorithm``, ``max_evals``, ``seed``, ``score``, ``mask_token_id``, ``batch_size``)."""
    return _explain(model, tokenizer, prompt, _ids(tokenizer, answer), **shap_kw)


def explanation_attributions(
    model, tokenizer, prompt: SplitPrompt, explanation: str | Sequence[int], **shap_kw
) -> Attribution:
    """SHAP values ``(F, T)`` of the text's tokens to each of the ``T`` explanation tokens, teacher-forced after the
    explanation ``prompt`` (whose suffix holds the answer and the "why?" turn, always present)."""
    return _explain(model, tokenizer, prompt, _ids(tokenizer, explanation), **shap_kw)


def contribution_ratios(values: np.ndarray) -> np.ndarray:
    """The paper's normalisation (Sec. 4): ``values`` ``(F,)`` or ``(F, T)`` -> ``(F,)``, each output token's values
    divided by their absolute sum over the players, then averaged over the output tokens. An output token whose
    values are all zero has no ratios (it is left out of the mean)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    mass = np.abs(v).sum(0)
    keep = mass > 0
    if not keep.any():
        return np.zeros(v.shape[0])
    return (v[:, keep] / mass[keep]).mean(1)


def cc_shap(answer_values: np.ndarray, explanation_values: np.ndarray) -> float:
    """CC-SHAP (Parcalabescu & Frank 2024, Sec. 4): cosine similarity of the contribution ratios of the answer's
    and the explanation's SHAP values (each ``(F,)`` or ``(F, T)``, same ``F``), in ``[-1, 1]``; NaN when either
    has no attribution at all (the cosine is undefined)."""
    a, b = contribution_ratios(answer_values), contribution_ratios(explanation_values)
    if a.shape != b.shape:
        raise PotstillError(f"the attributions cover {a.shape[0]} and {b.shape[0]} input tokens; explain the same text")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


@torch.no_grad()
def sequence_logprob(model, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> float:
    """``sum_t log p(target_t | prompt, target_<t)`` under ``model`` (float64 sum)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt_ids, *target_ids]], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(list(target_ids), device=device)[:, None])
    return float(logp.double().sum())


def choose_label(model, tokenizer, prompt_ids: Sequence[int], labels: Sequence[str]) -> tuple[int, list[float]]:
    """The answer as a choice among ``labels``: the index of the label whose tokens have the highest log-prob after
    the prompt, and every label's log-prob."""
    scores = [sequence_logprob(model, prompt_ids, _ids(tokenizer, lab)) for lab in labels]
    return int(np.argmax(scores)), scores


@torch.no_grad()
def generate_explanation(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (at most ``max_new_tokens``), end-of-sequence tokens dropped."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )[0, ids.shape[1] :].tolist()
    stop = {eos, pad} - {None}
    cut = next((i for i, t in enumerate(out) if t in stop), len(out))
    return out[:cut]


def cc_shap_example(
    model,
    tokenizer,
    text: str,
    *,
    answer_messages: Sequence[dict],
    why_prompt: str,
    labels: Sequence[str],
    max_explanation_tokens: int = 32,
    max_text_tokens: int | None = None,
    **shap_kw,
) -> dict:
    """One example's report: the model answers ``answer_messages`` (one turn holds ``{text}``) with one of
    ``labels``, is asked ``why_prompt`` and explains (greedy); SHAP attributions of the text's tokens to the answer
    and to the explanation, their contribution ratios and CC-SHAP (NaN, with a ``skipped`` reason, when the
    explanation is empty)."""
    t0 = time.perf_counter()
    ask = split_prompt(tokenizer, answer_messages, text, max_text_tokens=max_text_tokens)
    pick, scores = choose_label(model, tokenizer, ask.ids(), labels)
    answer = labels[pick]
    turns = [*answer_messages, {"role": "assistant", "content": answer}, {"role": "user", "content": why_prompt}]
    why = split_prompt(tokenizer, turns, text, max_text_tokens=max_text_tokens)
    expl = generate_explanation(model, tokenizer, why.ids(), max_explanation_tokens)
    report: dict = {
        "answer": answer,
        "label_logprobs": dict(zip(labels, scores)),
        "explanation": tokenizer.decode(expl),
        "tokens": [tokenizer.decode([t]) for t in ask.features],
        "explanation_tokens": len(expl),
    }
    a = answer_attributions(model, tokenizer, ask, answer, **shap_kw)
    report["answer_ratios"] = a.ratios.tolist()
    report["answer_efficiency_gap"] = float(np.max(np.abs(a.values.sum(0) - (a.full - a.base))))
    evals = a.evaluations
    if expl:
        e = explanation_attributions(model, tokenizer, why, expl, **shap_kw)
        report["explanation_ratios"] = e.ratios.tolist()
        report["cc_shap"] = cc_shap(a.values, e.values)
        evals += e.evaluations
    else:
        report["explanation_ratios"] = None
        report["cc_shap"] = float("nan")
        report["skipped"] = "empty explanation"
    report["evaluations"] = evals
    report["seconds"] = time.perf_counter() - t0
    return report


def summarize(values: Sequence[float]) -> dict:
    """Mean and sample std of the finite values, and how many there were (NaN ones are counted apart)."""
    ok = [float(v) for v in values if v is not None and math.isfinite(v)]
    mean = float(np.mean(ok)) if ok else float("nan")
    std = float(np.std(ok, ddof=1)) if len(ok) > 1 else float("nan")
    return {"mean": mean, "std": std, "n": len(ok), "n_undefined": len(values) - len(ok)}
