"""A concept map: the verse-mean activations of a layer, for every verse and language,
projected to two dimensions (scikit-learn's t-SNE), so a reader sees whether verses group
by meaning (the same verse in every language together) or by language."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .activations import UnitStats


def concept_map(stats: Mapping[str, UnitStats], layer: int, max_rows: int = 200,
                seed: int = 0, perplexity: float = 30.0) -> pd.DataFrame:
    """Columns row, language, x, y: one point per (verse, language) of the first
    ``max_rows`` verses, from ``UnitStats.means`` of ``layer``. The vectors are scaled to
    unit length first, so a verse's length does not place it."""
    from sklearn.manifold import TSNE

    langs = list(stats)
    n = min(max_rows, min(s.means[layer].shape[0] for s in stats.values()))
    if n < 2:
        raise ValueError(f"a concept map needs at least two rows, got {n}")
    X = np.concatenate([stats[lang].means[layer][:n].numpy() for lang in langs]).astype(np.float64)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    points = len(X)
    xy = TSNE(n_components=2, init="pca", random_state=seed,
              perplexity=min(perplexity, max(2.0, (points - 1) / 3))).fit_transform(X)
    return pd.DataFrame({"row": np.tile(np.arange(n), len(langs)),
                         "language": np.repeat(langs, n), "x": xy[:, 0], "y": xy[:, 1]})


def translation_neighbours(stats: Mapping[str, UnitStats], layer: int, max_rows: int = 200
                           ) -> dict:
    """How often a verse's nearest neighbour (cosine of the unit-length verse-mean vectors of
    ``layer``, the space the concept map starts from, not its 2-D picture) is the same verse
    in another language. ``{"share", "low", "high", "chance", "points"}``: Wilson interval
    over points; chance is (L - 1) / (N L - 1) for N verses in L languages, the share of the
    other points that are translations."""
    from ..claims import wilson

    langs = list(stats)
    n = min(max_rows, min(s.means[layer].shape[0] for s in stats.values()))
    if n < 2 or len(langs) < 2:
        raise ValueError(f"translation neighbours need two languages and two rows, got {langs}, {n}")
    X = np.concatenate([stats[lang].means[layer][:n].numpy() for lang in langs]).astype(np.float64)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    sim = X @ X.T
    np.fill_diagonal(sim, -np.inf)
    rows = np.tile(np.arange(n), len(langs))
    hits = int((rows[sim.argmax(1)] == rows).sum())
    share, lo, hi = wilson(hits, len(rows))
    L = len(langs)
    return {"share": share, "low": lo, "high": hi, "chance": (L - 1) / (n * L - 1), "points": len(rows)}
