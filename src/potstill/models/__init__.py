"""Where models come from (offline wheels, local dirs, hub ids) and how students are built."""

from potstill.models.head import (
    all_hidden,
    cache_argument,
    eval_mode,
    final_hidden,
    hidden_and_cache,
    output_head,
    unwrap_model,
)
from potstill.models.loading import check_quantization, load_model, load_tokenizer, set_attention
from potstill.models.offline import OFFLINE_MODELS, OfflineModel, cache_root, offline_model_dir
from potstill.models.student import select_layers, student_from_teacher, student_scaled
from potstill.models.vocab import align_vocab

__all__ = [
    "OFFLINE_MODELS",
    "OfflineModel",
    "align_vocab",
    "all_hidden",
    "cache_argument",
    "cache_root",
    "eval_mode",
    "check_quantization",
    "final_hidden",
    "hidden_and_cache",
    "load_model",
    "load_tokenizer",
    "offline_model_dir",
    "output_head",
    "select_layers",
    "set_attention",
    "student_from_teacher",
    "student_scaled",
    "unwrap_model",
]
