"""GPT-2-style language models: config and names (``config``), training (``train``),
loading and generation (``load``)."""

from .config import (ACT_FNS, DEFAULT_ACT_FN, build_model, config_from_dict, config_to_dict,
                     model_config, parse_model_name)
from .load import greedy_continuations, list_checkpoints, load_model, load_model_from, read_metrics
from .train import eval_loss_per_language, log_spaced_steps, train_model

__all__ = ["ACT_FNS", "DEFAULT_ACT_FN", "build_model", "config_from_dict", "config_to_dict",
           "model_config", "parse_model_name", "greedy_continuations", "list_checkpoints",
           "load_model", "load_model_from", "read_metrics", "eval_loss_per_language",
           "log_spaced_steps", "train_model"]
