"""Which language a late-layer unit writes towards: its logit lift through the unembedding.

A unit (CLT feature, neuron, SAE latent) adds a direction u to the residual stream. Read
directly through the unembedding, as in direct logit attribution (TransformerLens,
circuit-tracer), the logits it pushes are

    logits(u) = LN_lin(u) @ W_U,   LN_lin(u) = (u - mean(u)) * w   (LayerNorm)
                                             = u * w               (RMSNorm)

where ``w`` is the final LayerNorm's weight. The per-token scale of the LayerNorm (which
depends on the whole residual at a position, not on the unit) and its bias (the same for
every unit) are left out; ``LayerNormPre`` / ``RMSNormPre`` (folded models, whose weight
already sits in W_U) only centre or do nothing, and a model without final LayerNorm uses u
as it is. The unembedding bias is left out too: it does not depend on u.

The *lift* of language X is the mean of those logits over X's tokens minus their mean over
every other token that is not excluded (by default every non-special token not labelled
X: other languages, "shared", "unknown"). A unit that promotes X's vocabulary has a large
positive lift for X. Only the direct path is measured: what later layers make of u is not.

:func:`clt_decoder_directions` gives a CLT feature's total write into the residual stream:
the sum of its decoder vectors over all its target layers, in raw residual units (the CLT
decodes in normalised space; ``/ output_scale[k]`` undoes that for target layer k).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..languages import check_languages

SPECIAL = "special"


def final_ln_linear(direction: Tensor, model) -> Tensor:
    """The linear part of ``model.ln_final`` applied to ``direction`` [..., d_model] (see the
    module docstring); a model without a final LayerNorm returns the direction unchanged."""
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

    ln = getattr(model, "ln_final", None)
    if ln is None:
        return direction
    if not isinstance(ln, (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)):
        raise ValueError(f"the model's final norm is a {type(ln).__name__}; the lift knows "
                         "LayerNorm, LayerNormPre, RMSNorm and RMSNormPre")
    if isinstance(ln, (LayerNorm, LayerNormPre)):
        direction = direction - direction.mean(-1, keepdim=True)
    if isinstance(ln, (LayerNorm, RMSNorm)):
        direction = direction * ln.w.to(direction)
    return direction


def token_labels(token_languages) -> list[str]:
    """One language label per vocabulary id, from a ``TokenLanguages`` or a list of labels."""
    labels = token_languages.labels() if hasattr(token_languages, "labels") else token_languages
    labels = list(labels)
    bad = [x for x in labels if not isinstance(x, str)]
    if bad:
        raise ValueError(f"token_languages must hold one string label per vocabulary id, got {bad[0]!r}")
    return labels


@torch.no_grad()
def logit_lift(direction, model, token_languages, languages: Sequence[str] | None = None,
               exclude: Sequence[str] = (SPECIAL,)):
    """Lift of each language for ``direction`` ([d_model], or [n, d_model] for n units).

    ``token_languages``: one label per vocabulary id (``TokenLanguages.labels()``, or the
    object itself). ``languages``: the languages to report (default: every language code
    among the labels). Tokens labelled in ``exclude`` count on neither side.
    Returns a Series (one value per language) for one direction, else a DataFrame with one
    row per direction and one column per language.
    """
    import numpy as np
    import pandas as pd

    labels = token_labels(token_languages)
    W_U = model.unembed.W_U                                   # [d_model, d_vocab]
    d_model, d_vocab = W_U.shape
    if len(labels) != d_vocab:
        raise ValueError(f"token_languages has {len(labels)} labels but the model's vocabulary has "
                         f"{d_vocab} tokens; give one label per id")
    u = torch.as_tensor(direction)
    single = u.ndim == 1
    if single:
        u = u[None]
    if u.ndim != 2 or u.shape[-1] != d_model:
        raise ValueError(f"direction must be [d_model] or [n, d_model] with d_model = {d_model}, "
                         f"got shape {tuple(torch.as_tensor(direction).shape)}")
    if not torch.isfinite(u).all():
        raise ValueError("direction contains NaN or infinite values")
    present = [x for x in dict.fromkeys(labels) if x not in ("shared", "unknown", SPECIAL)]
    if languages is None:
        languages = present
    languages = check_languages(languages)
    missing = [lang for lang in languages if lang not in labels]
    if missing:
        raise ValueError(f"no vocabulary id is labelled {missing}; labelled languages: {present}")
    excluded = set(exclude)
    clash = sorted(excluded & set(languages))
    if clash:
        raise ValueError(f"languages {clash} are also in exclude {sorted(excluded)}")

    u = u.to(device=W_U.device, dtype=W_U.dtype)
    logits = (final_ln_linear(u, model) @ W_U).double().cpu()            # [n, d_vocab]
    lab = np.array(labels, dtype=object)
    counted = torch.from_numpy(~np.isin(lab, list(excluded)))
    out = {}
    for lang in languages:
        mine = torch.from_numpy(lab == lang)
        others = counted & ~mine
        if not others.any():
            raise ValueError(f"no token outside {lang!r} is left to compare with (exclude={sorted(excluded)})")
        out[lang] = (logits[:, mine].mean(1) - logits[:, others].mean(1)).numpy()
    df = pd.DataFrame(out)
    df.index.name = "direction"
    if single:
        s = df.iloc[0]
        s.name = "lift"
        return s
    return df


@torch.no_grad()
def clt_decoder_directions(clt, layer: int, features) -> Tensor:
    """[n, d_model]: for each feature of source layer ``layer``, the sum over its target
    layers k of its decoder vector divided by ``output_scale[k]`` (raw residual units)."""
    L, F = clt.cfg.n_layers, clt.cfg.d_features
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"layer is {layer!r}; the CLT has layers 0..{L - 1}")
    feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if feats.numel() == 0:
        raise ValueError("no features given")
    bad = feats[(feats < 0) | (feats >= F)]
    if bad.numel():
        raise ValueError(f"feature {int(bad[0])} is outside 0..{F - 1} (features per layer)")
    targets = clt.target_layers(layer)
    W = clt.W_dec[layer][feats.to(clt.W_dec[layer].device)]               # [n, T, d]
    scale = clt.output_scale[targets].to(W)                               # [T]
    return (W / scale[None, :, None]).sum(1).detach()


__all__ = ["logit_lift", "clt_decoder_directions", "final_ln_linear"]
