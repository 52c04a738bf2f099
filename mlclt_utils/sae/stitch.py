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
    decoder bias when ``bias``), in the units of ``h``: an SAE that rescales its input per
    token (``constant_norm_rescale``) has its output scaled back by the same factor;
    zero for an empty selection without bias."""
    from .train import input_scale

    z = sae.encode(h)
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=z.device)
    out = z[..., idx] @ sae.W_dec[idx] if len(idx) else torch.zeros_like(h)
    out = out + sae.b_dec if bias else out
    return out * input_scale(sae, h)


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
                    labels: pd.DataFrame, languages: Sequence[str], seed: int = 0,
                    draws: int = 5) -> pd.DataFrame:
    """Loss of ``target_model`` per language and text batch under every condition:
    ``none`` (nothing stitched), ``bilingual`` (the SAE's bilingual latents), ``monolingual``
    (as many latents drawn from the monolingual ones, both languages), ``random`` (as many
    latents drawn from all live ones), each added and substituted; ``all`` substitutes every
    latent (the SAE's reconstruction). The added controls are drawn ``draws`` times (draw 0
    also substituted). ``labels`` is :func:`features.contexts.unit_languages`' table for the
    SAE. Columns: ``condition, mode, draw, language, batch, latents, norm, loss``; ``norm`` is
    the mean L2 norm of what is stitched in per kept position."""
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    rng = np.random.default_rng(seed)
    bilingual = labels.loc[labels["label"] == "bilingual", "unit"].to_numpy()
    mono = labels.loc[labels["label"].isin(languages), "unit"].to_numpy()
    live = labels.loc[labels["label"] != "dead", "unit"].to_numpy()
    n = len(bilingual)
    runs = [("none", "none", 0, None)]
    runs += [("bilingual", mode, 0, bilingual.tolist()) for mode in MODES]
    for d in range(draws):
        for cond, pool in (("monolingual", mono), ("random", live)):
            latents = rng.choice(pool, size=min(n, len(pool)), replace=False).tolist()
            runs += [(cond, mode, d, latents) for mode in (MODES if d == 0 else ("add",))]
    runs.append(("all", "substitute", 0, list(range(labels.shape[0]))))
    rows = []
    for lang in languages:
        for b, tokens in enumerate(batches[lang]):
            keep = kept_positions(tokens)
            with torch.no_grad():
                state = source_state(source_model, layer, tokens)      # one source pass per batch
            for cond, mode, draw, latents in runs:
                loss = stitched_loss(target_model, source_model, sae, layer, tokens, latents,
                                     "add" if mode == "none" else mode, state=state)
                norm = 0.0
                if latents is not None:
                    with torch.no_grad():
                        carried = latent_output(sae, state, latents, bias=(mode == "substitute"))
                    norm = float(carried.norm(dim=-1)[keep].mean())
                rows.append({"condition": cond, "mode": mode, "draw": draw, "language": lang, "batch": b,
                             "latents": len(latents or []), "norm": norm, "loss": loss})
    return pd.DataFrame(rows)


def _per_batch(table: pd.DataFrame) -> pd.DataFrame:
    """Loss per batch and condition, averaged over the control draws."""
    keys = [k for k in ("layer", "step") if k in table.columns]
    draw = ["draw"] if "draw" in table.columns else []
    return (table.drop(columns=draw).groupby(keys + ["mode", "condition", "language", "batch"], sort=False)
            [["loss", "latents", "norm"] if "norm" in table.columns else ["loss", "latents"]].mean().reset_index())


def stitching_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, step, mode, condition, language) where present: mean change of the loss
    against ``none`` over text batches (controls averaged over their draws first), with a t
    interval of the paired per-batch differences."""
    from ..claims import t_interval

    table = _per_batch(table)
    keys = [k for k in ("layer", "step") if k in table.columns]
    base = table[table["condition"] == "none"].set_index(keys + ["language", "batch"])["loss"]
    rest = table[table["condition"] != "none"].copy()
    rest["change"] = rest["loss"].to_numpy() - base.loc[
        list(map(tuple, rest[keys + ["language", "batch"]].to_numpy()))].to_numpy()
    rows = []
    for key, g in rest.groupby(keys + ["mode", "condition", "language"], sort=False):
        mean, lo, hi = t_interval(g["change"])
        rows.append({**dict(zip(keys + ["mode", "condition", "language"], key)), "loss_change": mean,
                     "batches": len(g), "low": lo if np.isfinite(lo) else mean,
                     "high": hi if np.isfinite(hi) else mean})
    return pd.DataFrame(rows)


def verdicts(table: pd.DataFrame, counted_steps: Sequence[int], model: str) -> list[dict]:
    """Claim B4 from a stitching table (with ``step`` and ``layer``): the loss change of the
    added bilingual latents minus that of the added monolingual (and random) latents, per
    language and text batch (averaged over the counted checkpoints and the layers; controls
    over their draws), with a t interval over those batches. Holds when bilingual latents
    lower the loss more (the difference is below 0)."""
    from ..claims import t_interval, verdict

    add = _per_batch(table[(table["mode"] == "add") & table["step"].isin(list(counted_steps))])
    out = []
    if add.empty:
        return out
    wide = add.pivot_table(index=["language", "batch"], columns="condition", values="loss", aggfunc="mean")
    latents = add.groupby("condition")["latents"].mean()
    norms = add.groupby("condition")["norm"].mean() if "norm" in add else pd.Series(dtype=float)
    for control in ("monolingual", "random"):
        if control not in wide or "bilingual" not in wide:
            continue
        diff = (wide["bilingual"] - wide[control]).dropna()
        est, lo, hi = t_interval(diff)
        equal = bool(np.isclose(latents["bilingual"], latents[control]))
        out.append(verdict("B4", f"loss change, bilingual minus {control} latents added (nats)", est, lo, hi,
                           control=f"{control} latents of the same count and layer, mean of the draws "
                                   f"(injected norm {norms.get(control, np.nan):.2f} vs {norms.get('bilingual', np.nan):.2f})",
                           n_units=len(diff), units="text batches (both languages)", chapter="09",
                           direction="less", model=model, counted=equal,
                           note="" if equal else f"the {control} set is smaller ({latents[control]:.0f} vs "
                                                 f"{latents['bilingual']:.0f} latents)"))
    return out
