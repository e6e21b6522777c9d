"""The ``potstill explain`` recipe: CC-SHAP self-consistency of models that answer a classification prompt and
then explain the answer (Parcalabescu & Frank 2024). Importable without torch; :mod:`potstill.runners.explain`
runs it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from potstill.paths import resolve_data_path
from potstill.recipes.base import RecipeFile, Seed, Strict, apply_overrides, read_source, validate_recipe

__all__ = [
    "ExplainData",
    "ExplainModel",
    "ExplainPrompt",
    "ExplainRecipe",
    "ExplainShap",
    "RECIPE",
    "load_explain_recipe",
]

TEXT_SLOT = "{text}"


class ExplainModel(Strict):
    name: str = Field(..., min_length=1, description="The model's name in the report (unique), e.g. teacher.")
    model: str = Field(
        ...,
        min_length=1,
        description="A causal LM: an offline short name (smollm2-135m-instruct), a local save_pretrained "
        "directory (a trained student) or a hub id.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights' dtype while explaining.")


class ExplainData(Strict):
    dataset: Literal["sms_spam"] = Field(
        "sms_spam", description="sms_spam (UCI SMS Spam Collection, ham/spam), the offline stand-in for phishing mail."
    )
    path: str = Field(
        "$POTSTILL_DATA/sms_spam/SMSSpamCollection",
        description="The dataset file: $POTSTILL_DATA/..., absolute, or relative to the recipe's folder.",
    )
    num_examples: int = Field(8, ge=1, description="How many examples to explain (a seeded, label-balanced draw).")
    seed: Seed = Field(0, description="Seed of the draw of examples.")


class ExplainPrompt(Strict):
    system: str | None = Field(
        None, description="A system turn before the question (null: the chat template's own default, if any)."
    )
    question: str = Field(
        "Is the following SMS message spam or ham (not spam)? Answer with one word: spam or ham.\n\nSMS: {text}",
        description="The user turn asking for the answer; '{text}' marks where the example's text goes (once).",
    )
    why: str = Field(
        "Why? Explain your answer in one sentence.",
        description="The user turn after the model's answer that asks for the post-hoc explanation.",
    )
    labels: list[str] = Field(
        ["ham", "spam"],
        min_length=2,
        description="The answers, in label-id order (ham=0, spam=1); the model's answer is the label whose tokens "
        "it gives the highest log-prob.",
    )
    max_explanation_tokens: int = Field(32, ge=1, description="Greedy explanation length limit, in tokens.")
    max_text_tokens: int | None = Field(
        48, ge=1, description="Explain only the text's first this many tokens (the cost grows with it; null: all)."
    )

    @field_validator("question")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        if v.count(TEXT_SLOT) != 1:
            raise ValueError(f"the question holds {v.count(TEXT_SLOT)} '{TEXT_SLOT}' slots; write exactly one")
        return v

    @field_validator("labels")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or not all(s.strip() for s in v):
            raise ValueError(f"labels {v} must be distinct and non-empty; fix the list")
        return v


class ExplainShap(Strict):
    algorithm: Literal["partition", "permutation"] = Field(
        "partition",
        description="shap explainer: partition (Owen values over a tree of neighbouring tokens, as shap's text "
        "masker) or permutation (sampled permutations, antithetic).",
    )
    max_evals: int = Field(
        200, ge=3, description="Model evaluations per attribution (answer and explanation each); raised to 2F+1."
    )
    score: Literal["logodds", "logprob"] = Field(
        "logodds",
        description="The value explained per output token: log-odds (what shap's TeacherForcing gives, the "
        "paper's choice) or log-prob.",
    )
    mask_token: str | None = Field(
        "...",
        description="What a masked token becomes: this string's token (it must be one token; shap's text masker "
        "uses '...'); null removes masked tokens.",
    )
    batch_size: int = Field(16, ge=1, description="Masked prompts per forward pass.")
    seed: Seed = Field(0, description="Seed of the permutation explainer.")


class ExplainRecipe(RecipeFile):
    verb: Literal["explain"] = Field("explain", description="The potstill command this recipe is for.")
    output_dir: str = Field("runs/explain", description="Where the per-model JSON reports and the recipe go.")
    models: list[ExplainModel] = Field(
        ..., min_length=1, description="The models compared (teacher, students), each explained on the same examples."
    )
    data: ExplainData = Field(default_factory=ExplainData, description="Which examples are explained.")
    prompt: ExplainPrompt = Field(default_factory=ExplainPrompt, description="How the models are asked.")
    shap: ExplainShap = Field(default_factory=ExplainShap, description="The SHAP estimator.")

    @model_validator(mode="after")
    def _unique_names(self) -> ExplainRecipe:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, repeated: {dup}; rename them")
        return self

    def resolve_paths(self, base_dir: Path | None) -> None:
        self.data.path = resolve_data_path(self.data.path, base_dir)
        for m in self.models:
            # a recipe-relative student directory; short names and hub ids stay as written
            if base_dir is not None and m.model.startswith("."):
                m.model = resolve_data_path(m.model, base_dir)


RECIPE = ExplainRecipe


def load_explain_recipe(source: str | Path | dict, overrides: Sequence[str] = ()) -> ExplainRecipe:
    """A validated :class:`ExplainRecipe` from a YAML file or a dict, with ``key.path=value`` overrides
    (``data.num_examples=4``); any problem raises :class:`PotstillError` naming the key."""
    data = read_source(source, "models, data, prompt, shap, output_dir")
    apply_overrides(data, overrides, example="data.num_examples=4")
    return validate_recipe(RECIPE, data, "explain", None if isinstance(source, dict) else Path(source).parent)
