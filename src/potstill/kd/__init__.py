"""Training methods, one module each. ``logit``: white-box logit distillation (and its SFT
baseline); ``onpolicy``: GKD's on-policy and DistiLLM's adaptive off-policy distillation."""

from .logit import KDConfig, KDTrainer
from .onpolicy import OnPolicyConfig, OnPolicyKDTrainer

__all__ = ["KDConfig", "KDTrainer", "OnPolicyConfig", "OnPolicyKDTrainer"]
