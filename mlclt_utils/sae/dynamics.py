"""Chapter 09: SAE latents of a bilingual model over training (the bilingual-SAE study).

For each kept checkpoint (the last ``sae_checkpoints`` of the model's log-spaced ones), one
TopK SAE per chosen layer (first, middle, last) is trained with SAELens from one pass of
activations per batch (:func:`sae.train.train_saes`); its quality is measured on held-out
rows, and every latent is labelled by the language of its top contexts with the shared
feature-statistics code (:mod:`features.contexts`), exactly as CLT features or neurons
would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from ..features.activations import SAELatents
from ..features.contexts import BILINGUAL, context_text, label_shares, top_contexts, unit_languages
from .train import SAETrainingConfig, sae_quality, save_sae, stream_activations, train_saes


def sae_layers(n_layers: int) -> list[int]:
    """The first, a middle and the last layer (fewer when the model has fewer layers)."""
    return sorted({0, n_layers // 2, n_layers - 1})


def sae_folder(root, step: int, layer: int, seed: int = 0) -> Path:
    """Where the SAE of ``layer`` at checkpoint ``step`` trained with SAE seed number
    ``seed`` (0, 1, ...) is saved (SAELens format)."""
    return Path(root) / f"step_{step:07d}" / f"seed_{seed}" / f"layer_{layer}"


def training_config(cfg: Mapping, d_model: int, seed: int) -> SAETrainingConfig:
    return SAETrainingConfig(d_sae=cfg["sae_expansion"] * d_model, k=cfg["sae_k"],
                             train_tokens=cfg["sae_tokens"], batch_tokens=cfg["sae_batch_tokens"],
                             lr=cfg["sae_lr"], seed=seed, dead_window_tokens=cfg["sae_dead_window_tokens"],
                             normalize_activations=cfg.get("sae_normalize", "none"))


def checkpoint_saes(model, train_rows: torch.Tensor, context_rows: Mapping[str, torch.Tensor],
                    token_languages, cfg: Mapping, seed: int, folder=None, tokenizer=None,
                    progress: bool = True) -> dict:
    """SAEs of one checkpoint and what the chapter reads from them.

    ``train_rows``: token rows to train on; ``context_rows``: held-out rows per language
    (quality and top contexts). Saves each SAE under ``folder`` when given. Returns
    ``{"saes": {layer: SAE}, "quality": DataFrame, "labels": DataFrame, "examples": DataFrame}``."""
    languages = list(context_rows)
    layers = sae_layers(model.cfg.n_layers)
    saes = train_saes(model, train_rows, layers, training_config(cfg, model.cfg.d_model, seed),
                      progress=progress)
    if folder is not None:
        for layer, sae in saes.items():
            save_sae(sae, folder(layer))
    rows = torch.cat([context_rows[l] for l in languages])
    quality = []
    acts = {}
    for batch in stream_activations(model, rows, layers, 32):
        for name, a in batch.items():
            acts.setdefault(name, []).append(a)
    for layer, sae in saes.items():
        q = sae_quality(sae, torch.cat(acts[f"blocks.{layer}.hook_resid_post"]))
        quality.append({"layer": layer, "d_sae": sae.cfg.d_sae, "k": cfg["sae_k"], **q})
    tops = top_contexts(SAELatents(model, saes), rows, cfg["top_contexts"], 32)
    labels, examples = [], []
    for layer, top in zip(sorted(saes), tops):
        lab = unit_languages(top, rows, token_languages, languages, cfg["context_ratio"], cfg["language_share"])
        labels.append(lab.assign(layer=layer))
        if tokenizer is not None:
            examples.append(_examples(lab, top, rows, tokenizer, token_languages, languages).assign(layer=layer))
    labels = pd.concat(labels, ignore_index=True)
    examples = pd.concat(examples, ignore_index=True) if examples else pd.DataFrame()
    return {"saes": saes, "quality": pd.DataFrame(quality), "labels": labels, "examples": examples}


def _examples(labels: pd.DataFrame, top, rows, tokenizer, token_languages, languages,
              n_latents: int = 3, per_language: int = 2) -> pd.DataFrame:
    """Top contexts, per language, of the most active bilingual latents that are not positional."""
    token_lang = token_languages.labels()
    flat = rows.reshape(-1)
    # positional latents (most contexts at one position of the row) are not shown as
    # bilingual examples: they follow where a token sits, not what it means
    bi = labels[(labels["label"] == BILINGUAL) & (labels["position_share"] <= 0.5)].nlargest(n_latents, "max_activation")
    out = []
    for unit in bi["unit"]:
        vals, pos = top.values[:, unit], top.positions[:, unit]
        for lang in languages:
            shown = 0
            for v, p in zip(vals.tolist(), pos.tolist()):
                if v <= 0 or shown >= per_language:
                    break
                if token_lang[int(flat[p])] == lang:
                    out.append({"unit": int(unit), "language": lang, "activation": v,
                                "context": context_text(tokenizer, rows, p)})
                    shown += 1
    return pd.DataFrame(out, columns=["unit", "language", "activation", "context"])


def bilingual_dynamics(load_model: Callable[[int], object], steps: Sequence[int], train_rows, context_rows,
                       token_languages, cfg: Mapping, seed: int, root, tokenizer=None,
                       progress: bool = True) -> dict[str, pd.DataFrame]:
    """:func:`checkpoint_saes` at every step of ``steps``, ``cfg["sae_seeds"]`` SAEs per layer
    (seeds ``seed``, ``seed + 1``, ...; column ``sae_seed`` 0, 1, ...), saved under ``root``;
    the tables of all steps together (columns ``step``, ``sae_seed``) plus ``shares`` (step,
    sae_seed, layer, label, share)."""
    from ..viz.progress import progress_bar

    tables = {"quality": [], "labels": [], "examples": [], "shares": []}
    languages = list(context_rows)
    n_seeds = int(cfg.get("sae_seeds", 1))
    runs = [(step, i) for step in steps for i in range(n_seeds)]
    model, loaded = None, None
    for step, i in progress_bar(iterable=runs, desc="SAEs (checkpoint, seed)", disable=not progress):
        if loaded != step:
            model, loaded = load_model(step), step
        out = checkpoint_saes(model, train_rows, context_rows, token_languages, cfg, seed + i,
                              folder=lambda layer, step=step, i=i: sae_folder(root, step, layer, i),
                              tokenizer=tokenizer, progress=False)
        for name in ("quality", "labels", "examples"):
            tables[name].append(out[name].assign(step=step, sae_seed=i))
        for layer, g in out["labels"].groupby("layer"):
            tables["shares"] += [pd.DataFrame([{"step": step, "sae_seed": i, "layer": layer, "label": k, "share": v}
                                               for k, v in label_shares(g, languages).items()])]
    return {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame() for k, v in tables.items()}


def bilingual_verdicts(labels: Mapping[str, pd.DataFrame], quality: Mapping[str, pd.DataFrame],
                       counted_steps: Mapping[str, Sequence[int]], max_fvu: float, max_dead: float,
                       max_position_share: float = 0.5) -> list[dict]:
    """Claims B1-B3 from each model's latent labels (``step, layer, unit, label,
    position_share``) and SAE quality (``step, layer, fvu, dead_share, d_sae, k``), over the
    live latents that are not positional (``position_share`` at most ``max_position_share``)
    of the SAEs that meet the quality bar, at checkpoints where training had moved the loss.
    Shares are compared with Newcombe intervals over latents. ``labels`` is ordered smaller
    model first, larger last. With a ``sae_seed`` column, every SAE seed gets its own rows,
    all counted: a claim then holds only when it holds for every seed's SAEs."""
    def seeds_of(t):
        return sorted(t["sae_seed"].unique()) if "sae_seed" in t else [0]

    def of_seed(t, i):
        return t[t["sae_seed"] == i] if "sae_seed" in t else t

    seeds = sorted(set().union(*[seeds_of(t) for t in labels.values()]))
    out = []
    for i in seeds:
        rows = _seed_verdicts({n: of_seed(t, i) for n, t in labels.items()},
                              {n: of_seed(t, i) for n, t in quality.items()},
                              counted_steps, max_fvu, max_dead, max_position_share)
        if len(seeds) > 1:
            rows = [{**r, "statistic": f"{r['statistic']} (SAE seed {i})"} for r in rows]
        out += rows
    return out


def _seed_verdicts(labels, quality, counted_steps, max_fvu, max_dead, max_position_share) -> list[dict]:
    """:func:`bilingual_verdicts` for the SAEs of one seed."""
    from ..claims import proportion_difference, verdict

    def usable(name):
        lab, q = labels[name], quality[name]
        ok = q[(q["fvu"] <= max_fvu) & (q["dead_share"] <= max_dead)][["step", "layer"]]
        lab = lab.merge(ok, on=["step", "layer"])
        lab = lab[(lab["label"] != "dead") & (lab["position_share"] <= max_position_share)]
        return lab[lab["step"].isin(list(counted_steps[name]))]

    def count(lab):
        return int((lab["label"] == "bilingual").sum()), len(lab)

    out, finals = [], {}
    common = dict(units="live non-positional latents", chapter="09")
    for name in labels:
        lab = usable(name)
        steps = sorted(lab["step"].unique())
        if not steps:
            continue
        first, last = lab[lab["step"] == steps[0]], lab[lab["step"] == steps[-1]]
        finals[name] = last
        if len(steps) >= 2:
            d = proportion_difference(*count(last), *count(first))
            out.append(verdict("B1", f"bilingual share, step {steps[-1]} minus step {steps[0]}", *d,
                               control=f"the share at step {steps[0]}, the first SAE checkpoint after the loss moved",
                               n_units=len(first) + len(last), model=name, **common))
        layers = sorted(labels[name]["layer"].unique())
        if len(layers) >= 3:
            edge = last["layer"].isin([layers[0], layers[-1]])
            if edge.any() and (~edge).any():
                d = proportion_difference(*count(last[~edge]), *count(last[edge]))
                out.append(verdict("B2", f"bilingual share at step {steps[-1]}, middle layers minus first and last",
                                   *d, control="the first and last layers' share",
                                   n_units=len(last), model=name, **common))
    names = list(labels)
    if len(names) > 1 and names[0] in finals and names[-1] in finals:
        small, big = names[0], names[-1]
        density = {n: (quality[n]["k"] / quality[n]["d_sae"]) for n in (small, big)}
        same = bool(abs(density[big].mean() / density[small].mean() - 1) < 0.05
                    and density[small].nunique() == 1 and density[big].nunique() == 1)
        d = proportion_difference(*count(finals[big]), *count(finals[small]))
        out.append(verdict("B3", f"final bilingual share, {big} minus {small}", *d,
                           control=f"{small}'s share", n_units=len(finals[big]) + len(finals[small]),
                           model=big, counted=same,
                           note="" if same else "the two sizes' SAEs have different k / latents, so "
                                                "density could explain a difference", **common))
    return out
