"""Training methods, one module each. ``logit``: white-box logit distillation (and its SFT
baseline, token weighting, schedules, curriculum); ``onpolicy``: GKD's on-policy and
DistiLLM's adaptive off-policy distillation; ``contrastive``: DistiLLM-2's pairing of
teacher and student responses; ``minillm``: MiniLLM's policy gradient on teacher-mixed
samples; ``feature``: hidden-state distillation; ``cross_tokenizer``: ULD and
vocabulary-mapping KD across tokenizers; ``classifier``: task-specific KD of text classifiers;
``guards``: every trainer stops at its first NaN/inf loss or gradient norm."""

from .contrastive import ContrastiveConfig, ContrastiveKDTrainer
from .cross_tokenizer import CrossTokenizerKDTrainer
from .feature import FeatureKDConfig, FeatureKDTrainer
from .guards import NonFiniteTrainingError
from .logit import KDConfig, KDTrainer
from .minillm import MiniLLMConfig, MiniLLMKDTrainer
from .onpolicy import OnPolicyConfig, OnPolicyKDTrainer

__all__ = [
    "ContrastiveConfig",
    "ContrastiveKDTrainer",
    "CrossTokenizerKDTrainer",
    "FeatureKDConfig",
    "FeatureKDTrainer",
    "KDConfig",
    "KDTrainer",
    "MiniLLMConfig",
    "MiniLLMKDTrainer",
    "NonFiniteTrainingError",
    "OnPolicyConfig",
    "OnPolicyKDTrainer",
]
