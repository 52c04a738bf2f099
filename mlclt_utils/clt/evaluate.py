"""How good a trained CLT is: reconstruction, sparsity, and the replacement model.

Reconstruction (per layer, streamed over batches of token rows):

* FVU = E||y - y^||^2 / E||y - mean(y)||^2, with the TARGET's variance in the denominator.
  It is computed on raw MLP outputs; the per-layer normalisation multiplies numerator and
  denominator by the same s_out[l]^2, so the value equals the one in normalised space.
* L0: mean number of active features per token, per layer.
* Dead features: fraction of a layer's features that never fired on the tokens seen
  (the window is ``n_tokens``).

Replacement model: the model runs as usual (attention, LayerNorm, embeddings, unembedding),
but at every layer k the MLP output (``blocks.k.hook_mlp_out``) is replaced by the CLT's
reconstruction y^_k = sum_{l <= k} W_dec[l -> k] a_l + b_dec[k], where the features a_l
read the MLP input of the replacement forward pass itself (``blocks.l.ln2.hook_normalized``).
One forward pass with hooks does it, layer by layer. Metrics, per language: next-token CE of
the original, the replacement and the zero-ablated model (every MLP output at every non-BOS
position set to 0, see below), KL (original || replacement) per token, top-1 agreement, and
CE loss recovered = (CE_zero - CE_replacement) / (CE_zero - CE_original).

BOS positions. The CLT is trained without BOS tokens, so at BOS positions the replacement
keeps the model's own MLP output, as circuit-tracer leaves position 0 out of its graphs. The
zero ablation keeps exactly the same BOS outputs, so that both baselines of CE recovered
change the same positions and the score is about those positions only: removing the BOS
outputs too would make the zero ablation worse by an amount the CLT plays no part in (the
BOS residual is what later tokens attend to), and inflate the recovered share. Scored
predictions are those made at a non-BOS position about a non-BOS next token, for every
metric alike. (The first prediction of a row, made at the BOS, is therefore not scored: the
CE here differs slightly from the training chapter's.)

Pooled rows. ``replacement_metrics(..., pooled_languages=...)`` (and the reconstruction
statistics) can pool the ``"all"`` row over a subset of the languages, e.g. only those with
a non-zero share in the model's training mixture, so that a language the model never saw
does not weigh on it; the per-language rows always cover every language.

With ``add_error=True`` each replaced output gets the error term y_k - y^_k, where y_k is the
true MLP output computed inside the same forward pass: the sum is the true output, so the
model with error terms reproduces the original logits (up to float rounding). That is the
"local replacement model" circuit-tracer attributes through.

The replacement forward is written here because no installed library runs a
TransformerLens model with its MLPs swapped for this CLT: circuit-tracer only hooks features
on top of the real MLPs, and sae-lens splices single-layer SAEs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import _bos_id, collect_mlp_io, kept_mask


# ------------------------------------------------------------------ per-layer CLT ------

def encode_layer(clt, x: Tensor, layer: int) -> Tensor:
    """Activations [..., F] of ``clt``'s layer ``layer`` from raw MLP inputs [..., d].

    The same as ``clt.encode`` restricted to one layer (every activation mode is per layer
    at inference), without computing the other layers: the replacement forward needs each
    layer's features before the next layer's input exists. BatchTopK uses its inference
    threshold, so the CLT must be in eval mode.
    """
    cfg = clt.cfg
    h = (x * clt.input_scale[layer]) @ clt.W_enc[layer] + clt.b_enc[layer]
    if cfg.activation == "jumprelu":
        return h * (h > clt.log_threshold[layer].exp())
    if cfg.activation == "topk":
        vals, idx = h.topk(min(cfg.k, cfg.d_features), dim=-1)
        return torch.zeros_like(h).scatter(-1, idx, vals.relu())
    if clt.training:
        raise RuntimeError("a BatchTopK CLT selects over the batch in training mode; call .eval()")
    return h * (h > clt.batchtopk_threshold[layer])


def decode_contributions(clt, acts: Tensor, layer: int) -> Tensor:
    """[..., n_targets, d]: what source layer ``layer`` writes to each of its target layers,
    in normalised space (no bias)."""
    W = clt.W_dec[layer]                                  # [F, T, d]
    out = acts @ W.reshape(W.shape[0], -1)
    return out.view(*acts.shape[:-1], W.shape[1], W.shape[2])


def bos_mask(tokens: Tensor, bos_id: int) -> Tensor:
    """True at BOS positions (position 0 of every row and any ``bos_id`` token): the
    complement of the positions the CLT is trained on (``activations.kept_mask``)."""
    return ~kept_mask(tokens, bos_id)


# ------------------------------------------------------------------ reconstruction ------

class ReconstructionStats:
    """Streaming per-layer FVU, L0 and dead-feature counts (float64 sums).

    ``frame()`` columns: layer, fvu, mse and target_variance (per-token means of squared
    norms, raw space), l0, dead_fraction, n_dead, n_tokens (the dead-feature window)."""

    def __init__(self, n_layers: int, d_model: int, n_features: int):
        self.n = 0
        self.sq_err = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_y = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.sum_y2 = torch.zeros(n_layers, dtype=torch.float64)
        self.active = torch.zeros(n_layers, dtype=torch.float64)
        self.fired = torch.zeros(n_layers, n_features, dtype=torch.bool)

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, acts: Tensor) -> None:
        """``y``, ``y_hat``: [n, L, d] targets and reconstructions; ``acts``: [n, L, F]."""
        y, y_hat = y.detach().double().cpu(), y_hat.detach().double().cpu()
        on = acts.detach().cpu() > 0
        self.n += y.shape[0]
        self.sq_err += (y - y_hat).pow(2).sum((0, 2))
        self.sum_y += y.sum(0)
        self.sum_y2 += y.pow(2).sum((0, 2))
        self.active += on.sum((0, 2)).double()
        self.fired |= on.any(0)

    def frame(self):
        import pandas as pd

        n = max(self.n, 1)
        variance = (self.sum_y2 - self.sum_y.pow(2).sum(-1) / n) / n
        mse = self.sq_err / n
        fvu = torch.where(variance > 0, mse / variance.clamp_min(1e-300),
                          torch.full_like(mse, math.nan))
        dead = ~self.fired
        return pd.DataFrame({
            "layer": range(len(mse)),
            "fvu": fvu.tolist(),
            "mse": mse.tolist(),
            "target_variance": variance.tolist(),
            "l0": (self.active / n).tolist(),
            "dead_fraction": dead.double().mean(-1).tolist(),
            "n_dead": dead.sum(-1).tolist(),
            "n_tokens": [self.n] * len(mse),
        })


def _row_chunks(tokens: Tensor, rows: int):
    for i in range(0, tokens.shape[0], rows):
        yield tokens[i:i + rows]


@torch.no_grad()
def reconstruction_metrics(model, clt, tokens: Tensor, batch_size: int = 16,
                           bos_id: int | None = None):
    """Per-layer FVU, L0 and dead features of ``clt`` on token rows ``tokens`` [M, n_ctx]
    (BOS positions excluded, as in training), streamed ``batch_size`` rows at a time.
    Returns a DataFrame with one row per layer."""
    return _reconstruction_stats(model, clt, {"_": tokens}, batch_size, bos_id)["_"].frame()


def _pooled_set(tokens_by_lang: Mapping[str, Tensor], pooled_languages) -> set:
    """The languages that enter the pooled row: all of them, or ``pooled_languages``."""
    if pooled_languages is None:
        return set(tokens_by_lang)
    if isinstance(pooled_languages, str):
        pooled_languages = [pooled_languages]
    chosen = set(pooled_languages)
    unknown = sorted(chosen - set(tokens_by_lang))
    if unknown:
        raise ValueError(f"pooled_languages {unknown} are not among the evaluated languages "
                         f"{sorted(tokens_by_lang)}")
    if not chosen:
        raise ValueError("pooled_languages is empty: give at least one language, or None for all")
    return chosen


def _reconstruction_stats(model, clt, tokens_by_lang: Mapping[str, Tensor], batch_size: int,
                          bos_id: int | None = None,
                          pooled: ReconstructionStats | None = None,
                          pooled_languages=None) -> dict:
    """Per-language ``ReconstructionStats``; ``pooled`` (if given) also accumulates the
    languages in ``pooled_languages`` (None: every language)."""
    pool = _pooled_set(tokens_by_lang, pooled_languages)
    clt.eval()
    device = clt.W_enc.device
    cfg = clt.cfg
    bos = _bos_id(model, bos_id)
    out = {}
    for lang, tokens in tokens_by_lang.items():
        stats = ReconstructionStats(cfg.n_layers, cfg.d_model, cfg.d_features)
        for chunk in _row_chunks(tokens, batch_size):
            x, y = collect_mlp_io(model, chunk, batch_size, bos_id=bos,
                                  input_hook=cfg.input_hook, output_hook=cfg.output_hook)
            x, y = x.to(device, clt.W_enc.dtype), y.to(device, clt.W_enc.dtype)
            y_hat, acts = clt(x)
            stats.update(y, y_hat, acts)
            if pooled is not None and lang in pool:
                pooled.update(y, y_hat, acts)
        out[lang] = stats
    return out


# ------------------------------------------------------------------ replacement model ---

def _replacement_hooks(model, clt, keep: Tensor, mode: str, store: dict | None = None):
    """Forward hooks for one batch. ``mode``: "replace", "replace+error" or "zero".
    ``keep`` [B, P]: positions (BOS) where the model's own MLP output is kept."""
    cfg = clt.cfg
    L, d = cfg.n_layers, cfg.d_model
    keep = keep[..., None]
    state: dict = {}

    def encode(x, hook, layer):
        acts = encode_layer(clt, x.to(clt.W_enc.dtype), layer)
        acts = acts.masked_fill(keep, 0.0)
        if "acc" not in state:
            state["acc"] = torch.zeros(*x.shape[:-1], L, d, dtype=acts.dtype, device=acts.device)
        targets = clt.target_layers(layer)
        state["acc"][..., targets[0]:targets[-1] + 1, :] += decode_contributions(clt, acts, layer)
        if store is not None:
            store.setdefault("acts", {})[layer] = acts
        return x

    def replace(y, hook, layer):
        if mode == "zero":
            new = torch.zeros_like(y)
        else:
            recon = ((state["acc"][..., layer, :] + clt.b_dec[layer]) / clt.output_scale[layer])
            recon = recon.to(y.dtype)
            new = recon + (y - recon) if mode == "replace+error" else recon
            if store is not None:
                store.setdefault("recon", {})[layer] = recon
                store.setdefault("mlp_out", {})[layer] = y
        return torch.where(keep, y, new)

    hooks = []
    for layer in range(L):
        if mode != "zero":
            hooks.append((f"blocks.{layer}.{cfg.input_hook}", partial(encode, layer=layer)))
        hooks.append((f"blocks.{layer}.{cfg.output_hook}", partial(replace, layer=layer)))
    return hooks


@torch.no_grad()
def replacement_logits(model, clt, tokens: Tensor, add_error: bool = False,
                       bos_id: int | None = None, return_store: bool = False):
    """Logits [B, P, V] of the replacement model on ``tokens`` [B, P] (see the module doc).
    With ``return_store``, also a dict with per-layer ``acts`` [B, P, F], ``recon`` and
    ``mlp_out`` [B, P, d] of the replacement forward pass."""
    clt.eval()
    keep = bos_mask(tokens, _bos_id(model, bos_id)).to(tokens.device)
    store = {} if return_store else None
    hooks = _replacement_hooks(model, clt, keep, "replace+error" if add_error else "replace", store)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
    return (logits, store) if return_store else logits


@torch.no_grad()
def zero_ablation_logits(model, tokens: Tensor, clt=None, bos_id: int | None = None) -> Tensor:
    """Logits with the MLP output of every layer set to 0 at every non-BOS position. At BOS
    positions (position 0 and BOS tokens) the model's own MLP outputs are kept, exactly
    where the replacement keeps them (see the module docstring for why)."""
    n_layers = model.cfg.n_layers
    keep = bos_mask(tokens, _bos_id(model, bos_id))[..., None]
    hook_name = clt.cfg.output_hook if clt is not None else "hook_mlp_out"

    def zero(y, hook):
        return torch.where(keep, y, torch.zeros_like(y))

    hooks = [(f"blocks.{l}.{hook_name}", zero) for l in range(n_layers)]
    return model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")


class ReplacementStats:
    """Streaming sums of the replacement-model metrics over scored positions."""

    def __init__(self):
        self.n = 0
        self.ce = {"original": 0.0, "replacement": 0.0, "zero_ablation": 0.0}
        self.kl = 0.0
        self.agree = 0.0

    def update(self, targets: Tensor, scored: Tensor, original: Tensor, replacement: Tensor,
               zero: Tensor) -> None:
        lp = {name: F.log_softmax(t[scored].float(), -1)
              for name, t in (("original", original), ("replacement", replacement),
                              ("zero_ablation", zero))}
        tgt = targets[scored]
        self.n += int(tgt.numel())
        for name, v in lp.items():
            self.ce[name] += float(-v.gather(-1, tgt[:, None]).double().sum())
        p = lp["original"].exp()
        self.kl += float((p * (lp["original"] - lp["replacement"])).sum(-1).double().sum())
        self.agree += float((lp["original"].argmax(-1) == lp["replacement"].argmax(-1)).sum())

    def row(self) -> dict:
        n = max(self.n, 1)
        ce = {k: v / n for k, v in self.ce.items()}
        gap = ce["zero_ablation"] - ce["original"]
        recovered = (ce["zero_ablation"] - ce["replacement"]) / gap if gap != 0 else math.nan
        return {"n_tokens": self.n, "ce_original": ce["original"],
                "ce_replacement": ce["replacement"], "ce_zero_ablation": ce["zero_ablation"],
                "ce_recovered": recovered, "kl": self.kl / n, "top1_agreement": self.agree / n}


@torch.no_grad()
def replacement_metrics(model, clt, tokens_by_lang: Mapping[str, Tensor], batch_size: int = 16,
                        add_error: bool = False, bos_id: int | None = None, pooled: bool = True,
                        pooled_languages=None):
    """Per-language replacement-model metrics (DataFrame, one row per language and, with
    ``pooled``, a row ``"all"`` over the scored tokens of the pooled languages): n_tokens,
    ce_original, ce_replacement, ce_zero_ablation, ce_recovered, kl (original ||
    replacement, nats per token), top1_agreement. ``tokens_by_lang``: ``{lang: LongTensor
    [M, n_ctx]}``. ``pooled_languages``: the languages pooled into ``"all"`` (e.g. those
    with a non-zero share in the model's training mixture); None pools every language.
    The per-language rows cover every language either way."""
    import pandas as pd

    pool = _pooled_set(tokens_by_lang, pooled_languages)
    clt.eval()
    bos = _bos_id(model, bos_id)
    device = next(model.parameters()).device
    rows, total = [], ReplacementStats()
    for lang, tokens in tokens_by_lang.items():
        stats = ReplacementStats()
        for chunk in _row_chunks(tokens, batch_size):
            chunk = chunk.to(device)
            mask = bos_mask(chunk, bos)
            scored = ~mask[:, :-1] & ~mask[:, 1:]
            original = model(chunk, return_type="logits")[:, :-1]
            replaced = replacement_logits(model, clt, chunk, add_error=add_error, bos_id=bos)[:, :-1]
            zero = zero_ablation_logits(model, chunk, clt, bos_id=bos)[:, :-1]
            for s in (stats, total) if lang in pool else (stats,):
                s.update(chunk[:, 1:], scored, original, replaced, zero)
        rows.append({"language": lang, **stats.row()})
    if pooled and (len(rows) > 1 or pooled_languages is not None):
        rows.append({"language": "all", **total.row()})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ one CLT, all tables --

def evaluate_clt(model, clt, sets: Mapping[str, Tensor], max_tokens_per_language: int | None = None,
                 batch_size: int = 16, pooled_languages=None) -> dict:
    """Evaluate ``clt`` on ``model`` over the token rows of each language in ``sets``.

    Returns ``{"layers": df, "languages": df}``: per language, and pooled over
    ``pooled_languages`` (None: every language) in the rows labelled ``all``, the
    per-layer FVU, L0 and dead features and the replacement-model metrics.
    ``max_tokens_per_language``: use only the first rows of each set (None: every row).
    """
    import pandas as pd

    if max_tokens_per_language:
        sets = {lang: t[:max(1, math.ceil(max_tokens_per_language / t.shape[1]))]
                for lang, t in sets.items()}
    cfg = clt.cfg
    pooled = ReconstructionStats(cfg.n_layers, cfg.d_model, cfg.d_features)
    per_lang = _reconstruction_stats(model, clt, sets, batch_size, pooled=pooled,
                                     pooled_languages=pooled_languages)
    layers = pd.concat([s.frame().assign(language=lang) for lang, s in
                        {**per_lang, "all": pooled}.items()], ignore_index=True)
    layers = layers[["language"] + [c for c in layers.columns if c != "language"]]
    languages = replacement_metrics(model, clt, sets, batch_size=batch_size,
                                    pooled_languages=pooled_languages)
    return {"layers": layers, "languages": languages}


__all__ = [
    "encode_layer", "decode_contributions", "bos_mask", "ReconstructionStats",
    "reconstruction_metrics", "replacement_logits", "zero_ablation_logits",
    "replacement_metrics", "evaluate_clt",
]
