"""GPT-2-style models as TransformerLens ``HookedTransformer``s: config, building, names.

Model names look like ``s-en50``: size ``s`` trained on the mixture with 50 % English.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..tokenizer import BOS_ID, EOS_ID  # <bos> is 3 and <eos> 4, as in the papers' models

# GPT-2's GELU is the tanh approximation. TransformerLens calls it "gelu_new" (written out
# as several elementwise operations) or "gelu_pytorch_tanh" (the same function, within
# 5e-7, as one kernel). The models here use the exact GELU: on 2 CPU cores its forward and
# backward over a small-preset MLP layer take 1.4 ms against 4.2 ms for the tanh kernel
# (about 5 % of a training step), and the two functions differ by at most 5e-4.
ACT_FNS = ("gelu_pytorch_tanh", "gelu_new", "gelu")
DEFAULT_ACT_FN = "gelu"

SIZE_KEYS = ("n_layers", "d_model", "n_heads", "d_mlp")
TRAINING_KEYS = ("tokens", "batch_size", "lr", "min_lr_ratio", "warmup_fraction", "weight_decay",
                 "grad_clip", "n_checkpoints", "eval_every", "eval_tokens_per_language")

# HookedTransformerConfig fields written to config.json; enough to rebuild the model.
CONFIG_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab",
                 "act_fn", "normalization_type", "positional_embedding_type", "init_mode",
                 "default_prepend_bos", "tokenizer_prepends_bos", "seed", "model_name",
                 "original_architecture", "eps")


# ----------------------------------------------------------------------------- building

def model_config(size: Mapping[str, int], n_ctx: int, d_vocab: int, seed: int = 0,
                 act_fn: str = DEFAULT_ACT_FN, name: str = "custom"):
    """HookedTransformerConfig of a GPT-2 style model (LayerNorm, learned positions, GELU).

    ``size`` holds ``n_layers``, ``d_model``, ``n_heads`` and ``d_mlp``. Weights are drawn
    as in GPT-2 (normal, std 0.8/sqrt(d_model)) from ``seed``. The run's tokenizer does not
    add BOS itself, so TransformerLens prepends it (``default_prepend_bos``); attaching a
    tokenizer re-detects ``tokenizer_prepends_bos``.
    """
    from transformer_lens import HookedTransformerConfig

    missing = [k for k in SIZE_KEYS if k not in size]
    if missing:
        raise ValueError(f"model size {dict(size)} lacks {missing}; a size needs {list(SIZE_KEYS)}")
    for key in SIZE_KEYS:
        if isinstance(size[key], bool) or not isinstance(size[key], int) or size[key] <= 0:
            raise ValueError(f"model size key {key!r} must be a positive integer, got {size[key]!r}")
    if size["d_model"] % size["n_heads"]:
        raise ValueError(f"d_model {size['d_model']} is not divisible by n_heads {size['n_heads']}")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 (a token and its successor), got {n_ctx}")
    if d_vocab <= max(BOS_ID, EOS_ID):
        raise ValueError(f"d_vocab {d_vocab} is too small")
    if act_fn not in ACT_FNS:
        raise ValueError(f"act_fn {act_fn!r} is not allowed; allowed: {ACT_FNS}")
    return HookedTransformerConfig(
        n_layers=size["n_layers"], d_model=size["d_model"], n_heads=size["n_heads"],
        d_head=size["d_model"] // size["n_heads"], d_mlp=size["d_mlp"], n_ctx=n_ctx,
        d_vocab=d_vocab, act_fn=act_fn, normalization_type="LN",
        positional_embedding_type="standard", init_mode="gpt2", default_prepend_bos=True,
        tokenizer_prepends_bos=False, seed=seed, device="cpu", model_name=name,
        original_architecture="GPT2LMHeadModel",
    )


def config_to_dict(cfg) -> dict:
    return {k: getattr(cfg, k) for k in CONFIG_FIELDS}


def config_from_dict(d: Mapping[str, Any], init_weights: bool = True):
    """Rebuild a config from ``config_to_dict``. With ``init_weights=False`` the model built
    from it skips random initialisation (and leaves the global RNG alone): for loading."""
    from transformer_lens import HookedTransformerConfig

    fields = {k: d[k] for k in CONFIG_FIELDS if k in d}
    seed = fields.pop("seed", None)
    cfg = HookedTransformerConfig(**fields, seed=seed if init_weights else None, device="cpu",
                                  init_weights=init_weights)
    cfg.seed = seed
    return cfg


def attach_tokenizer(model, tokenizer) -> None:
    """Give ``model`` a tokenizer (a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``)."""
    if tokenizer is None:
        return
    try:
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        model.set_tokenizer(tokenizer)
    except Exception:
        # TransformerLens may try to re-create the tokenizer from a hub name; keep ours as is.
        model.tokenizer = tokenizer
        model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("", add_special_tokens=True)) > 0


def build_model(cfg, tokenizer=None):
    """A freshly initialised ``HookedTransformer`` (on the config's device, CPU by default)."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg)
    attach_tokenizer(model, tokenizer)
    return model


def parse_model_name(name: str) -> tuple[str, float]:
    """``"s-en50"`` -> ``("s", 0.5)``."""
    size, sep, mix = name.rpartition("-")
    if not sep or not size or not mix.startswith("en") or not mix[2:].isdigit():
        raise ValueError(f"model name {name!r} is not of the form '<size>-en<percent>', e.g. 's-en50'")
    pct = int(mix[2:])
    if pct > 100:
        raise ValueError(f"model name {name!r}: English share {pct} % is above 100")
    return size, pct / 100

