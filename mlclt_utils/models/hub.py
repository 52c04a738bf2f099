"""GPT-2-style models saved in the Hugging Face format, as the book's ``HookedTransformer``s.

The multilingual-CLT study released its models (``CausalNLP/gpt2-hf_multilingual-{20,50,70,
90}``) as ``transformers`` GPT-2 checkpoints with their own BPE tokenizer (BOS id 3, EOS id
4, the book's own convention, ``tokenizer.SPECIAL_TOKENS``). TransformerLens builds a
``HookedTransformer`` from a hub name only for the architectures and names it knows, so the
configuration is read from the checkpoint's own ``config.json`` here and the weights go
through TransformerLens's GPT-2 conversion (``convert_gpt2_weights``). The model is left
unfolded (no LayerNorm folding, no centring), like the models the book trains, so that a
CLT trained on either reads the same activations; ``to_tokens`` prepends BOS as for the
book's models.

``load_hf_gpt2`` takes a hub name or a local folder; with ``HF_HUB_OFFLINE=1`` (or no
network) a name that is not in the local cache fails with a message that says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

ACTIVATIONS = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_new"}


def hooked_config(hf_config):
    """The ``HookedTransformerConfig`` of a ``transformers`` ``GPT2Config``."""
    from transformer_lens import HookedTransformerConfig

    if getattr(hf_config, "model_type", None) != "gpt2":
        raise ValueError(f"only GPT-2 checkpoints are supported, this one is {hf_config.model_type!r}")
    act = hf_config.activation_function
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {sorted(ACTIVATIONS)}")
    d = hf_config.n_embd
    return HookedTransformerConfig(
        n_layers=hf_config.n_layer, d_model=d, n_heads=hf_config.n_head, d_head=d // hf_config.n_head,
        d_mlp=hf_config.n_inner or 4 * d, n_ctx=hf_config.n_positions, d_vocab=hf_config.vocab_size,
        act_fn=ACTIVATIONS[act], eps=hf_config.layer_norm_epsilon, normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        # like the book's own models: TransformerLens prepends BOS (id 3), the tokenizer does not
        default_prepend_bos=True, tokenizer_prepends_bos=False, model_name="hf-gpt2")


def hooked_from_hf(hf_model, tokenizer=None, device: str = "cpu"):
    """A ``transformers`` ``GPT2LMHeadModel`` as an unfolded ``HookedTransformer`` (eval mode)
    with ``tokenizer`` attached."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    cfg = hooked_config(hf_model.config)
    state = convert_gpt2_weights(hf_model, cfg)
    state.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab))      # GPT-2 has no unembedding bias
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # TransformerLens's own buffers (attention masks, IGNORE) are not in the checkpoint
    bad = [k for k in missing if not k.endswith(("mask", "IGNORE"))] + list(unexpected)
    if bad:
        raise ValueError(f"the GPT-2 checkpoint does not map onto the HookedTransformer: {bad[:5]}")
    return model.to(device).eval()


def load_hf_gpt2(name_or_path: str, revision: str | None = None, device: str = "cpu"):
    """A GPT-2 checkpoint in the Hugging Face format (hub name or local folder) with its own
    tokenizer, as :func:`hooked_from_hf` builds it."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    local = Path(name_or_path).is_dir()
    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_path, revision=revision)
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except OSError as err:
        where = "the folder" if local else "the hub (or its local cache)"
        raise OSError(f"could not load a GPT-2 model and tokenizer {name_or_path!r} from {where}: {err}. "
                      "Without a network, download it once where there is one, or give a local folder "
                      "saved with save_pretrained.") from None
    model = hooked_from_hf(hf, tok, device)
    model.hub_commit = getattr(hf.config, "_commit_hash", None)   # None for a local folder
    return model


__all__ = ["hooked_config", "hooked_from_hf", "load_hf_gpt2"]
