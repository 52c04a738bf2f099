"""Chapter 05's statistics of one model and its CLT, computed in one call so that the stage
(``language_stats`` in ``mlclt_utils.stages``) only stores them:

* language probes by layer, from the residual stream and from the CLT features, fitted on
  one split of the data and scored on another (``features.probe``);
* the token-language table of the model's training data (``features.language``);
* the CLT's language features of every layer (``features.specificity`` on the parallel-set
  statistics of chapter 04) with their logit lift (``features.lift``) and top tokens;
* per scored token, the first layer's residual probe's probabilities and the summed
  activation of each language's late-layer language features, and whether the probes of the
  token embedding, of layer 0 and of the last layer got its language right (the embedding
  probe is the baseline of claim A3: what the token alone says);
* a null for the lift: the lift of random live non-language features of the late layers
  (``lift_null``), so a language feature's lift is compared with what any feature's write does.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch

from .activations import CLTFeatures, ResidualStream
from .language import TokenLanguages
from .lift import clt_decoder_directions, logit_lift
from .probe import fit_language_probe
from .specificity import count_language_features, language_features, specificity
from .tokens import late_layers, token_activations, top_tokens


def language_statistics(model, clt, data: Mapping, units: Mapping, tokenizer,
                        cfg: Mapping) -> dict:
    """``{"tables": {"probe", "language_features", "feature_counts", "tokens": DataFrame},
    "token_languages": TokenLanguages, "info": {...}}``. ``data``: a data stage's contents;
    ``units``: a ``unit_stats`` stage's contents; ``cfg``: the stage config (fit_split,
    score_split, probe_tokens, probe_max_iter, top_tokens, batch_size, min_frequency,
    min_concentration, seed, languages)."""
    trained = cfg.get("trained_languages") or cfg["languages"]
    langs = [lang for lang in cfg["languages"] if lang in data[cfg["fit_split"]] and lang in trained]
    sources = {"resid": ResidualStream(model), "clt": CLTFeatures(model, clt)}
    fit = token_activations(sources, {l: data[cfg["fit_split"]][l] for l in langs},
                            cfg["probe_tokens"], cfg["batch_size"])
    score = token_activations(sources, {l: data[cfg["score_split"]][l] for l in langs},
                              cfg["probe_tokens"], cfg["batch_size"])
    n_layers = model.cfg.n_layers

    # probes by layer; the first layer's residual probe is kept for the token table
    rows, first_probe = [], None
    for kind in sources:
        for layer in range(n_layers):
            res = fit_language_probe(fit.layer(kind, layer), fit.y, score.layer(kind, layer), score.y,
                                     max_iter=cfg["probe_max_iter"], seed=cfg["seed"], labels=langs)
            rows.append({"unit": kind, "layer": layer, **res.row()})
            if kind == "resid" and layer == 0:
                first_probe = res.model
    # the baseline: a probe on the token embedding alone (token identity, no context)
    W_E = model.W_E.detach().float()
    score_embed = W_E[score.token_ids.long()].numpy()
    embed = fit_language_probe(W_E[fit.token_ids.long()].numpy(), fit.y, score_embed,
                               score.y, max_iter=cfg["probe_max_iter"], seed=cfg["seed"], labels=langs)
    rows.append({"unit": "embed", "layer": -1, **embed.row()})
    probe = pd.DataFrame(rows)
    last_probe = fit_language_probe(fit.layer("resid", n_layers - 1), fit.y, score.layer("resid", n_layers - 1),
                                    score.y, max_iter=cfg["probe_max_iter"], seed=cfg["seed"], labels=langs).model

    # token languages from the training rows of each language of the mixture
    token_langs = TokenLanguages.from_training_data(data, model.cfg.d_vocab)
    labelled = [lang for lang in langs if lang in set(token_langs.labels())]

    # language features of every layer (over the languages the model was trained on), their
    # lift and top tokens
    clt_units = {lang: units["clt"][lang] for lang in langs}
    both = {kind: [torch.cat([a, b]) for a, b in zip(fit.X[kind], score.X[kind])] for kind in ("clt",)}
    both_ids = torch.cat([fit.token_ids, score.token_ids])
    thresholds = {"min_frequency": cfg["min_frequency"], "min_concentration": cfg["min_concentration"]}
    feats = []
    for layer in range(n_layers):
        lf = language_features(specificity(clt_units, layer), **thresholds)
        if lf.empty:
            continue
        lf = lf.reset_index().rename(columns={"unit": "feature"})
        lf.insert(0, "layer", layer)
        if labelled:
            lift = logit_lift(clt_decoder_directions(clt, layer, lf["feature"].tolist()), model,
                              token_langs, languages=labelled)
            for lang in labelled:
                lf[f"lift_{lang}"] = lift[lang].to_numpy()
            lf["own_lift"] = [lift.iloc[i].get(lang, np.nan) for i, lang in enumerate(lf["top_language"])]
        top = top_tokens(both["clt"][layer][:, lf["feature"].tolist()], both_ids, cfg["top_tokens"])
        lf["top_tokens"] = [" · ".join(shown_token(tokenizer, t) for t in ids) for ids in top]
        feats.append(lf)
    feats = pd.concat(feats, ignore_index=True) if feats else pd.DataFrame(
        columns=["layer", "feature", "top_language", "frequency", "concentration"])
    counts = count_language_features(clt_units, **thresholds)
    fired_any = [sum(u.counts[layer] for u in clt_units.values()) > 0 for layer in range(n_layers)]
    live = [int(f.sum()) for f in fired_any]

    # null for the lift: random live features of the late layers that are not language features
    null, rng = [], np.random.default_rng(cfg["seed"])
    for layer in late_layers(n_layers) if labelled else []:
        chosen = set(feats.loc[feats["layer"] == layer, "feature"]) if len(feats) else set()
        alive = fired_any[layer].nonzero().flatten().tolist()
        pool = [f for f in alive if f not in chosen]
        if not pool:
            continue
        picked = sorted(rng.choice(pool, size=min(len(pool), NULL_FEATURES), replace=False).tolist())
        lift = logit_lift(clt_decoder_directions(clt, layer, picked), model, token_langs, languages=labelled)
        null.append(pd.DataFrame({"layer": layer, "feature": picked,
                                  **{f"lift_{lang}": lift[lang].to_numpy() for lang in labelled}}))
    null = pd.concat(null, ignore_index=True) if null else pd.DataFrame(columns=["layer", "feature"])

    # per scored token: the first-layer probe's probabilities and the summed activation of
    # each language's late-layer language features
    tokens = pd.DataFrame({"language": score.y, "token": score.token_ids.numpy()})
    proba = first_probe.predict_proba(score.layer("resid", 0))
    for j, lang in enumerate(first_probe.classes_):
        tokens[f"p0_{lang}"] = proba[:, j]
    tokens["hit_embed"] = embed.model.predict(score_embed) == score.y
    tokens["hit_first"] = first_probe.predict(score.layer("resid", 0)) == score.y
    tokens["hit_last"] = last_probe.predict(score.layer("resid", n_layers - 1)) == score.y
    tokens["owner"] = [token_langs.language_of(int(t)) for t in score.token_ids]
    late = late_layers(n_layers)
    for lang in langs:
        total = np.zeros(score.n_tokens)
        for layer in late:
            chosen = feats[(feats["layer"] == layer) & (feats["top_language"] == lang)]["feature"]
            if len(chosen):
                total += score.X["clt"][layer][:, chosen.tolist()].sum(1).numpy()
        tokens[f"late_{lang}"] = total

    return {"tables": {"probe": probe, "language_features": feats, "feature_counts": counts,
                       "tokens": tokens, "lift_null": null},
            "token_languages": token_langs,
            "info": {"languages": langs, "late_layers": late, "lift_languages": labelled,
                     "live_features": live,
                     "fit_tokens": fit.n_tokens, "score_tokens": score.n_tokens}}


NULL_FEATURES = 50     # random non-language features per late layer for the lift null


def language_verdicts(stats: Mapping, model_name: str, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Claim A3 from a loaded ``language_stats`` stage: (1) the first layer's residual probe
    beats the token-embedding probe on tokens no language owns (paired over tokens; all
    tokens shown, not counted: there the token's own language gives most of the answer);
    (2) language features are a larger share of live features in the late layers than in the
    earlier ones (Newcombe); (3) late language features' lift on their own language is above
    the lift of random non-language features of the same layers on that language."""
    from ..claims import bootstrap, mean_interval, proportion_difference, verdict

    out = []
    tok = stats["tokens"]
    common = dict(chapter="05", model=model_name)
    if "hit_embed" in tok:
        for subset, name, counted in ((tok[tok["owner"] == "shared"], "tokens no language owns", True),
                                      (tok, "all test tokens", False)):
            if len(subset) < 2:
                continue
            pair = np.stack([subset["hit_first"].astype(float), subset["hit_embed"].astype(float)], 1)
            est, lo, hi = bootstrap(pair, lambda p: float(p[:, 0].mean() - p[:, 1].mean()), n_boot, seed)
            out.append(verdict("A3", f"layer-0 residual probe accuracy minus token-embedding probe, {name}",
                               est, lo, hi, control="a probe on the token embedding (the token alone)",
                               n_units=len(subset), units="test tokens", counted=counted,
                               note="" if counted else "includes tokens of one language, where the token alone tells", **common))
    counts = stats["feature_counts"].groupby("layer")["language features"].sum()
    live = np.asarray(stats["live_features"])
    late = list(stats["late_layers"])
    early = [l for l in range(len(live)) if l not in late]
    if early:
        k_late, n_late = int(counts.reindex(late).sum()), int(live[late].sum())
        k_early, n_early = int(counts.reindex(early).sum()), int(live[early].sum())
        if n_late and n_early:
            d = proportion_difference(k_late, n_late, k_early, n_early)
            out.append(verdict("A3", "share of live features that are language features, late minus earlier layers",
                               *d, control="the earlier layers' share", n_units=n_late + n_early,
                               units="live features", **common))
    feats, null = stats["language_features"], stats["lift_null"]
    if len(feats) and "own_lift" in feats and len(null):
        lf = feats[feats["layer"].isin(late)].dropna(subset=["own_lift"])
        base = null.groupby("layer").mean(numeric_only=True)
        excess = [r.own_lift - base.loc[r.layer, f"lift_{r.top_language}"] for r in lf.itertuples()
                  if r.layer in base.index and f"lift_{r.top_language}" in base]
        if excess:
            est, lo, hi = mean_interval(excess, n_boot, seed)
            out.append(verdict("A3", "late language features' lift on their language minus random features' lift",
                               est, lo, hi, control=f"up to {NULL_FEATURES} random live non-language features per late layer",
                               n_units=len(excess), units="late language features", **common))
    return out


def shown_token(tokenizer, token_id: int) -> str:
    """A token as text, its spaces shown as ␣ and line breaks as ⏎; a byte piece of a
    character (which decodes to U+FFFD) as ⟨byte⟩."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        return "⟨byte⟩"
    return text.replace(" ", "␣").replace("\n", "⏎")
