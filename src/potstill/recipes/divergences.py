"""The divergence a run minimizes, one model per divergence, tagged by ``name``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from potstill.recipes.base import Strict


def _check_divergence(d: Any) -> Any:
    """Degenerate or undefined parameter end points are refused in one line (e.g. GKD's JSD at beta 0 is 0)."""
    from potstill.divergences.params import check_divergence_params

    check_divergence_params(d.name, d.model_dump(exclude={"name"}))
    return d


class _Div(Strict):
    @model_validator(mode="after")
    def _end_points(self) -> _Div:
        return _check_divergence(self)


class ForwardKL(_Div):
    name: Literal["forward_kl"] = "forward_kl"


class ReverseKL(_Div):
    name: Literal["reverse_kl"] = "reverse_kl"


class TotalVariation(_Div):
    name: Literal["total_variation"] = "total_variation"


class GeneralizedJSD(_Div):
    name: Literal["generalized_jsd"] = "generalized_jsd"
    beta: float = Field(0.5, ge=0.0, le=1.0, description="GKD's beta: mixture weight of the teacher in m.")


class SkewForwardKL(_Div):
    name: Literal["skew_forward_kl"] = "skew_forward_kl"
    alpha: float = Field(0.1, ge=0.0, lt=1.0, description="DistiLLM's skew: KL(p || alpha p + (1-alpha) q).")


class SkewReverseKL(_Div):
    name: Literal["skew_reverse_kl"] = "skew_reverse_kl"
    alpha: float = Field(0.1, ge=0.0, lt=1.0, description="DistiLLM's skew: KL(q || alpha q + (1-alpha) p).")


class AlphaBeta(_Div):
    name: Literal["alpha_beta_divergence"] = "alpha_beta_divergence"
    alpha: float = Field(0.5, description="ABKD's alpha (weight on the teacher's probabilities).")
    beta: float = Field(0.5, description="ABKD's beta (weight on the student's probabilities).")


class AdaptiveKL(_Div):
    name: Literal["adaptive_kl"] = "adaptive_kl"
    mu: float = Field(0.5, gt=0.0, le=1.0, description="AKL's head/tail split on the teacher's cumulative mass.")


class BiLD(_Div):
    name: Literal["bild"] = "bild"
    top_k: int = Field(
        8,
        ge=1,
        description=(
            "BiLD's k (Li et al. 2024): the top-k logits whose pairwise differences are compared (the paper uses 8; "
            "1 and 2 make the loss identically 0 and are refused). A top-k cache must hold at least k ids."
        ),
    )
    student_led: bool = Field(
        True,
        description=(
            "Add the student-led half s-LD (true: BiLD = t-LD + s-LD, the paper's loss); false gives the teacher-led "
            "half t-LD alone, the only half a top-k cache can give."
        ),
    )


DivergenceConfig = Annotated[
    ForwardKL
    | ReverseKL
    | TotalVariation
    | GeneralizedJSD
    | SkewForwardKL
    | SkewReverseKL
    | AlphaBeta
    | AdaptiveKL
    | BiLD,
    Field(discriminator="name"),
]


def divergence_params(d: _Div) -> dict[str, Any]:
    return d.model_dump(exclude={"name"})
