"""Chapter 10: language regions and semantic alignment of MLP neurons over training.

For every kept checkpoint of a model, one streamed pass of its MLP neurons over the parallel
set (``features.activations.collect_unit_stats``) gives each row's activation pattern per
layer; ``features.regions`` turns those into LRDS / SADS and key linguistic neurons. At the
final checkpoint the chapter adds LAPE neurons, zeroing ablations, and the same statistics
on the CLT's features (from chapter 04's unit statistics, so both go through one code path).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .features import regions
from .features.activations import MLPNeurons, UnitStats, collect_unit_stats

# ------------------------------------------------------------------------ ablations -----


def zeroing_hooks(units: Mapping[int, Sequence[int]]) -> list:
    """TransformerLens forward hooks that set MLP neurons ``{layer: [unit, ...]}`` to zero
    after the nonlinearity (``blocks.l.mlp.hook_post``), at every position."""
    hooks = []
    for layer, idx in units.items():
        idx = torch.as_tensor(sorted(set(int(i) for i in idx)), dtype=torch.long)
        if len(idx) == 0:
            continue

        def zero(act, hook, idx=idx):
            act[..., idx.to(act.device)] = 0.0
            return act
        hooks.append((f"blocks.{int(layer)}.mlp.hook_post", zero))
    return hooks


def language_losses(model, eval_sets: Mapping[str, torch.Tensor], units=None,
                    batch_size: int = 32) -> dict[str, float]:
    """Mean next-token loss per language with the neurons ``units`` ({layer: [unit]})
    zeroed (none: the model as it is)."""
    from .models.train import eval_loss_per_language

    with model.hooks(fwd_hooks=zeroing_hooks(units or {})):
        return eval_loss_per_language(model, eval_sets, batch_size)


def random_units(counts: Mapping[int, int], widths: Sequence[int], rng: np.random.Generator,
                 exclude: Mapping[int, Sequence[int]] | None = None) -> dict[int, list[int]]:
    """As many random neurons per layer as ``counts`` asks for, drawn without replacement
    from the layer's ``widths[layer]`` neurons outside ``exclude``."""
    out = {}
    for layer, n in counts.items():
        pool = np.setdiff1d(np.arange(widths[layer]), np.asarray((exclude or {}).get(layer, []), dtype=int))
        if n > len(pool):
            raise ValueError(f"layer {layer}: {n} random neurons asked for, only {len(pool)} to draw from")
        out[int(layer)] = sorted(rng.choice(pool, size=int(n), replace=False).tolist())
    return out


def ablation_table(model, eval_sets: Mapping[str, torch.Tensor], key: pd.DataFrame,
                   languages: Sequence[str], draws: int = 3, seed: int = 0, batch_size: int = 32,
                   progress: bool = True) -> pd.DataFrame:
    """Zero each language's key neurons (``key``: ``language, layer, unit``) and, as
    controls, ``draws`` sets of random neurons with the same count per layer; every
    language's loss each time. Columns: ``kind`` ("key" / "random"), ``draw``, ``ablated``
    (whose neurons), ``language`` (evaluated), ``neurons``, ``loss``, ``base_loss``,
    ``relative_change`` = loss / base_loss - 1."""
    from .viz.progress import progress_bar

    widths = [model.cfg.d_mlp] * model.cfg.n_layers
    base = language_losses(model, eval_sets, None, batch_size)
    rng = np.random.default_rng(seed)
    jobs = []
    for lang in languages:
        mine = key[key["language"] == lang]
        if mine.empty:
            continue
        units = {int(l): g["unit"].astype(int).tolist() for l, g in mine.groupby("layer")}
        counts = {l: len(u) for l, u in units.items()}
        jobs.append(("key", 0, lang, units))
        jobs += [("random", d, lang, random_units(counts, widths, rng, units)) for d in range(draws)]
    rows = []
    for kind, draw, lang, units in progress_bar(iterable=jobs, desc="ablations", disable=not progress):
        losses = language_losses(model, eval_sets, units, batch_size)
        n = sum(len(u) for u in units.values())
        rows += [{"kind": kind, "draw": draw, "ablated": lang, "language": other, "neurons": n,
                  "loss": losses[other], "base_loss": base[other],
                  "relative_change": losses[other] / base[other] - 1.0} for other in eval_sets]
    return pd.DataFrame(rows, columns=["kind", "draw", "ablated", "language", "neurons", "loss",
                                       "base_loss", "relative_change"])


def ablation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (ablated, language): the key ablation's relative change, the random controls'
    mean and standard deviation, and the key minus the control mean."""
    key = table[table["kind"] == "key"].set_index(["ablated", "language"])["relative_change"]
    rnd = table[table["kind"] == "random"].groupby(["ablated", "language"])["relative_change"]
    out = pd.DataFrame({"key": key, "random_mean": rnd.mean(), "random_sd": rnd.std(ddof=1)})
    out["excess"] = out["key"] - out["random_mean"]
    return out.reset_index()


# --------------------------------------------------------------------- the chapter -----

def stats_by_language(model, rows: Mapping[str, torch.Tensor], batch_size: int = 16) -> dict[str, UnitStats]:
    """MLP-neuron statistics of ``model`` on every language's token rows (one streamed pass each)."""
    source = MLPNeurons(model)
    return {lang: collect_unit_stats(source, r, batch_size) for lang, r in rows.items()}


def _key_counts(stats, cfg, n_layers) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The key units of ``stats`` (one z spread for all layers, so that where they sit can be
    read) and their counts per layer and language under both spreads (``spread`` column)."""
    out = {}
    for spread in regions.SPREADS:
        key = regions.key_units(stats, cfg["key_z"], cfg["max_rows"], spread=spread)
        out[spread] = (key, regions.unit_counts(key, list(stats), n_layers).assign(spread=spread))
    return out["all"][0], pd.concat([c for _, c in out.values()], ignore_index=True)


def display_similarity(stats: Mapping[str, UnitStats], rows: int) -> np.ndarray:
    """Cosine similarity of the first ``rows`` rows of every language (languages in blocks),
    all layers concatenated: what the chapter's similarity figure shows."""
    x, _, _ = regions.patterns(stats, None, rows)
    return regions.cosine_matrix(x).astype(np.float32)


def lingua_franca(load_model: Callable[[int | None], object], steps: Sequence[int],
                  rows: Mapping[str, torch.Tensor], eval_sets: Mapping[str, torch.Tensor],
                  cfg: Mapping, clt_stats: Mapping[str, UnitStats] | None = None,
                  progress: bool = True) -> dict:
    """Everything chapter 10 measures on one model.

    ``load_model(step)`` returns the checkpoint at ``step`` (``steps`` ascending, the last
    the final one); ``rows`` are the parallel rows per language (BOS + tokens, padded);
    ``eval_sets`` the language-modelling test rows per language; ``clt_stats`` the CLT
    features' unit statistics on the same parallel rows (chapter 04), optional.

    Returns ``{"tables": {name: DataFrame}, "similarity": {"mlp"|"clt": matrix}}``: scores
    (unit, step, layer, LRDS, SADS, ...), row_scores (each parallel row's share of them, per
    unit, step and layer, for intervals), key_counts (unit, step, layer, language, units),
    key_units and lape_units (final MLP), method_overlap, ablation."""
    from .viz.progress import progress_bar

    if not steps:
        raise ValueError("no checkpoints to measure")
    scores, counts, per_row = [], [], []
    final_stats = model = None
    for step in progress_bar(iterable=list(steps), desc="checkpoints", disable=not progress):
        model = load_model(step)
        stats = stats_by_language(model, rows, cfg["batch_size"])
        scores.append(regions.scores_by_layer(stats, cfg["max_rows"]).assign(unit="mlp", step=step))
        per_row.append(regions.row_scores_by_layer(stats, cfg["max_rows"]).assign(unit="mlp", step=step))
        key, c = _key_counts(stats, cfg, model.cfg.n_layers)
        counts.append(c.assign(unit="mlp", step=step, width=model.cfg.d_mlp))
        final_stats = stats
    tables = {}                            # key: the final checkpoint's key neurons
    lape = regions.lape_by_layer(final_stats, cfg["lape_share"], cfg["lape_quantile"])
    tables["key_units"] = key
    tables["key_location"] = regions.key_location(final_stats, cfg["key_z"], cfg["max_rows"],
                                                  cfg["null_draws"], cfg["bootstrap"], cfg["seed"])
    tables["lape_units"] = lape
    tables["method_overlap"] = regions.set_overlap(key, lape, list(rows)).rename(
        columns={"first": "key", "second": "lape"})
    tables["ablation"] = ablation_table(model, eval_sets, key, list(rows), cfg["ablation_draws"],
                                        cfg["seed"], progress=progress)
    similarity = {"mlp": display_similarity(final_stats, cfg["display_rows"])}
    if clt_stats is not None:
        clt_scores = regions.scores_by_layer(clt_stats, cfg["max_rows"])
        scores.append(clt_scores.assign(unit="clt", step=steps[-1]))
        per_row.append(regions.row_scores_by_layer(clt_stats, cfg["max_rows"]).assign(unit="clt", step=steps[-1]))
        n_layers = len(next(iter(clt_stats.values())).means)
        width = next(iter(clt_stats.values())).means[0].shape[1]
        _, c = _key_counts(clt_stats, cfg, n_layers)
        counts.append(c.assign(unit="clt", step=steps[-1], width=width))
        similarity["clt"] = display_similarity(clt_stats, cfg["display_rows"])
    tables["scores"] = pd.concat(scores, ignore_index=True)
    tables["key_counts"] = pd.concat(counts, ignore_index=True)
    tables["row_scores"] = pd.concat(per_row, ignore_index=True)
    return {"tables": tables, "similarity": similarity}


# ------------------------------------------------------------------------ verdicts -----

def _rows(table: pd.DataFrame, unit: str, step: int) -> pd.DataFrame:
    """The per-row scores of all layers together for one unit kind and checkpoint."""
    t = table[(table["unit"] == unit) & (table["step"] == step)]
    if "layer" in t:
        t = t[t["layer"].astype(str) == "all"]
    return t.sort_values("meaning")


def lape_agreement(overlap: pd.DataFrame, n_units: int) -> tuple[int, int, float]:
    """How far the key neurons and the LAPE neurons agree, over the languages where both
    methods find some (``overlap``: ``language, key, lape, both``): key neurons that LAPE
    also gives the same language, all key neurons, and the share expected by chance (LAPE's
    picks of each language placed at random among the ``n_units`` neurons)."""
    found = overlap[(overlap["key"] > 0) & (overlap["lape"] > 0)]
    n = int(found["key"].sum())
    if n == 0:
        return 0, 0, float("nan")
    chance = float((found["key"] * found["lape"] / n_units).sum() / n)
    return int(found["both"].sum()), n, chance


def verdicts(out: Mapping[str, Mapping], counted_steps: Mapping[str, Sequence[int]],
             n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Verdict rows of claims C1-C4 from the loaded neurons stages ``out`` (model name ->
    tables; the first name is the reference, the last the largest) and, per model, the
    checkpoints at which training had moved the loss (``models.load.trained_steps``)."""
    from .claims import mean_interval, paired_difference, proportion_difference, verdict, wilson

    rows_unit = "parallel rows"
    res = []
    names = list(out)
    moved_of = {name: [s for s in out[name]["steps"] if s in set(counted_steps.get(name, out[name]["steps"]))]
                for name in names}
    for name in names:
        rs, steps = out[name]["row_scores"], out[name]["steps"]
        final = _rows(rs, "mlp", steps[-1])
        for score, words in (("lrds", "LRDS (same language minus different languages)"),
                             ("sads", "SADS (translation minus different sentence)")):
            est, lo, hi = mean_interval(final[score], n_boot, seed)
            res.append(verdict("C1", f"{words}, final checkpoint, all layers", est, lo, hi,
                               control="0: no region / no alignment", n_units=len(final),
                               units=rows_unit, chapter="10", model=name))
        moved = moved_of[name]
        if len(moved) >= 2:
            a, b = _rows(rs, "mlp", moved[0]), _rows(rs, "mlp", moved[-1])
            est, lo, hi = paired_difference(b["sads"].to_numpy(), a["sads"].to_numpy(), n_boot, seed)
            res.append(verdict("C1", f"SADS growth, step {moved[0]} to {moved[-1]}", est, lo, hi,
                               control="the same rows at the first checkpoint after the loss moved",
                               n_units=len(a), units=rows_unit, chapter="10", model=name))
    if len(names) > 1:
        small, big = names[0], names[-1]
        a = _rows(out[small]["row_scores"], "mlp", out[small]["steps"][-1])
        b = _rows(out[big]["row_scores"], "mlp", out[big]["steps"][-1])
        est, lo, hi = paired_difference(b["sads"].to_numpy(), a["sads"].to_numpy(), n_boot, seed)
        res.append(verdict("C2", f"final SADS of {big} minus {small}", est, lo, hi,
                           control=f"{small} on the same rows", n_units=len(a), units=rows_unit,
                           chapter="10", model=big))
    for name in names:
        loc = out[name]["key_location"].set_index("spread").loc["all"]
        res.append(verdict("C3", "share of key neurons (one z spread for all layers) in the first and last layers",
                           loc["edge_share"], loc["low"], loc["high"], null=loc["null_edge_share"],
                           control=f"the same share with rows' language labels shuffled "
                                   f"({loc['null_keys']:.0f} key neurons there against {loc['keys']:.0f})",
                           n_units=int(out[name]["rows"]), units=rows_unit, chapter="10", model=name,
                           counted=bool(loc["keys"] > 0 and loc["even_share"] < 1),
                           note="" if loc["keys"] > 0 and loc["even_share"] < 1 else
                           "no key neuron" if loc["keys"] == 0 else "every layer is a first or last one"))
        kc = out[name]["key_counts"]
        kc = kc[(kc["unit"] == "mlp") & (kc["spread"] == "all")]
        moved = moved_of[name]
        if len(moved) >= 2:
            def first_layer(step):
                k = kc[kc["step"] == step]
                return int(k.loc[k["layer"] == 0, "units"].sum()), int(k["units"].sum())
            (k1, n1), (k0, n0) = first_layer(moved[-1]), first_layer(moved[0])
            if n1 and n0:
                d = proportion_difference(k1, n1, k0, n0)
                res.append(verdict("C3", f"first layer's share of key neurons, step {moved[-1]} minus step {moved[0]}",
                                   *d, control=f"the share at step {moved[0]}, the first checkpoint after the loss moved",
                                   n_units=n0 + n1, units="key neurons", chapter="10", model=name))
        width = kc[kc["step"] == kc["step"].max()].groupby("layer")["width"].first()
        both, n, chance = lape_agreement(out[name]["method_overlap"], int(width.sum()))
        if n:
            found = out[name]["method_overlap"]
            found = found[(found["key"] > 0) & (found["lape"] > 0)]
            res.append(verdict("C4", "share of key neurons that LAPE gives the same language",
                               *wilson(both, n), null=chance,
                               control="the share if LAPE's neurons of each language were placed at random",
                               n_units=n, units="key neurons", chapter="10", model=name, counted=False,
                               note="the two methods compared, shown beside the claim; languages where both find "
                                    f"neurons: {', '.join(found['language'])}"))
        s = ablation_summary(out[name]["ablation"])
        own = s[s["ablated"] == s["language"]].set_index("language")
        if own.empty:
            continue
        est, lo, hi = mean_interval(own["excess"], n_boot, seed)
        res.append(verdict("C4", "own-language loss change, key neurons minus random neurons of the same layers",
                           est, lo, hi, control="zeroing as many random neurons (mean of the draws)",
                           n_units=len(own), units="languages", chapter="10", model=name))
        other = s[s["ablated"] != s["language"]].groupby("ablated")["key"].mean()
        diff = own["key"] - other.reindex(own.index)
        est, lo, hi = mean_interval(diff, n_boot, seed)
        res.append(verdict("C4", "own-language loss change minus the other languages' (key neurons zeroed)",
                           est, lo, hi, control="the other languages' change under the same ablation",
                           n_units=int(diff.notna().sum()), units="languages", chapter="10", model=name))
    return res
