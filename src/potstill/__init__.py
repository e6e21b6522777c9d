"""potstill: knowledge distillation and dataset distillation for large language models."""

__version__ = "0.1.0"
