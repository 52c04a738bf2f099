"""Language regions and semantic alignment over any unit (chapter 10, the lingua-franca study).

Everything here reads :class:`~mlclt_utils.features.activations.UnitStats` per language of
a parallel set: ``means[layer]`` is each row's *activation pattern* (the unit's activation
averaged over the row's tokens, BOS and padding left out), computed by the same streamed
pass as chapters 04-05, so MLP neurons, CLT features and SAE latents go through one code path.
Row ``i`` of every language is the same sentence: the parallel index is the meaning.

* :func:`region_scores`: cosine similarity of patterns over all rows of all languages, and

  - **LRDS** (language region score) = mean similarity of two different rows of the same
    language - mean similarity of two rows of different languages;
  - **SADS** (semantic alignment score) = mean similarity of the same sentence in two
    languages - mean similarity of different sentences in two languages. Both terms compare
    pairs of *different* languages, so a model that only separates languages scores 0, not
    below 0. Meaning comes from the explicit parallel index, never from the position in a
    list (the reference code walks its list with the wrong stride).

* :func:`key_units`: a unit's contribution to same-language similarity (mean over pairs of
  rows of that language of the product of their L2-normalised patterns; the contributions of
  all units add up to the language's mean similarity), and its z-score.
* :func:`lape_units`: LAPE (Tang et al. 2024), units whose firing probability is
  concentrated on few languages (lowest entropy across languages).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .activations import UnitStats


def _layers(stats: Mapping[str, UnitStats], layers: Sequence[int] | None) -> list[int]:
    n = len(next(iter(stats.values())).means)
    layers = list(range(n)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise ValueError(f"layers {bad} are out of range; the units have layers 0..{n - 1}")
    return layers


def patterns(stats: Mapping[str, UnitStats], layers: Sequence[int] | None = None,
             max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X [languages x rows, units], language [n], meaning [n])``: every language's row
    patterns of ``layers`` (default all, concatenated in order), languages one after another.
    ``meaning`` is the parallel row index. Every language must have the same rows."""
    if not stats:
        raise ValueError("no languages: give UnitStats for at least two languages")
    layers = _layers(stats, layers)
    n_rows = {lang: s.means[0].shape[0] for lang, s in stats.items()}
    if len(set(n_rows.values())) != 1:
        raise ValueError(f"the languages have different numbers of parallel rows: {n_rows}")
    n = next(iter(n_rows.values())) if max_rows is None else min(max_rows, next(iter(n_rows.values())))
    blocks = [np.concatenate([s.means[l][:n].double().numpy() for l in layers], axis=1)
              for s in stats.values()]
    langs = np.repeat(np.array(list(stats)), n)
    meaning = np.tile(np.arange(n), len(stats))
    return np.concatenate(blocks, axis=0), langs, meaning


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a row of zeros stays zero: it is similar to nothing)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x, dtype=float), where=norm > 0)


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """``[n, n]`` cosine similarity of the rows of ``x``."""
    xn = normalise(np.asarray(x, dtype=float))
    return xn @ xn.T


def region_scores(x: np.ndarray, language: Sequence, meaning: Sequence) -> dict:
    """``{"lrds", "sads", "same_language", "other_language", "same_meaning",
    "other_meaning"}`` for patterns ``x`` [n, units] with each row's language and parallel
    index (see the module docstring)."""
    language, meaning = np.asarray(language), np.asarray(meaning)
    if not len(language) == len(meaning) == len(x):
        raise ValueError(f"x has {len(x)} rows but {len(language)} languages and {len(meaning)} "
                         "meanings were given")
    if len(set(language.tolist())) < 2:
        raise ValueError("region scores need at least two languages")
    s = cosine_matrix(x)
    same_lang = language[:, None] == language[None, :]
    same_meaning = meaning[:, None] == meaning[None, :]
    off = ~np.eye(len(x), dtype=bool)
    if not (same_lang & ~same_meaning).any():
        raise ValueError("every language has one row: region scores need at least two rows each")
    out = {"same_language": float(s[same_lang & off].mean()),
           "other_language": float(s[~same_lang].mean()),
           "same_meaning": float(s[same_meaning & ~same_lang].mean()),
           "other_meaning": float(s[~same_meaning & ~same_lang].mean())}
    out["lrds"] = out["same_language"] - out["other_language"]
    out["sads"] = out["same_meaning"] - out["other_meaning"]
    return out


def row_scores(x: np.ndarray, language: Sequence, meaning: Sequence) -> pd.DataFrame:
    """``meaning, lrds, sads``: each parallel row's share of the two scores, so that their mean
    over rows is :func:`region_scores` exactly (every row has the same number of pairs) and an
    interval can resample rows. Row i's LRDS: mean over languages a of [similarity of (i, a)
    to other rows of a minus to rows of other languages]; its SADS: mean over language pairs
    a != b of [similarity of (i, a) to (i, b) minus to other rows (j, b)]."""
    language, meaning = np.asarray(language), np.asarray(meaning)
    s = cosine_matrix(x)
    same_lang = language[:, None] == language[None, :]
    same_meaning = meaning[:, None] == meaning[None, :]
    off = ~np.eye(len(x), dtype=bool)

    def mean_where(mask):
        return (s * mask).sum(1) / np.maximum(mask.sum(1), 1)

    point_lrds = mean_where(same_lang & off) - mean_where(~same_lang)
    point_sads = mean_where(same_meaning & ~same_lang) - mean_where(~same_meaning & ~same_lang)
    out = pd.DataFrame({"meaning": meaning, "lrds": point_lrds, "sads": point_sads})
    return out.groupby("meaning", sort=True)[["lrds", "sads"]].mean().reset_index()


def row_scores_by_layer(stats: Mapping[str, UnitStats], max_rows: int | None = None) -> pd.DataFrame:
    """:func:`row_scores` of all layers concatenated (``layer == "all"``) and of every layer
    alone (``layer`` "0", "1", ...): ``meaning, lrds, sads, layer``."""
    n_layers = len(next(iter(stats.values())).means)
    return pd.concat([row_scores(*patterns(stats, layers, max_rows)).assign(layer=name)
                      for layers, name in [(None, "all")] + [([l], str(l)) for l in range(n_layers)]],
                     ignore_index=True)


def score_intervals(rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """LRDS and SADS with 95 % intervals over parallel rows, per group of ``rows`` (every
    column but ``meaning, lrds, sads``, e.g. unit, step, layer): columns ``lrds, lrds_low,
    lrds_high, sads, sads_low, sads_high`` beside the group's keys."""
    from ..claims import mean_interval

    keys = [c for c in rows.columns if c not in ("meaning", "lrds", "sads")]
    out = []
    for key, g in rows.groupby(keys, sort=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for score in ("lrds", "sads"):
            row[score], row[f"{score}_low"], row[f"{score}_high"] = mean_interval(g[score], n_boot, seed)
        out.append(row)
    return pd.DataFrame(out)


def scores_by_layer(stats: Mapping[str, UnitStats], max_rows: int | None = None) -> pd.DataFrame:
    """LRDS and SADS of every layer alone and of all layers concatenated (``layer == "all"``)."""
    rows = []
    n_layers = len(next(iter(stats.values())).means)
    for layers, name in [(None, "all")] + [([l], str(l)) for l in range(n_layers)]:
        x, lang, meaning = patterns(stats, layers, max_rows)
        rows.append({"layer": name, **region_scores(x, lang, meaning)})
    return pd.DataFrame(rows)


def _unit_layers(stats: Mapping[str, UnitStats]) -> tuple[np.ndarray, np.ndarray]:
    """Layer and index within the layer of every column of the concatenated patterns."""
    widths = [m.shape[1] for m in next(iter(stats.values())).means]
    layer = np.repeat(np.arange(len(widths)), widths)
    unit = np.concatenate([np.arange(w) for w in widths])
    return layer, unit


def same_language_contributions(stats: Mapping[str, UnitStats], max_rows: int | None = None
                                ) -> np.ndarray:
    """``[languages, units]``: each unit's contribution to the mean similarity of two
    different rows of the language, ``mean over pairs i != j of x_i[u] * x_j[u]`` with ``x``
    the L2-normalised concatenated patterns. Summed over units it is that mean similarity."""
    x, lang, _ = patterns(stats, None, max_rows)
    for code in stats:
        n = int((lang == code).sum())
        if n < 2:
            raise ValueError(f"language {code!r} has {n} row; contributions need at least two")
    return _contributions(normalise(x), lang, list(stats))


def _excess_z(c: np.ndarray, layer: np.ndarray, spread: str) -> np.ndarray:
    """z-scores of the excess contributions ``c - mean over languages``, the spread taken per
    layer (``spread="layer"``) or over every unit of every layer (``"all"``)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    excess = c - c.mean(0, keepdims=True)
    z = np.zeros_like(excess)
    groups = [layer == l for l in np.unique(layer)] if spread == "layer" else [np.ones_like(layer, bool)]
    for cols in groups:
        sd = excess[:, cols].std()
        if sd > 0:
            z[:, cols] = excess[:, cols] / sd
    return z


SPREADS = ("layer", "all")


def key_units(stats: Mapping[str, UnitStats], z_threshold: float = 2.0,
              max_rows: int | None = None, spread: str = "layer") -> pd.DataFrame:
    """Key linguistic units of every language: ``language, layer, unit, contribution, z``.

    A unit's excess for language L is its contribution to L's same-language similarity minus
    its mean contribution over the languages. ``z`` is that excess divided by the standard
    deviation of all excesses of the unit's layer; the unit is key for L if ``z >
    z_threshold``. Why not the z-score of each unit across languages alone: with N languages
    that z-score can never exceed sqrt(N - 1) (exactly 2 for five languages, so "z > 2"
    would select nothing), and it ignores scale, so a unit that barely fires anywhere could
    stand out. Pooling the spread over the layer keeps the scale and works for any N; but a
    spread per layer gives every layer about the same share of units above the threshold, so
    *where* the key units are is read with ``spread="all"`` (one spread for every layer)."""
    if z_threshold <= 0:
        raise ValueError(f"z_threshold must be positive, got {z_threshold}")
    c = same_language_contributions(stats, max_rows)
    layer, unit = _unit_layers(stats)
    z = _excess_z(c, layer, spread)
    li, ui = np.nonzero(z > z_threshold)
    langs = np.array(list(stats))
    return pd.DataFrame({"language": langs[li], "layer": layer[ui], "unit": unit[ui],
                         "contribution": c[li, ui], "z": z[li, ui]}
                        ).sort_values(["language", "layer", "z"], ascending=[True, True, False],
                                      ignore_index=True)


def _contributions(xn: np.ndarray, lang: np.ndarray, languages: Sequence[str]) -> np.ndarray:
    """``[languages, units]`` contributions from normalised patterns ``xn`` with each row's
    language (see :func:`same_language_contributions`)."""
    out = []
    for code in languages:
        block = xn[lang == code]
        n = len(block)
        total = block.sum(0)
        out.append((total ** 2 - (block ** 2).sum(0)) / (n * (n - 1)))
    return np.stack(out)


def key_location(stats: Mapping[str, UnitStats], z_threshold: float = 2.0,
                 max_rows: int | None = None, draws: int = 5, n_boot: int = 200,
                 seed: int = 0) -> pd.DataFrame:
    """Where key units sit, against a null: per spread ("layer", "all"), the share of key
    units in the first and last layers with a bootstrap interval over parallel rows (rows
    resampled in every language together), and the same share and count under ``draws``
    shufflings of the rows' language labels (a null that keeps every unit's activations and
    only breaks which language a row belongs to). Columns: ``spread, keys, edge_share, low,
    high, null_keys, null_edge_share``."""
    x, lang, meaning = patterns(stats, None, max_rows)
    xn = normalise(x)
    languages = list(stats)
    layer, _ = _unit_layers(stats)
    n_layers = int(layer.max()) + 1
    edge = (layer == 0) | (layer == n_layers - 1)
    rng = np.random.default_rng(seed)
    n_rows = int(meaning.max()) + 1          # patterns(): languages in blocks of n_rows, in order

    def keys(xn_, lang_, spread):
        z = _excess_z(_contributions(xn_, lang_, languages), layer, spread)
        hit = (z > z_threshold).any(0)
        return int(hit.sum()), float(edge[hit].mean()) if hit.any() else float("nan")

    out = []
    for spread in SPREADS:
        n, share = keys(xn, lang, spread)
        boot = []
        for _ in range(n_boot):
            pick = rng.integers(0, n_rows, n_rows)
            idx = (np.arange(len(languages))[:, None] * n_rows + pick[None, :]).ravel()
            boot.append(keys(xn[idx], lang[idx], spread)[1])
        boot = np.asarray(boot)
        boot = boot[np.isfinite(boot)]
        lo, hi = np.quantile(boot, [0.025, 0.975]) if boot.size else (np.nan, np.nan)
        null = [keys(xn, rng.permutation(lang), spread) for _ in range(draws)]
        out.append({"spread": spread, "keys": n, "edge_share": share, "low": float(lo), "high": float(hi),
                    "null_keys": float(np.mean([k for k, _ in null])),
                    "null_edge_share": float(np.nanmean([e for _, e in null]))
                    if any(np.isfinite(e) for _, e in null) else float("nan"),
                    "even_share": float(edge.mean())})
    return pd.DataFrame(out)


def unit_counts(units: pd.DataFrame, languages: Sequence[str], n_layers: int) -> pd.DataFrame:
    """``layer, language, units``: how many of ``units`` (a key-unit or LAPE table) each layer
    has per language, zeros included."""
    full = pd.MultiIndex.from_product([range(n_layers), list(languages)], names=["layer", "language"])
    counts = units.groupby(["layer", "language"]).size().reindex(full, fill_value=0)
    return counts.rename("units").reset_index()


def firing_probabilities(stats: Mapping[str, UnitStats]) -> np.ndarray:
    """``[languages, units]``: share of each language's tokens on which the unit fired
    (activation > 0), all layers concatenated."""
    return np.stack([np.concatenate([c.double().numpy() for c in s.counts]) / max(s.n_tokens, 1)
                     for s in stats.values()])


def lape_units(prob: np.ndarray, languages: Sequence[str], share: float = 0.01,
               quantile: float = 0.95) -> pd.DataFrame:
    """LAPE language-specific units from firing probabilities ``prob`` [languages, units].

    As in Tang et al. (2024): units whose highest probability is below the ``quantile`` of
    all probabilities are left out (they barely fire anywhere); of the rest, the ``share`` of
    all units with the lowest entropy of their probabilities normalised over languages are
    language-specific, each assigned to every language where its probability reaches that
    quantile (and is above zero). Returns ``unit, language, entropy``, one row per (unit, language)."""
    prob = np.asarray(prob, dtype=float)
    if prob.ndim != 2 or prob.shape[0] != len(languages):
        raise ValueError(f"prob must be [languages, units] with {len(languages)} languages, "
                         f"got shape {prob.shape}")
    if not 0 < share <= 1 or not 0 <= quantile < 1:
        raise ValueError(f"share must be in (0, 1] and quantile in [0, 1), got {share}, {quantile}")
    threshold = np.quantile(prob, quantile)
    total = prob.sum(0)
    q = np.divide(prob, total, out=np.zeros_like(prob), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(q > 0, q * np.log(q), 0.0).sum(0)
    candidates = np.nonzero((prob.max(0) >= threshold) & (prob.max(0) > 0))[0]
    n_pick = int(round(share * prob.shape[1]))
    picked = candidates[np.argsort(entropy[candidates], kind="stable")[:n_pick]]
    rows = [{"unit": int(u), "language": languages[i], "entropy": float(entropy[u])}
            for u in picked for i in np.nonzero((prob[:, u] >= threshold) & (prob[:, u] > 0))[0]]
    return pd.DataFrame(rows, columns=["unit", "language", "entropy"])


def lape_by_layer(stats: Mapping[str, UnitStats], share: float = 0.01, quantile: float = 0.95
                  ) -> pd.DataFrame:
    """:func:`lape_units` over all layers of ``stats``, with ``layer, unit`` within the layer."""
    found = lape_units(firing_probabilities(stats), list(stats), share, quantile)
    layer, unit = _unit_layers(stats)
    idx = found["unit"].to_numpy(dtype=int)
    return pd.DataFrame({"language": found["language"], "layer": layer[idx], "unit": unit[idx],
                         "entropy": found["entropy"]})


def set_overlap(a: pd.DataFrame, b: pd.DataFrame, languages: Sequence[str]) -> pd.DataFrame:
    """Per language, how many (layer, unit) pairs each table has, how many both have, and
    their Jaccard index."""
    rows = []
    for lang in languages:
        sa = set(map(tuple, a[a["language"] == lang][["layer", "unit"]].to_numpy().tolist()))
        sb = set(map(tuple, b[b["language"] == lang][["layer", "unit"]].to_numpy().tolist()))
        union = len(sa | sb)
        rows.append({"language": lang, "first": len(sa), "second": len(sb), "both": len(sa & sb),
                     "jaccard": len(sa & sb) / union if union else float("nan")})
    return pd.DataFrame(rows)
