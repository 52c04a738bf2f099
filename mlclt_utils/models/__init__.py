"""GPT-2-style language models: config and names (``config``), training (``train``),
loading one model folder and generation (``load``), Hugging Face GPT-2 checkpoints (``hub``).
A run's models are found through the stage registry (``stages.load_model``)."""

from .config import (ACT_FNS, DEFAULT_ACT_FN, build_model, config_from_dict, config_to_dict,
                     model_config, parse_model_name)
from .load import greedy_continuations, load_model_from
from .train import eval_loss_per_language, log_spaced_steps, train_model

__all__ = ["ACT_FNS", "DEFAULT_ACT_FN", "build_model", "config_from_dict", "config_to_dict",
           "model_config", "parse_model_name", "greedy_continuations", "load_model_from",
           "eval_loss_per_language",
           "log_spaced_steps", "train_model"]
