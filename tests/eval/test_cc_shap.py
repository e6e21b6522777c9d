"""CC-SHAP (Parcalabescu & Frank 2024, Sec. 4): the normalisation and cosine against a float64 reference written
from the paper, SHAP efficiency and shapes on a tiny random Llama (reference scores computed here, unpadded, in
float64), a planted token, the end-to-end report, the ``explain`` recipe and its runner."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

# shap's numba kernels as Python (what potstill.eval.cc_shap chooses too): compiling them takes minutes here
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
shap = pytest.importorskip("shap", reason="CC-SHAP needs the shap package (pip install 'potstill[explain]')")

import torch  # noqa: E402

from potstill.errors import PotstillError  # noqa: E402
from potstill.eval.cc_shap import (  # noqa: E402
    MASKED,
    SplitPrompt,
    TokenScorer,
    answer_attributions,
    cc_shap,
    cc_shap_example,
    contribution_ratios,
    explain_tokens,
    split_prompt,
)
from potstill.recipes.explain import load_explain_recipe  # noqa: E402

from .tiny import make_llama  # noqa: E402

# ------------------------------------------------------------------ the paper's normalisation and cosine


def ref_ratios(values) -> list[float]:
    """Paper Sec. 4: per output token t, C_t(j) = phi_t(j) / sum_k |phi_t(k)|; then the mean over t."""
    rows = [[float(x) for x in (r if np.ndim(r) else [r])] for r in values]
    F, T = len(rows), len(rows[0])
    out = [0.0] * F
    for t in range(T):
        mass = sum(abs(rows[k][t]) for k in range(F))
        for j in range(F):
            out[j] += rows[j][t] / mass / T
    return out


def ref_cc_shap(a, b) -> float:
    x, y = ref_ratios(a), ref_ratios(b)
    dot = sum(p * q for p, q in zip(x, y))
    return dot / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))


def test_closed_forms_identical_opposite_orthogonal():
    v = np.array([0.5, -2.0, 1.0, 0.0])
    assert cc_shap(v, v) == pytest.approx(1.0, abs=1e-12)
    assert cc_shap(v, 7.0 * v) == pytest.approx(1.0, abs=1e-12)  # the normalisation removes the scale
    assert cc_shap(v, -v) == pytest.approx(-1.0, abs=1e-12)
    assert cc_shap(np.array([1.0, 0.0, 0.0]), np.array([0.0, 3.0, -1.0])) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(cc_shap(np.zeros(3), v[:3]))  # no attribution: the cosine is undefined


def test_each_output_token_is_normalised_before_the_mean():
    # explanation token 0 puts 10 on input 0, token 1 puts 1 on input 1: the paper's ratios are (1/2, 1/2), so an
    # answer spread evenly is perfectly consistent; normalising after summing over tokens would give 0.77
    expl = np.array([[10.0, 0.0], [0.0, 1.0]])
    assert contribution_ratios(expl) == pytest.approx([0.5, 0.5], abs=1e-12)
    assert cc_shap(np.array([1.0, 1.0]), expl) == pytest.approx(1.0, abs=1e-12)


def test_ratios_and_cc_shap_match_the_float64_reference():
    g = np.random.default_rng(3)
    for F, Ta, Te in [(1, 1, 1), (5, 1, 7), (13, 2, 4)]:
        a, e = g.normal(size=(F, Ta)), g.normal(size=(F, Te)) * g.uniform(0.01, 30, size=(1, Te))
        assert contribution_ratios(e) == pytest.approx(ref_ratios(e), rel=1e-12, abs=1e-15)
        assert cc_shap(a, e) == pytest.approx(ref_cc_shap(a, e), rel=1e-10, abs=1e-12)
    assert contribution_ratios(np.array([2.0, -1.0, 1.0])) == pytest.approx([0.5, -0.25, 0.25])


def test_mismatched_inputs_are_refused():
    with pytest.raises(PotstillError, match="same text"):
        cc_shap(np.ones(3), np.ones(4))


# ------------------------------------------------------------------ SHAP through the shap package


def planted(index: int, F: int):
    """A hand-built value function: output 0 depends strongly on the player at ``index``, weakly on the others;
    output 1 only on a pair interaction of two other players."""
    w = np.full(F, 0.1)
    w[index] = 3.0

    def f(rows):
        present = (np.asarray(rows) != MASKED).astype(float)
        return np.stack([present @ w, present[:, 0] * present[:, 1]], 1)

    return f


@pytest.mark.parametrize("algorithm", ["partition", "permutation"])
def test_planted_token_gets_the_largest_attribution(algorithm):
    F, hot = 7, 4
    a = explain_tokens(planted(hot, F), list(range(100, 100 + F)), algorithm=algorithm, max_evals=60)
    assert a.values.shape == (F, 2)
    col = a.values[:, 0]
    assert int(np.argmax(np.abs(col))) == hot
    assert col[hot] == pytest.approx(3.0, abs=1e-9)  # additive in the player: exactly its weight
    assert a.values[:, 1].sum() == pytest.approx(1.0, abs=1e-9) and a.base == pytest.approx([0.0, 0.0])


def ref_scores(model, ids: list[int], targets: list[int], kind: str) -> np.ndarray:
    """The score of each target token after ``ids``, one unpadded forward, softmax in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + targets])).logits[0].double()
    logp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)[torch.arange(len(targets)), targets]
    p = logp.exp()
    return (logp if kind == "logprob" else torch.log(p) - torch.log1p(-p)).numpy()


@pytest.fixture(scope="module")
def llama():
    return make_llama(seed=1, layers=2)


PROMPT = SplitPrompt(prefix=(3, 9, 10), features=(20, 21, 22, 23, 24, 25), suffix=(4, 11))


@pytest.mark.parametrize(
    ("algorithm", "score", "mask_id"),
    [("partition", "logodds", 2), ("permutation", "logprob", 2), ("partition", "logodds", None)],
)
def test_tiny_llama_one_value_per_token_and_efficiency(llama, algorithm, score, mask_id):
    targets = [30, 31]
    a = answer_attributions(
        llama, _Tok(), PROMPT, targets, algorithm=algorithm, max_evals=40, score=score, mask_token_id=mask_id
    )
    F = len(PROMPT.features)
    assert a.values.shape == (F, len(targets))
    full = ref_scores(llama, list(PROMPT.ids()), targets, score)
    masked_feats = [mask_id] * F if mask_id is not None else []
    empty = ref_scores(llama, [*PROMPT.prefix, *masked_feats, *PROMPT.suffix], targets, score)
    # float32 forwards (batched, left-padded) against the float64-softmax reference: 1e-4 covers their rounding
    np.testing.assert_allclose(a.full, full, atol=1e-4)
    np.testing.assert_allclose(a.base, empty, atol=1e-4)
    np.testing.assert_allclose(a.values.sum(0), full - empty, atol=1e-4)
    assert np.abs(a.values).sum() > 1e-3  # the random model does react to its input


def test_scorer_pads_on_the_left_and_counts_evaluations(llama):
    s = TokenScorer(llama, PROMPT, [30], mask_token_id=None, pad_token_id=0, score="logprob", batch_size=2)
    rows = np.array([[20, 21, 22, 23, 24, 25], [MASKED, 21, MASKED, MASKED, 24, MASKED], [MASKED] * 6])
    got = s(rows)
    assert got.shape == (3, 1) and s.evaluations == 3
    for r, g in zip(rows, got):
        ids = [*PROMPT.prefix, *[int(t) for t in r if t != MASKED], *PROMPT.suffix]
        assert g == pytest.approx(ref_scores(llama, ids, [30], "logprob"), abs=1e-4)


class _Tok:
    """Just what the attribution functions ask of a tokenizer when given token ids."""

    pad_token_id = 0


# ------------------------------------------------------------------ prompts, the whole example, the recipe


def test_split_prompt_keeps_the_text_tokens_identical_across_prompts(word_tokenizer):
    text = "w10 w11 w12 w13"
    ask = split_prompt(word_tokenizer, [{"role": "user", "content": "w5 {text} w6"}], text)
    why = split_prompt(
        word_tokenizer,
        [
            {"role": "user", "content": "w5 {text} w6"},
            {"role": "assistant", "content": "w7"},
            {"role": "user", "content": "w8"},
        ],
        text,
        max_text_tokens=3,
    )
    ids = word_tokenizer(text, add_special_tokens=False).input_ids
    assert ask.features == tuple(ids) and why.features == tuple(ids[:3])
    assert word_tokenizer.decode(ask.prefix) == "w5" and word_tokenizer.decode(why.suffix).split()[:3] == [
        "w6",
        "w7",
        "w8",
    ]
    with pytest.raises(PotstillError, match="exactly one"):
        split_prompt(word_tokenizer, [{"role": "user", "content": "no slot"}], text)


def test_cc_shap_example_reports_one_ratio_per_text_token(llama, word_tokenizer):
    r = cc_shap_example(
        llama,
        word_tokenizer,
        "w20 w21 w22 w23 w24",
        answer_messages=[{"role": "user", "content": "w5 {text} w6"}],
        why_prompt="w7 w8",
        labels=["w30", "w31 w32"],
        max_explanation_tokens=3,
        max_evals=11,
        mask_token_id=2,
    )
    assert r["answer"] in ("w30", "w31 w32") and len(r["tokens"]) == 5 and len(r["answer_ratios"]) == 5
    assert abs(sum(abs(x) for x in r["answer_ratios"]) - 1.0) < 1e-9  # ratios of one token sum to 1 in |.|
    if r["explanation_tokens"]:
        assert len(r["explanation_ratios"]) == 5 and -1.0 <= r["cc_shap"] <= 1.0
        assert r["cc_shap"] == pytest.approx(ref_cc_shap_of(r), abs=1e-9)
    else:
        assert math.isnan(r["cc_shap"]) and r["skipped"] == "empty explanation"


def ref_cc_shap_of(r) -> float:
    x, y = r["answer_ratios"], r["explanation_ratios"]
    return sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))


def test_recipe_file_loads_and_bad_input_is_one_line(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = load_explain_recipe(root / "recipes" / "explain_sms_spam.yaml")
    assert r.verb == "explain" and r.models[0].model == "smollm2-135m-instruct"
    assert r.data.path.endswith("sms_spam/SMSSpamCollection") and Path(r.data.path).is_absolute()
    base = {"models": [{"name": "t", "model": "smollm2-135m-instruct"}]}
    with pytest.raises(PotstillError, match="recipe key 'shap.max_evalz' is not a known option"):
        load_explain_recipe(base, ["shap.max_evalz=3"])
    with pytest.raises(PotstillError, match="recipe key 'prompt.question'.*exactly one"):
        load_explain_recipe(base, ["prompt.question=no slot here"])
    with pytest.raises(PotstillError, match="unique"):
        load_explain_recipe({"models": base["models"] * 2})
    with pytest.raises(PotstillError, match="recipe key 'models' is required"):
        load_explain_recipe({})
    with pytest.raises(PotstillError, match="shap.algorithm"):
        load_explain_recipe(base, ["shap.algorithm=exact"])


@pytest.mark.slow  # two models x two examples end to end through load_model: ~15-60 s on a shared 2-core CPU
def test_runner_writes_a_report_per_model(tmp_path, llama, word_tokenizer):
    from potstill.runners.explain import run

    model_dir = tmp_path / "tiny"
    llama.save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "sms.tsv"
    data.write_text("ham\tw20 w21 w22\r\nspam\tw23 w24 w25 w26\r\nham\tw27 w28\r\n", encoding="utf-8")
    recipe = load_explain_recipe(
        {
            "models": [{"name": "a", "model": str(model_dir)}, {"name": "b", "model": str(model_dir)}],
            "data": {"path": str(data), "num_examples": 2},
            "prompt": {"question": "w5 {text} w6", "why": "w7", "labels": ["w30", "w31"], "max_explanation_tokens": 2},
            "shap": {"max_evals": 3, "mask_token": None},
            "output_dir": str(tmp_path / "out"),
        }
    )
    summary = run(recipe)
    rep = json.loads((tmp_path / "out" / "cc_shap_a.json").read_text())
    assert [e["gold"] for e in rep["examples"]] == ["w30", "w31"]  # labels take turns
    assert set(rep["cc_shap"]) == {"mean", "std", "n", "n_undefined"} and 0.0 <= rep["accuracy"] <= 1.0
    # the same model twice: the same numbers (the estimator is deterministic)
    assert json.dumps(summary["models"]["a"]["cc_shap"]) == json.dumps(summary["models"]["b"]["cc_shap"])
    assert (tmp_path / "out" / "summary.json").is_file() and (tmp_path / "out" / "recipe.yaml").is_file()
