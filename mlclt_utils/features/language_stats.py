"""Chapter 05's statistics of one model and its CLT, computed in one call so that the stage
(``language_stats`` in ``mlclt_utils.stages``) only stores them:

* language probes by layer, from the residual stream and from the CLT features, fitted on
  one split of the data and scored on another (``features.probe``);
* the token-language table of the model's training data (``features.language``);
* the CLT's language features of every layer (``features.specificity`` on the parallel-set
  statistics of chapter 04) with their logit lift (``features.lift``) and top tokens;
* per scored token, the first layer's residual probe's probabilities and the summed
  activation of each language's late-layer language features.
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
    langs = [lang for lang in cfg["languages"] if lang in data[cfg["fit_split"]]]
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
    probe = pd.DataFrame(rows)

    # token languages from the training rows of each language of the mixture
    token_langs = TokenLanguages.from_training_data(data, model.cfg.d_vocab)
    labelled = [lang for lang in langs if lang in set(token_langs.labels())]

    # language features of every layer, their lift and top tokens
    both = {kind: [torch.cat([a, b]) for a, b in zip(fit.X[kind], score.X[kind])] for kind in ("clt",)}
    both_ids = torch.cat([fit.token_ids, score.token_ids])
    thresholds = {"min_frequency": cfg["min_frequency"], "min_concentration": cfg["min_concentration"]}
    feats = []
    for layer in range(n_layers):
        lf = language_features(specificity(units["clt"], layer), **thresholds)
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
    counts = count_language_features(units["clt"], **thresholds)

    # per scored token: the first-layer probe's probabilities and the summed activation of
    # each language's late-layer language features
    tokens = pd.DataFrame({"language": score.y, "token": score.token_ids.numpy()})
    proba = first_probe.predict_proba(score.layer("resid", 0))
    for j, lang in enumerate(first_probe.classes_):
        tokens[f"p0_{lang}"] = proba[:, j]
    late = late_layers(n_layers)
    for lang in langs:
        total = np.zeros(score.n_tokens)
        for layer in late:
            chosen = feats[(feats["layer"] == layer) & (feats["top_language"] == lang)]["feature"]
            if len(chosen):
                total += score.X["clt"][layer][:, chosen.tolist()].sum(1).numpy()
        tokens[f"late_{lang}"] = total

    return {"tables": {"probe": probe, "language_features": feats, "feature_counts": counts,
                       "tokens": tokens},
            "token_languages": token_langs,
            "info": {"languages": langs, "late_layers": late, "lift_languages": labelled,
                     "fit_tokens": fit.n_tokens, "score_tokens": score.n_tokens}}


def shown_token(tokenizer, token_id: int) -> str:
    """A token as text, its spaces shown as ␣ and line breaks as ⏎; a byte piece of a
    character (which decodes to U+FFFD) as ⟨byte⟩."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:
        return "⟨byte⟩"
    return text.replace(" ", "␣").replace("\n", "⏎")
