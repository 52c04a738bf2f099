"""The bridge to circuit-tracer: the project's CLTs as circuit-tracer transcoders, and its
``ReplacementModel`` built from a project model with no hub access, so that attribution
graphs run on the run's own models.

The conversion is hand-written because circuit-tracer defines its own tensor layout and
there is no shared converter; it is a few reshapes, checked by the tests.
"""

from __future__ import annotations

import copy

import torch

from ..clt.model import CrossLayerTranscoder


def _export_thresholds(clt: CrossLayerTranscoder) -> torch.Tensor:
    """[L, F] thresholds of an elementwise JumpReLU equal to the CLT's activation."""
    cfg = clt.cfg
    if cfg.activation == "jumprelu":
        return clt.log_threshold.detach().exp()
    if cfg.activation == "batchtopk":
        # at inference BatchTopK keeps h > threshold[l]: a JumpReLU with one threshold per layer
        return clt.batchtopk_threshold.detach()[:, None].expand(cfg.n_layers, cfg.d_features)
    raise ValueError("circuit-tracer supports elementwise activations only (ReLU, JumpReLU); "
                     "a TopK CLT picks the k largest features of each token, which it cannot "
                     "express. Export a JumpReLU or BatchTopK CLT instead.")


@torch.no_grad()
def to_circuit_tracer(clt: CrossLayerTranscoder, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """The same transcoder as circuit-tracer's class, with the normalisation folded in.

    A cross-layer CLT becomes ``circuit_tracer...CrossLayerTranscoder``; a per-layer one a
    ``TranscoderSet`` of ``SingleLayerTranscoder``. Both read ``cfg.input_hook``
    (``ln2.hook_normalized``) and write ``cfg.output_hook`` (``hook_mlp_out``) of each block,
    and work on raw activations: W_enc' = s_in[l] W_enc[l] (transposed to circuit-tracer's
    [L, F, d]), W_dec'[l -> k] = W_dec[l -> k] / s_out[k], b_dec'[k] = b_dec[k] / s_out[k];
    b_enc and the thresholds are unchanged. Pre-activations, activations and reconstructions
    are then the same functions of the raw MLP input as the project's module (equal up to
    float rounding).
    """
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    cfg = clt.cfg
    L, d, F = cfg.n_layers, cfg.d_model, cfg.d_features
    device = torch.device(device)
    s_in = clt.input_scale.detach().double()
    s_out = clt.output_scale.detach().double()
    thr = _export_thresholds(clt).double()
    W_enc = (clt.W_enc.detach().double() * s_in[:, None, None]).transpose(1, 2)   # [L, F, d]
    b_enc = clt.b_enc.detach().double()
    b_dec = clt.b_dec.detach().double() / s_out[:, None]

    def cast(t):
        return t.to(device=device, dtype=dtype).contiguous()

    if cfg.cross_layer:
        from circuit_tracer.transcoder.cross_layer_transcoder import (
            CrossLayerTranscoder as CTCrossLayerTranscoder)

        ct = CTCrossLayerTranscoder(L, F, d, activation_function="jump_relu", lazy_decoder=False,
                                    feature_input_hook=cfg.input_hook,
                                    feature_output_hook=cfg.output_hook, device=device, dtype=dtype)
        ct.W_enc.copy_(cast(W_enc))
        ct.b_enc.copy_(cast(b_enc))
        ct.b_dec.copy_(cast(b_dec))
        ct.activation_function.threshold.copy_(cast(thr[:, None, :]))
        for l in range(L):
            W = clt.W_dec[l].detach().double() / s_out[l:][None, :, None]
            ct.W_dec[l].copy_(cast(W))
        return ct.eval()

    from circuit_tracer.transcoder.single_layer_transcoder import (SingleLayerTranscoder,
                                                                   TranscoderSet)

    layers = {}
    for l in range(L):
        t = SingleLayerTranscoder(d, F, JumpReLU(cast(thr[l])), layer_idx=l, device=device,
                                  dtype=dtype)
        t.W_enc.copy_(cast(W_enc[l]))
        t.b_enc.copy_(cast(b_enc[l]))
        t.W_dec.copy_(cast(clt.W_dec[l].detach().double()[:, 0, :] / s_out[l]))
        t.b_dec.copy_(cast(b_dec[l]))
        layers[l] = t
    return TranscoderSet(layers, feature_input_hook=cfg.input_hook,
                         feature_output_hook=cfg.output_hook).eval()


def _wrapped_name(key: str) -> str:
    """State-dict name of a HookedTransformer weight inside circuit-tracer's model, which
    wraps every MLP (``blocks.N.mlp.old_mlp.*``) and the unembedding (``unembed.old_unembed.*``)."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "mlp":
        return ".".join(parts[:3] + ["old_mlp"] + parts[3:])
    if parts[0] == "unembed":
        return ".".join(["unembed", "old_unembed"] + parts[1:])
    return key


@torch.no_grad()
def build_replacement_model(model, clt, tokenizer=None):
    """circuit-tracer's ``ReplacementModel`` (TransformerLens backend) of ``model`` with
    ``clt`` (a project CLT, or a transcoder already made by ``to_circuit_tracer``), built
    from the model's config and weights without any hub access.

    circuit-tracer freezes attention patterns and the LayerNorm scales (``hook_scale``) in
    its backward passes, so reading ``ln2.hook_normalized`` keeps the attribution linear:
    between the residual stream and that hook only the centring and the division by the
    frozen scale remain. ``tokenizer``: defaults to ``model.tokenizer``; circuit-tracer needs
    one to name logit targets, and its BOS id must not be 0.
    """
    from circuit_tracer import ReplacementModel

    if isinstance(clt, CrossLayerTranscoder):
        transcoder = to_circuit_tracer(clt, dtype=model.cfg.dtype, device=model.cfg.device)
    else:
        transcoder = clt
    replacement = ReplacementModel.from_config(copy.deepcopy(model.cfg), transcoder)
    state = {_wrapped_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = replacement.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("transcoders.")]
    if missing or unexpected:
        raise RuntimeError(f"model weights do not fit circuit-tracer's model: missing {missing}, "
                           f"unexpected {unexpected}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        if getattr(tokenizer, "bos_token_id", None) == 0:
            raise ValueError("circuit-tracer cannot use a tokenizer whose BOS id is 0")
        # assigned directly: TransformerLens' set_tokenizer would reload it by name from the hub
        replacement.tokenizer = tokenizer
    return replacement.eval()


__all__ = ["to_circuit_tracer", "build_replacement_model"]
