"""Translation retrieval: does a verse's vector find its own translation among the others?

A direct measure of a shared space that needs no dictionary: each verse of the parallel set
is pooled into one vector per language (the mean over its tokens of any unit source's
activations: residual stream, MLP neurons, CLT features, SAE latents; ``UnitStats.means``),
the vectors are **centred per language** (the language's mean vector subtracted, so that
what every sentence of a language shares, the language itself, cannot make a match) and
scaled to unit length. For every ordered pair of languages (source, target) and every
source verse, the target verses are ranked by cosine similarity; the verse *retrieves* its
translation at k when fewer than k target verses are at least as similar as the
translation (ties count against it, so a vector of zeros retrieves nothing). With N verses
chance is k / N.

The unit that varies is the verse: each verse's hit rate is averaged over all ordered pairs,
and the interval is over verses (``claims.mean_interval``: bootstrap, t under 30 verses).
Written here rather than taken from a library: the pieces (centring, cosine ranks) are a
few lines of NumPy, and the pairing and tie rules must be the book's own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .activations import UnitStats
from .regions import normalise


def translation_ranks(vectors: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """``source, target, verse, rank`` for every ordered language pair and verse: how many
    target verses other than the translation are at least as similar to the source verse
    (0: the translation is the nearest, ties broken against it). ``vectors``: language ->
    [N, d] pooled vectors, row i of every language the same verse."""
    langs = list(vectors)
    if len(langs) < 2:
        raise ValueError(f"translation retrieval needs at least two languages, got {langs}")
    sizes = {lang: np.asarray(v).shape for lang, v in vectors.items()}
    if len({s[0] for s in sizes.values()}) != 1 or any(len(s) != 2 for s in sizes.values()):
        raise ValueError(f"every language needs the same number of verses as [N, d] arrays, got {sizes}")
    n = next(iter(sizes.values()))[0]
    if n < 2:
        raise ValueError(f"translation retrieval needs at least two verses, got {n}")
    unit = {}
    for lang, v in vectors.items():
        v = np.asarray(v, dtype=np.float64)
        unit[lang] = normalise(v - v.mean(0, keepdims=True))
    parts = []
    for a in langs:
        for b in langs:
            if a == b:
                continue
            sim = unit[a] @ unit[b].T
            true = np.diag(sim)[:, None]
            rank = (sim >= true).sum(1) - 1                 # the translation itself is not counted
            parts.append(pd.DataFrame({"source": a, "target": b, "verse": np.arange(n), "rank": rank}))
    return pd.concat(parts, ignore_index=True)


def retrieval_summary(ranks: pd.DataFrame, ks: Sequence[int] = (1, 5), n_boot: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """``k, share, low, high, chance, verses`` from :func:`translation_ranks`: the share of
    (verse, language pair) cases that retrieve the translation at k, with a 95 % interval
    over verses (each verse's rate averaged over all ordered pairs), and chance k / N."""
    from ..claims import mean_interval

    n = int(ranks["verse"].nunique())
    rows = []
    for k in ks:
        per_verse = (ranks["rank"] < k).groupby(ranks["verse"]).mean()
        share, lo, hi = mean_interval(per_verse.to_numpy(), n_boot, seed)
        rows.append({"k": int(k), "share": share, "low": lo, "high": hi, "chance": min(1.0, k / n), "verses": n})
    return pd.DataFrame(rows)


def pair_table(ranks: pd.DataFrame, k: int = 1) -> pd.DataFrame:
    """Share retrieved at ``k`` per (source, target) language pair, as a source x target table."""
    hit = ranks.assign(hit=ranks["rank"] < k)
    return hit.pivot_table(index="source", columns="target", values="hit", aggfunc="mean", sort=False)


def retrieval_by_layer(stats: Mapping[str, UnitStats], max_rows: int | None = None,
                       ks: Sequence[int] = (1, 5), n_boot: int = 1000, seed: int = 0,
                       languages: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`retrieval_summary` at every layer of ``stats`` (language -> UnitStats of one
    unit source on the parallel set), over the first ``max_rows`` verses and ``languages``
    (default all): columns ``layer, k, share, low, high, chance, verses``."""
    langs = list(languages or stats)
    missing = [l for l in langs if l not in stats]
    if missing:
        raise ValueError(f"no statistics for languages {missing}; have {list(stats)}")
    n_layers = len(stats[langs[0]].means)
    out = []
    for layer in range(n_layers):
        vectors = {l: stats[l].means[layer][:max_rows].double().numpy() for l in langs}
        out.append(retrieval_summary(translation_ranks(vectors), ks, n_boot, seed).assign(layer=layer))
    return pd.concat(out, ignore_index=True)[["layer", "k", "share", "low", "high", "chance", "verses"]]


def over_training_sentence(model: str, table: pd.DataFrame, k: int = 1) -> str:
    """Chapter 02's sentence for one model from its retrieval over training (columns
    ``step, layer, k, share, low, high, chance``): the middle layer's rate at the last step
    with its interval and chance, the first step's rate, and where it peaked; "still rising"
    only when the last step is the highest and above the step before it."""
    t = table[table["k"] == k]
    layers = sorted(t["layer"].unique())
    mid = layers[len(layers) // 2]
    r = t[t["layer"] == mid].sort_values("step")
    first, last, best = r.iloc[0], r.iloc[-1], r.loc[r["share"].idxmax()]
    text = (f"{model}: the middle layer ({mid}) finds the translation of {last['share']:.1%} of verses at the last "
            f"step (95 % interval {last['low']:.1%}-{last['high']:.1%}; chance {last['chance']:.2%}, "
            f"{last['share'] / last['chance']:.1f}× chance) against {first['share']:.1%} at step {int(first['step'])}")
    if best["step"] != last["step"]:
        return text + f"; it peaked at step {int(best['step'])} ({best['share']:.1%})."
    if len(r) > 1 and last["share"] > r.iloc[-2]["share"]:
        return text + "; it is highest at the last step: still rising when training stopped."
    return text + "."


def retrieval_verdict(table: pd.DataFrame, claim: str, model: str, layer: int, chapter: str = "04") -> dict:
    """The verdict row of top-1 retrieval at ``layer`` (a :func:`retrieval_by_layer` table)
    against chance."""
    from ..claims import verdict

    r = table[(table["k"] == 1) & (table["layer"] == layer)].iloc[0]
    return verdict(claim, f"translation retrieval (top 1) on CLT features, layer {int(r['layer'])}",
                   r["share"], r["low"], r["high"], null=r["chance"], control=f"chance, 1 / {int(r['verses'])} verses",
                   n_units=int(r["verses"]), units="verses", chapter=chapter, model=model)
