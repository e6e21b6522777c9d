"""Training methods, one module each. ``logit``: white-box logit distillation (and its SFT baseline)."""

from .logit import KDConfig, KDTrainer

__all__ = ["KDConfig", "KDTrainer"]
