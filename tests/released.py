"""Miniature copies of the multilingual-CLT study's released artifacts, in their real formats,
for tests that load them with the hub switched off (``tests/test_sources.py``):

* a model: a ``transformers`` GPT-2 saved with ``save_pretrained``, its tokenizer beside it;
* a CLT: a folder with ``clt_cfg.json`` and ``clt_weights.safetensors`` in the featflow
  layout, with non-trivial scaling factors, its encoder reading ln2's output (the released
  convention).

They are made from a model and CLT the chain trained, so that the chapters run on them find
something to show.
"""

from __future__ import annotations

import torch


def export_gpt2(model, tokenizer, folder):
    """Write a book model (``HookedTransformer``, unfolded LayerNorms) as a ``transformers``
    GPT-2 checkpoint with its tokenizer. GPT-2 has no unembedding bias, so ``b_U`` is left
    out: the exported model is the same network without it. Returns the ``GPT2LMHeadModel``."""
    from einops import rearrange
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    act = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_pytorch_tanh"}[cfg.act_fn]
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_mlp, activation_function=act, layer_norm_epsilon=cfg.eps,
        bos_token_id=3, eos_token_id=4, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["embed.W_E"], "transformer.wpe.weight": sd["pos_embed.W_pos"],
           "transformer.ln_f.weight": sd["ln_final.w"], "transformer.ln_f.bias": sd["ln_final.b"],
           "lm_head.weight": sd["unembed.W_U"].T}
    for l in range(cfg.n_layers):
        p, h = f"blocks.{l}.", f"transformer.h.{l}."
        qkv = [rearrange(sd[p + f"attn.W_{x}"], "n d h -> d (n h)") for x in "QKV"]
        out.update({
            h + "ln_1.weight": sd[p + "ln1.w"], h + "ln_1.bias": sd[p + "ln1.b"],
            h + "ln_2.weight": sd[p + "ln2.w"], h + "ln_2.bias": sd[p + "ln2.b"],
            h + "attn.c_attn.weight": torch.cat(qkv, 1),
            h + "attn.c_attn.bias": torch.cat([sd[p + f"attn.b_{x}"].reshape(-1) for x in "QKV"]),
            h + "attn.c_proj.weight": rearrange(sd[p + "attn.W_O"], "n h d -> (n h) d"),
            h + "attn.c_proj.bias": sd[p + "attn.b_O"],
            h + "mlp.c_fc.weight": sd[p + "mlp.W_in"], h + "mlp.c_fc.bias": sd[p + "mlp.b_in"],
            h + "mlp.c_proj.weight": sd[p + "mlp.W_out"], h + "mlp.c_proj.bias": sd[p + "mlp.b_out"]})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in out.items()}, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "masked_bias")) for k in missing), (missing, unexpected)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    return hf


def released_style_clt(clt, model, folder, seed=0):
    """Write ``clt`` (a book CLT reading ln2's normalised input) in the featflow layout as the
    study released its CLTs: the encoder reads ln2's output (after gain and bias) and the
    input and output scaling factors are not 1. The stored CLT computes the same function;
    ``load_featflow_clt(..., model=model, input_convention="ln2")`` gives ``clt`` back."""
    from mlclt_utils.clt.formats import save_featflow_clt

    g = torch.Generator().manual_seed(seed)
    L = clt.cfg.n_layers
    s_in = 0.5 + torch.rand(L, generator=g, dtype=torch.float64)
    s_out = 0.5 + torch.rand(L, generator=g, dtype=torch.float64)
    out = type(clt)(clt.cfg)
    out.load_state_dict(clt.state_dict())
    with torch.no_grad():
        for l in range(L):
            ln = model.blocks[l].ln2
            w, b = ln.w.detach().double(), ln.b.detach().double()
            W = clt.W_enc[l].double() * clt.input_scale[l].double() / s_in[l]     # reads x * s_in
            W = W / w[:, None]                                                     # reads ln2's output
            out.W_enc[l].copy_(W)
            out.b_enc[l].copy_(clt.b_enc[l].double() - s_in[l] * (b @ W))
        for l in range(L):
            for j, k in enumerate(clt.target_layers(l)):
                ratio = s_out[k] / clt.output_scale[k].double()
                out.W_dec[l][:, j, :].copy_(clt.W_dec[l][:, j, :].double() * ratio)
        out.b_dec.copy_(clt.b_dec.double() * (s_out / clt.output_scale.double())[:, None])
        out.input_scale.copy_(s_in)
        out.output_scale.copy_(s_out)
    save_featflow_clt(out, folder)
    return out
