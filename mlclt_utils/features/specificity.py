"""How language-specific each unit is (claim 3 of the multilingual-CLT study).

Per unit and layer, from ``UnitStats.counts`` of each language:

* frequency in each language: the share of that language's tokens on which it fires;
* concentration: the share of its (frequency-normalised) firing that falls in its top
  language, so a unit that fires equally often in every language of an n-language set has
  concentration 1/n whatever the sizes of the sets;
* entropy over languages of that normalised distribution, in bits (0: one language only).

Language features are the units of a layer that fire often (frequency in their top language
at least ``min_frequency``) and almost only in that language (concentration at least
``min_concentration``); both thresholds are parameters, with defaults stated on the methods
page.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .activations import UnitStats

MIN_FREQUENCY = 0.05
MIN_CONCENTRATION = 0.8


def specificity(stats: Mapping[str, UnitStats], layer: int) -> pd.DataFrame:
    """One row per unit of ``layer``: freq_<lang> for each language, top_language,
    concentration, entropy_bits; units that never fire have NaN concentration."""
    langs = list(stats)
    freq = np.stack([s.counts[layer].double().numpy() / max(s.n_tokens, 1) for s in stats.values()], 1)
    total = freq.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.where(total > 0, freq / np.where(total > 0, total, 1), np.nan)
        entropy = -np.nansum(np.where(dist > 0, dist * np.log2(dist), 0.0), axis=1)
    top = np.nanargmax(np.where(np.isnan(dist), -1, dist), axis=1)
    df = pd.DataFrame(freq, columns=[f"freq_{lang}" for lang in langs])
    df.index.name = "unit"
    df["top_language"] = [langs[i] for i in top]
    df["concentration"] = dist[np.arange(len(df)), top]
    df["entropy_bits"] = np.where(total[:, 0] > 0, entropy, np.nan)
    df.loc[total[:, 0] == 0, "top_language"] = None
    return df


def language_features(spec: pd.DataFrame, min_frequency: float = MIN_FREQUENCY,
                      min_concentration: float = MIN_CONCENTRATION) -> pd.DataFrame:
    """The rows of ``specificity(...)`` that are language features (see the module
    docstring), sorted by language then frequency in it."""
    if not 0 <= min_frequency <= 1 or not 0 < min_concentration <= 1:
        raise ValueError(f"min_frequency must be in [0, 1] and min_concentration in (0, 1], got "
                         f"{min_frequency}, {min_concentration}")
    top_freq = np.array([row[f"freq_{lang}"] if isinstance(lang, str) else 0.0
                         for lang, (_, row) in zip(spec["top_language"], spec.iterrows())])
    mask = (top_freq >= min_frequency) & (spec["concentration"].to_numpy() >= min_concentration)
    chosen = spec[mask].copy()
    chosen["frequency"] = top_freq[mask]
    return chosen.sort_values(["top_language", "frequency"], ascending=[True, False])


def count_language_features(stats: Mapping[str, UnitStats], **thresholds) -> pd.DataFrame:
    """Per layer and language, the number of language features."""
    rows = []
    langs = list(stats)
    for layer in range(len(next(iter(stats.values())).counts)):
        chosen = language_features(specificity(stats, layer), **thresholds)
        counts = chosen["top_language"].value_counts()
        rows += [{"layer": layer, "language": lang, "language features": int(counts.get(lang, 0))}
                 for lang in langs]
    return pd.DataFrame(rows)
