"""Per-token divergences (dense, sparse top-k) and the one chunked reducer over the lm_head."""

from .bild import bild
from .chunked import chunked_kd_loss, unchunked_kd_loss
from .dense import (
    CORES,
    DIVERGENCES,
    DivergenceName,
    adaptive_kl,
    alpha_beta_divergence,
    forward_kl,
    generalized_jsd,
    get_core,
    get_divergence,
    log_probs,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from .params import check_divergence_params, check_temperature
from .sparse import coarsen, sparse_divergence
from .uld import uld_loss

__all__ = [
    "CORES",
    "DIVERGENCES",
    "DivergenceName",
    "adaptive_kl",
    "alpha_beta_divergence",
    "bild",
    "check_divergence_params",
    "check_temperature",
    "chunked_kd_loss",
    "coarsen",
    "forward_kl",
    "generalized_jsd",
    "get_core",
    "get_divergence",
    "log_probs",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_divergence",
    "total_variation",
    "uld_loss",
    "unchunked_kd_loss",
]
