"""Stitching (the bilingual-SAE study, paper B): carry a trained model's bilingual SAE
latents into an earlier checkpoint and see whether its language modelling improves.

The same text goes through the final model; its layer-``l`` residual stream is encoded by
the final model's SAE of that layer, and the decoder output of a chosen set of latents,
``sum_i z_i W_dec[i]``, goes into the earlier checkpoint's residual stream at the same layer
and positions, either **added** to it or **substituted** for it (then with the decoder bias,
so that substituting every latent gives exactly the SAE's reconstruction). BOS positions are
left as they are. The loss is the usual next-token loss over the rows' real tokens.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from ..features.activations import kept_positions

MODES = ("add", "substitute")


def latent_output(sae, h: Tensor, latents: Sequence[int], bias: bool) -> Tensor:
    """``sum over latents of z_i W_dec[i]`` for residual states ``h`` [..., d] (plus the
    decoder bias when ``bias``); zero for an empty selection without bias."""
    z = sae.encode(h)
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=z.device)
    out = z[..., idx] @ sae.W_dec[idx] if len(idx) else torch.zeros_like(h)
    return out + sae.b_dec if bias else out


def source_state(source_model, layer: int, tokens: Tensor) -> Tensor:
    """``source_model``'s residual stream after block ``layer`` on ``tokens`` (later blocks
    not run)."""
    name = f"blocks.{layer}.hook_resid_post"
    _, cache = source_model.run_with_cache(tokens, names_filter=[name], stop_at_layer=layer + 1)
    return cache[name]


@torch.no_grad()
def stitched_loss(target_model, source_model, sae, layer: int, tokens: Tensor,
                  latents: Sequence[int] | None, mode: str = "add", state: Tensor | None = None) -> float:
    """Mean next-token loss of ``target_model`` on ``tokens`` (PAD targets left out) with the
    chosen ``latents`` of ``source_model``'s layer-``layer`` state stitched in
    (``latents=None``: nothing, the target as it is). ``state``: that state when already
    computed (:func:`source_state`), so several selections share one source pass."""
    from ..tokenizer import PAD_ID

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    name = f"blocks.{layer}.hook_resid_post"
    if latents is None:
        logits = target_model(tokens)
    else:
        h = source_state(source_model, layer, tokens) if state is None else state
        carried = latent_output(sae, h, latents, bias=(mode == "substitute"))
        keep = kept_positions(tokens)[..., None]

        def stitch(resid, hook):
            new = resid + carried if mode == "add" else carried
            return torch.where(keep, new, resid)
        logits = target_model.run_with_hooks(tokens, fwd_hooks=[(name, stitch)])
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                 ignore_index=PAD_ID))


def stitching_table(target_model, source_model, sae, layer: int, batches: Mapping[str, Sequence[Tensor]],
                    labels: pd.DataFrame, languages: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """Loss of ``target_model`` per language and text batch under every condition:
    ``none`` (nothing stitched), ``bilingual`` (the SAE's bilingual latents), ``monolingual``
    (as many latents drawn from the monolingual ones, both languages), ``random`` (as many
    latents drawn from all live ones), each added and substituted; ``all`` substitutes every
    latent (the SAE's reconstruction). ``labels`` is :func:`features.contexts.unit_languages`'
    table for the SAE. Columns: ``condition, mode, language, batch, latents, loss``."""
    rng = np.random.default_rng(seed)
    bilingual = labels.loc[labels["label"] == "bilingual", "unit"].to_numpy()
    mono = labels.loc[labels["label"].isin(languages), "unit"].to_numpy()
    live = labels.loc[labels["label"] != "dead", "unit"].to_numpy()
    n = len(bilingual)
    chosen = {"bilingual": bilingual,
              "monolingual": rng.choice(mono, size=min(n, len(mono)), replace=False),
              "random": rng.choice(live, size=min(n, len(live)), replace=False)}
    runs = [("none", "none", None)]
    runs += [(cond, mode, latents.tolist()) for cond, latents in chosen.items() for mode in MODES]
    runs.append(("all", "substitute", list(range(labels.shape[0]))))
    rows = []
    for lang in languages:
        for b, tokens in enumerate(batches[lang]):
            with torch.no_grad():
                state = source_state(source_model, layer, tokens)      # one source pass per batch
            for cond, mode, latents in runs:
                loss = stitched_loss(target_model, source_model, sae, layer, tokens, latents,
                                     "add" if mode == "none" else mode, state=state)
                rows.append({"condition": cond, "mode": mode, "language": lang, "batch": b,
                             "latents": len(latents or []), "loss": loss})
    return pd.DataFrame(rows)


def stitching_summary(table: pd.DataFrame, z: float = 1.96) -> pd.DataFrame:
    """Per (layer, step, mode, condition, language) where present: mean change of the loss
    against ``none`` over text batches, with a normal confidence interval (``z`` x the
    standard error of the paired per-batch differences)."""
    keys = [k for k in ("layer", "step") if k in table.columns]
    base = table[table["condition"] == "none"].set_index(keys + ["language", "batch"])["loss"]
    rest = table[table["condition"] != "none"].copy()
    rest["change"] = rest["loss"].to_numpy() - base.loc[
        list(map(tuple, rest[keys + ["language", "batch"]].to_numpy()))].to_numpy()
    g = rest.groupby(keys + ["mode", "condition", "language"], sort=False)["change"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    half = z * out["std"].fillna(0) / np.sqrt(out["count"])
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns=["std"]).rename(columns={"mean": "loss_change", "count": "batches"})
