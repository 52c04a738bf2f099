"""Cross-language overlap of firing sets (claim 1 of the multilingual-CLT study).

For each parallel row, language and layer, the set of units that fire anywhere in the row
(``UnitStats.fired``). Two languages' sets of the same row are compared by Jaccard
|A ∩ B| / |A ∪ B|; a layer's overlap is the mean over rows and language pairs, with a
bootstrap confidence interval over rows.

Dense units would inflate every overlap: a unit that fires on most tokens of every
language is in every set. The rule (stated in the book): a unit is *dense* when it fires
on more than ``max_dense_fraction`` of the tokens in every language; dense units are left
out of the sets and their number is reported.

Control: the same statistic between *different* rows (row i of language A against row j of
language B, j a row whose length in B is next to row i's), so the reader sees how much of
the overlap comes from meaning and how much from frequency alone. The control is drawn
several times (``control_draws``: the 1st, 2nd, … length neighbour) and averaged.

Claim A1 is decided on the per-verse *gap* (parallel minus control, signed), never on the raw
curve: L0 falls with depth, and Jaccard of smaller sets gets a profile of its own from set
sizes alone. :func:`row_gaps` gives the gap of every verse at every layer, and
:func:`gap_verdicts` turns it into verdict rows (shared beyond the control; the inverted U as
middle minus the larger of first and last), with bootstrap intervals over verses.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .activations import UnitStats


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Jaccard of two [rows, units] bool tensors; NaN where both sets are empty."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, float("nan")))


def dense_units(stats: Mapping[str, UnitStats], layer: int, max_dense_fraction: float) -> Tensor:
    """[units] bool: fires on more than ``max_dense_fraction`` of the tokens in every language."""
    if not 0 < max_dense_fraction <= 1:
        raise ValueError(f"max_dense_fraction must be in (0, 1], got {max_dense_fraction}")
    dense = None
    for s in stats.values():
        freq = s.counts[layer].float() / max(s.n_tokens, 1)
        d = freq > max_dense_fraction
        dense = d if dense is None else dense & d
    return dense


def control_partner(lengths: Tensor, draw: int = 0) -> Tensor:
    """For each row, a different row of nearly the same length: its ``draw + 1``-th
    neighbour when rows are sorted by length (cyclic), so the control pairs differ in
    meaning, not in size, and each draw pairs a row with another partner."""
    n = lengths.numel()
    if n < 2:
        raise ValueError("the control needs at least two rows")
    shift = draw % (n - 1) + 1
    order = torch.argsort(lengths, stable=True)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-shift)
    return partner


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its percentile bootstrap interval."""
    from ..claims import bootstrap

    v = np.asarray(values, dtype=float)
    return bootstrap(v[np.isfinite(v)], np.mean, n_boot, seed, level)


def _parallel_and_control(A: Tensor, B: Tensor, lengths: Tensor, draws: int) -> tuple[Tensor, Tensor]:
    """Row-wise Jaccard of translations, and of each row with ``draws`` length-matched other
    rows of ``B`` (averaged)."""
    control = torch.stack([jaccard(A, B[control_partner(lengths, d)]) for d in range(draws)]).nanmean(0)
    return jaccard(A, B), control


def overlap_by_layer(stats: Mapping[str, UnitStats], max_dense_fraction: float = 0.5,
                     n_boot: int = 1000, seed: int = 0, control_draws: int = 5
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, pairs)``.

    ``pairs``: one row per layer, language pair and kind (parallel, control) with the mean
    Jaccard over rows. ``summary``: per layer and kind, the mean over pairs of each row's
    Jaccard, with a bootstrap interval over rows, and the number of dense units removed. The
    control of a row is its mean over ``control_draws`` length-matched partners.
    """
    langs = list(stats)
    if len(langs) < 2:
        raise ValueError(f"overlap needs at least two languages, got {langs}")
    n_rows = {s.fired[0].shape[0] for s in stats.values()}
    if len(n_rows) != 1:
        raise ValueError(f"the languages have different numbers of parallel rows: {n_rows}")
    n_layers = len(next(iter(stats.values())).fired)
    summary, pairs = [], []
    for layer in range(n_layers):
        dense = dense_units(stats, layer, max_dense_fraction)
        keep = ~dense
        per_kind = {"parallel": [], "control": []}
        for a, b in combinations(langs, 2):
            A = stats[a].fired[layer][:, keep]
            B = stats[b].fired[layer][:, keep]
            parallel, control = _parallel_and_control(A, B, stats[b].lengths, control_draws)
            for kind, values in (("parallel", parallel), ("control", control)):
                per_kind[kind].append(values)
                pairs.append({"layer": layer, "pair": f"{a}-{b}", "kind": kind,
                              "jaccard": float(np.nanmean(values.numpy()))})
        for kind, rows in per_kind.items():
            per_row = np.nanmean(torch.stack(rows).numpy(), axis=0)   # mean over pairs, per row
            mean, lo, hi = bootstrap_mean(per_row, n_boot, seed=seed)
            summary.append({"layer": layer, "kind": kind, "jaccard": mean, "low": lo, "high": hi,
                            "rows": int(np.isfinite(per_row).sum()), "dense_removed": int(dense.sum())})
    return pd.DataFrame(summary), pd.DataFrame(pairs)


def pooled_cosine_by_layer(stats: Mapping[str, UnitStats], n_boot: int = 1000,
                           seed: int = 0) -> pd.DataFrame:
    """The same comparison without sparse units: cosine similarity of the mean-pooled
    activations (``UnitStats.means``, e.g. of the residual stream) of parallel rows, against
    the control pairs; per layer, mean over pairs with a bootstrap interval over rows."""
    langs = list(stats)
    n_layers = len(next(iter(stats.values())).means)
    out = []
    for layer in range(n_layers):
        per_kind = {"parallel": [], "control": []}
        for a, b in combinations(langs, 2):
            A = stats[a].means[layer]
            B = stats[b].means[layer]
            per_kind["parallel"].append(torch.nn.functional.cosine_similarity(A, B, dim=1))
            Bc = B[control_partner(stats[b].lengths)]
            per_kind["control"].append(torch.nn.functional.cosine_similarity(A, Bc, dim=1))
        for kind, rows in per_kind.items():
            per_row = torch.stack(rows).mean(0).numpy()
            mean, lo, hi = bootstrap_mean(per_row, n_boot, seed=seed)
            out.append({"layer": layer, "kind": kind, "cosine": mean, "low": lo, "high": hi})
    return pd.DataFrame(out)


def row_gaps(stats: Mapping[str, UnitStats], max_dense_fraction: float = 0.5,
             control_draws: int = 5) -> np.ndarray:
    """``[rows, layers]``: each verse's Jaccard with its translations minus its Jaccard with
    length-matched other verses (mean over language pairs and ``control_draws`` partners),
    signed: a control above the parallel overlap gives a negative gap."""
    langs = list(stats)
    if len(langs) < 2:
        raise ValueError(f"a gap needs at least two languages, got {langs}")
    n_layers = len(next(iter(stats.values())).fired)
    out = []
    for layer in range(n_layers):
        keep = ~dense_units(stats, layer, max_dense_fraction)
        gaps = []
        for a, b in combinations(langs, 2):
            parallel, control = _parallel_and_control(stats[a].fired[layer][:, keep],
                                                      stats[b].fired[layer][:, keep],
                                                      stats[b].lengths, control_draws)
            gaps.append(parallel - control)
        out.append(torch.stack(gaps).nanmean(0).numpy())
    return np.stack(out, axis=1)


def middle_minus_edges(gaps: np.ndarray) -> float:
    """Mean gap of the middle layers minus the larger of the first and last layers' mean gap
    (positive: an inverted U of the gap). Needs at least three layers."""
    m = np.nanmean(gaps, axis=0)
    return float(m[1:-1].mean() - max(m[0], m[-1]))


def gap_verdicts(gaps: np.ndarray, claim: str, model: str, n_boot: int = 1000, seed: int = 0,
                 counted: bool = True, note: str = "") -> list[dict]:
    """Verdict rows from :func:`row_gaps`: (1) the gap averaged over layers is above 0, (2) the
    gap's middle layers lie above the larger of its first and last layers (only with three or
    more layers). Bootstrap intervals resample verses, all layers of a verse together."""
    from ..claims import bootstrap, verdict

    gaps = gaps[np.isfinite(gaps).all(1)]
    control = "length-matched different verses (the gap is parallel minus this control)"
    common = dict(model=model, n_units=len(gaps), units="verses", chapter="04",
                  counted=counted, note=note)
    est, lo, hi = bootstrap(gaps, lambda g: float(g.mean()), n_boot, seed)
    rows = [verdict(claim, "Jaccard of translations minus different verses, mean over layers",
                    est, lo, hi, control=control, **common)]
    if gaps.shape[1] >= 3:
        est, lo, hi = bootstrap(gaps, middle_minus_edges, n_boot, seed)
        rows.append(verdict(claim, "gap of the middle layers minus the larger of first and last (inverted U)",
                            est, lo, hi, control=control, **common))
    return rows


def gap_difference(gaps_a: np.ndarray, gaps_b: np.ndarray, n_boot: int = 1000, seed: int = 0
                   ) -> tuple[float, float, float]:
    """Inverted-U statistic of model a minus model b on the same verses (paired bootstrap)."""
    from ..claims import bootstrap

    both = np.concatenate([gaps_a, gaps_b], axis=1)
    both = both[np.isfinite(both).all(1)]
    k = gaps_a.shape[1]
    return bootstrap(both, lambda g: middle_minus_edges(g[:, :k]) - middle_minus_edges(g[:, k:]),
                     n_boot, seed)


def shared_space_verdicts(stats: Mapping[str, Mapping[str, UnitStats]], trained: Mapping[str, list],
                          no_english: list, n_layers: int, dense_fraction: float, n_boot: int = 1000,
                          seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Chapter 04's gap verdicts: for every model (``stats``: model -> language -> CLT unit
    statistics, trained languages only) the A1 rows (A2 for the models in ``no_english``),
    and for each no-English model the shown comparison of its inverted-U statistic with the
    first English model's on the same languages. Returns ``(verdict rows, results rows)``."""
    from ..claims import verdict

    names = list(stats)
    gaps = {name: row_gaps(stats[name], dense_fraction) for name in names}
    verdicts, rows = [], []
    for name in names:
        claim = "A2" if name in no_english else "A1"
        verdicts += gap_verdicts(gaps[name], claim, name, n_boot=n_boot, seed=seed)
        rows += [{"model": name, "metric": f"overlap minus control, layer {l}", "value": float(v)}
                 for l, v in enumerate(np.nanmean(gaps[name], axis=0))]
    ref = next((n for n in names if n not in no_english), None)
    for name in no_english:
        if ref is None or n_layers < 3:
            continue
        same = row_gaps({lang: stats[ref][lang] for lang in trained[name]}, dense_fraction)
        est, lo, hi = gap_difference(gaps[name], same, n_boot, seed)
        verdicts.append(verdict("A2", f"inverted-U statistic of the gap, {name} minus {ref} on {name}'s languages",
                                est, lo, hi, control="the same statistic in " + ref, n_units=len(same), units="verses",
                                chapter="04", model=name, counted=False,
                                note="a difference, shown beside the verdict: A2 is decided on the model's own shape"))
    return verdicts, rows
