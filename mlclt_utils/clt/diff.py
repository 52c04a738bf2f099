"""Comparing two CLTs whose feature indices mean the same thing (chapter 08, model diffing).

A *stage-wise* CLT is the base CLT trained further on another model (the finetuned one), so
feature f of layer l is the same feature in both, possibly moved. Per feature, in the raw
units of the model (each CLT's input and output scaling folded in, so that a change of
scaling is not read as a change of a feature):

* ``encoder_cosine``: cosine of the encoder rows in raw input units (``W_enc[l][:, f] *
  input_scale[l]``);
* ``decoder_cosine`` and ``decoder_norm_ratio`` (other / base): of the decoder rows over all
  target layers, each divided by that layer's ``output_scale``;
* ``threshold_ratio``: JumpReLU threshold, other / base (pre-activations are in the units of
  the scaled input; with the base's scaling kept, as the stage-wise CLT keeps it, the ratio
  compares like with like).

A change only counts above the *noise floor*: the same statistics between the base CLT and
the base CLT trained further on the base model itself with the same budget and another data
order. :func:`changed_features` flags a feature whose decoder moved (1 - cosine) or grew or
shrank (|log norm ratio|) beyond the floor's ``quantile`` in the same layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .model import CrossLayerTranscoder


def _check_pair(base: CrossLayerTranscoder, other: CrossLayerTranscoder) -> None:
    a, b = base.cfg, other.cfg
    if (a.n_layers, a.d_model, a.d_features, a.cross_layer) != (b.n_layers, b.d_model, b.d_features, b.cross_layer):
        raise ValueError("the two CLTs differ in shape (layers, d_model, features, cross-layer): "
                         f"{(a.n_layers, a.d_model, a.d_features, a.cross_layer)} and "
                         f"{(b.n_layers, b.d_model, b.d_features, b.cross_layer)}; a diff needs one grown from the other")


@torch.no_grad()
def _raw_decoder(clt: CrossLayerTranscoder, layer: int) -> torch.Tensor:
    """[F, targets * d]: feature decoders of ``layer`` in raw output units, targets concatenated."""
    targets = clt.target_layers(layer)
    W = clt.W_dec[layer].detach().double() / clt.output_scale[targets].double()[None, :, None]
    return W.reshape(W.shape[0], -1)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


@torch.no_grad()
def feature_diff(base: CrossLayerTranscoder, other: CrossLayerTranscoder) -> pd.DataFrame:
    """``layer, feature, encoder_cosine, decoder_cosine, decoder_norm_ratio, threshold_ratio``
    for every feature (see the module docstring). A CLT against itself gives 1 everywhere."""
    _check_pair(base, other)
    parts = []
    for l in range(base.cfg.n_layers):
        enc_a = (base.W_enc[l].double() * base.input_scale[l].double()).T          # [F, d]
        enc_b = (other.W_enc[l].double() * other.input_scale[l].double()).T
        dec_a, dec_b = _raw_decoder(base, l), _raw_decoder(other, l)
        parts.append(pd.DataFrame({
            "layer": l, "feature": np.arange(base.cfg.d_features),
            "encoder_cosine": _cosine(enc_a, enc_b).numpy(),
            "decoder_cosine": _cosine(dec_a, dec_b).numpy(),
            "decoder_norm_ratio": (dec_b.norm(dim=-1) / dec_a.norm(dim=-1).clamp_min(1e-300)).numpy(),
            "threshold_ratio": (other.log_threshold[l].double() - base.log_threshold[l].double()).exp().numpy()}))
    return pd.concat(parts, ignore_index=True)


def _moves(diff: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"layer": diff["layer"], "turn": 1 - diff["decoder_cosine"],
                         "growth": np.log(diff["decoder_norm_ratio"].clip(lower=1e-300)).abs()})


def noise_floor(floor: pd.DataFrame, quantile: float = 0.99) -> pd.DataFrame:
    """Per layer, the ``quantile`` of the decoder's turn (1 - cosine) and growth (|log norm
    ratio|) in ``floor``, the :func:`feature_diff` of the base CLT against itself trained
    further on the base model."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile!r}")
    return _moves(floor).groupby("layer")[["turn", "growth"]].quantile(quantile)


def changed_features(diff: pd.DataFrame, floor: pd.DataFrame, quantile: float = 0.99,
                     min_move: float = 1e-9) -> pd.DataFrame:
    """``diff`` with ``changed``: the feature's decoder turned or grew more than the noise
    floor's ``quantile`` in its layer (:func:`noise_floor`) and more than ``min_move`` (float
    rounding is no change). About 1 - ``quantile`` of the unchanged features pass the floor
    by chance, per statistic: the rate to read the count against."""
    limits = noise_floor(floor, quantile)
    moves = _moves(diff)
    lim = np.maximum(limits.reindex(moves["layer"]).to_numpy(), min_move)
    changed = (moves["turn"].to_numpy() > lim[:, 0]) | (moves["growth"].to_numpy() > lim[:, 1])
    return diff.assign(changed=changed)
