"""Figures of the chapters (matplotlib, rendered as images, so the book reads without a
kernel). Every figure follows ``viz.style``: one text column wide, fixed language colours
and order, labelled colour bars, axes zoomed when the values sit in a narrow band."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..models.load import val_loss_columns
from .style import (bar_labels, language_colour, language_label, language_order, panels,
                    zoom_to_data)


# ---- chapter 01 -------------------------------------------------------------------------

def fertility_figure(fertility: pd.DataFrame, order: Sequence[str] | None = None):
    """Three panels, one per row: tokens per word, share of words split into several
    pieces, and tokens for the same verses relative to English."""
    langs = language_order(fertility.index, order or list(fertility.index))
    fertility = fertility.loc[langs]
    fig, axes = panels(3, per_row=1, height=2.0, sharex=True)
    colours = [language_colour(lang) for lang in langs]
    rows = [("tokens_per_unit", "tokens per word (per character for zh, ja)"),
            ("multi_piece_share", "share of words split into ≥ 2 pieces"),
            ("ratio_to_reference", "tokens relative to English, same verses")]
    for ax, (column, title) in zip(axes, rows):
        values = fertility[column].astype(float)
        bars = ax.bar(langs, values.fillna(0), color=colours)
        bar_labels(ax, bars)
        ax.set_title(title, loc="left")
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[2].set_xticks(range(len(langs)), [language_label(lang) for lang in langs])
    return fig


# ---- chapter 02 -------------------------------------------------------------------------

def loss_curves(metrics: Mapping[str, pd.DataFrame], languages):
    """One panel per model (two side by side): validation loss per language against
    training tokens, the training loss in grey; one shared legend, in the free panel slot
    when the number of models is odd, else under the panels."""
    fig, axes = panels(len(metrics), per_row=2, height=2.6, sharey=True)
    for ax, (name, df) in zip(axes, metrics.items()):
        val = val_loss_columns(df, languages)
        evals = df.dropna(subset=list(val.values())) if val else df
        if "train_loss" in df:
            ax.plot(df["tokens"], df["train_loss"], color="k", alpha=0.2, lw=0.8, label="train")
        for lang, col in val.items():
            ax.plot(evals["tokens"], evals[col], marker=".", ms=4, color=language_colour(lang),
                    label=language_label(lang))
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("training tokens")
    axes[0].set_ylabel("validation loss\n(nats per token)")
    handles, labels = axes[0].get_legend_handles_labels()
    spare = [a for a in fig.axes if not a.get_visible()]
    if spare:
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(handles, labels, loc="center", fontsize=10)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    return fig


def gap_figure(final: pd.DataFrame, shares: Mapping[str, float]):
    """The English-dominance gap of each model against its mixture's English share."""
    fig, axes = panels(1, height=2.6)
    ax = axes[0]
    names = [n for n in final.index if n in shares]
    x = [100 * shares[n] for n in names]
    y = final.loc[names, "gap to English"].to_numpy(dtype=float)
    ax.plot(x, y, marker="o", color=language_colour("en"))
    for xi, yi, n in zip(x, y, names):
        ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("English share of the training mixture (%)")
    ax.set_ylabel("gap to English\n(nats per token)")
    ax.axhline(0, color="k", lw=0.6)
    return fig


# ---- chapter 03 -------------------------------------------------------------------------

def clt_layer_figure(layers: pd.DataFrame):
    """FVU, L0 and dead fraction by layer, one line per model (index level 'model');
    one panel per row so that each keeps the text column's width."""
    fig, axes = panels(3, per_row=1, height=1.9, sharex=True)
    for name, df in layers.groupby(level="model", sort=False):
        for ax, col in zip(axes, ("fvu", "l0", "dead_fraction")):
            ax.plot(df["layer"], df[col], marker="o", ms=4, label=name)
    for ax, title in zip(axes, ("FVU (share of the MLP output's variance left unexplained)",
                                "L0 (active features per token)", "dead features (share)")):
        ax.set_title(title, loc="left")
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(title="model", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def ce_recovered_figure(languages: pd.DataFrame, order: Sequence[str] | None = None):
    """CE loss recovered and top-1 agreement of the replacement model, per language
    (grouped bars, one colour per model). Axes zoom to the data when every bar sits near
    the same value, so differences between languages show."""
    df = languages.reset_index(level="model")
    df = df[df["language"] != "all"]
    fig, axes = panels(2, per_row=1, height=2.3, sharex=True)
    for ax, col, title in ((axes[0], "ce_recovered", "CE loss recovered"),
                           (axes[1], "top1_agreement", "top-1 agreement with the model")):
        table = df.pivot(index="language", columns="model", values=col)
        table = table.loc[language_order(table.index, order or list(table.index))]
        models = list(dict.fromkeys(df["model"]))
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            ax.bar(np.arange(len(table)) + (i - (len(models) - 1) / 2) * width, table[m], width,
                   label=m)
        ax.set_title(title, loc="left")
        if not zoom_to_data(ax, table.values):
            ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(table)), [language_label(lang) for lang in table.index])
    axes[0].legend(title="model", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig



# ---- chapter 04 -------------------------------------------------------------------------

def overlap_figure(summaries: Mapping[str, pd.DataFrame], value: str = "jaccard",
                   ylabel: str = "cross-language overlap\n(Jaccard of firing sets)",
                   marked: Sequence[str] = ()):
    """Overlap by layer, one colour per model: parallel rows (solid, with the bootstrap
    interval shaded) and the length-matched control of different rows (dashed). Models in
    ``marked`` (e.g. the one trained without English) have square markers."""
    import matplotlib.pyplot as plt

    fig, axes = panels(1, height=3.0)
    ax = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, df) in enumerate(summaries.items()):
        c = colours[i % len(colours)]
        marker = "s" if name in marked else "o"
        par = df[df["kind"] == "parallel"].sort_values("layer")
        ctl = df[df["kind"] == "control"].sort_values("layer")
        label = f"{name} (no English)" if name in marked else name
        ax.plot(par["layer"], par[value], marker=marker, color=c, label=label)
        ax.fill_between(par["layer"], par["low"], par["high"], color=c, alpha=0.15, lw=0)
        ax.plot(ctl["layer"], ctl[value], ls="--", marker=marker, ms=3, color=c, alpha=0.8)
    ax.plot([], [], ls="--", color="grey", label="control: different rows")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _annotated_matrix(m: np.ndarray, columns: Sequence[str], rows: Sequence[str], fmt: str,
                      bar_label: str, vmin: float | None = None, vmax: float | None = None):
    """``fig, ax`` with the matrix ``m`` as a heatmap, each finite cell written in it with
    ``fmt`` (white on the darker half of the colour range), and a labelled colour bar."""
    from .style import colour_bar

    fig, axes = panels(1, height=3.2)
    ax = axes[0]
    im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(m.shape[1]), columns)
    ax.set_yticks(range(m.shape[0]), rows)
    ax.grid(False)
    lo, hi = im.get_clim()
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=8,
                        color="w" if m[i, j] < (lo + hi) / 2 else "k")
    colour_bar(fig, im, ax, bar_label)
    return fig, ax


def pair_heatmap(pairs: pd.DataFrame, layer: int, languages: Sequence[str],
                 title: str = "overlap by language pair"):
    """Language x language matrix of the parallel overlap at ``layer``."""
    par = pairs[(pairs["layer"] == layer) & (pairs["kind"] == "parallel")]
    n = len(languages)
    m = np.full((n, n), np.nan)
    for _, r in par.iterrows():
        a, b = r["pair"].split("-")
        i, j = languages.index(a), languages.index(b)
        m[i, j] = m[j, i] = r["jaccard"]
    fig, ax = _annotated_matrix(m, languages, languages, "{:.2f}", "Jaccard of firing sets")
    ax.set_title(f"{title}, layer {layer}")
    return fig


# ---- chapter 05 -------------------------------------------------------------------------

def probe_figure(probe: pd.DataFrame, units: Mapping[str, str] | None = None):
    """Held-out accuracy of the language probe by layer: one panel per kind of unit
    (column ``unit``), one line per model (column ``model``), chance as a dashed line."""
    import matplotlib.pyplot as plt

    units = units or {"resid": "residual stream", "clt": "CLT features"}
    fig, axes = panels(len(units), per_row=2, height=2.8, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (unit, title) in zip(axes, units.items()):
        part = probe[probe["unit"] == unit]
        for i, (name, df) in enumerate(part.groupby("model", sort=False)):
            df = df.sort_values("layer")
            ax.plot(df["layer"], df["accuracy"], marker="o", color=colours[i % len(colours)], label=name)
            emb = probe[(probe["unit"] == "embed") & (probe["model"] == name)] if "model" in probe else probe[:0]
            if unit == "resid" and len(emb):         # the baseline: the token embedding alone
                ax.plot([-1], emb["accuracy"].iloc[:1], marker="s", ls="none", color=colours[i % len(colours)])
        if unit == "resid" and (probe["unit"] == "embed").any():
            ticks = [-1] + sorted(int(l) for l in part["layer"].unique())
            ax.set_xticks(ticks, ["emb"] + [str(t) for t in ticks[1:]])
        chance = float(part["chance"].max())
        ax.axhline(chance, ls="--", color="grey", lw=1)
        ax.annotate(f"chance {chance:.2f}", (0, chance), xycoords=("axes fraction", "data"),
                    xytext=(4, 3), textcoords="offset points", fontsize=8, color="grey")
        ax.set_title(title, loc="left")
        ax.set_xlabel("layer")
        if not (unit == "resid" and (probe["unit"] == "embed").any()):
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("probe accuracy on held-out tokens")
    axes[0].set_ylim(0, 1.02)
    axes[-1].legend(title="model", loc="lower right")
    return fig


def concept_map_figure(maps: Mapping[int, pd.DataFrame], order: Sequence[str], joined: int = 25):
    """One panel per layer: each verse in each language as a point coloured by language; the
    first ``joined`` verses are joined across languages by grey lines."""
    fig, axes = panels(len(maps), per_row=2, height=3.0)
    for ax, (layer, df) in zip(axes, maps.items()):
        for row, g in df[df["row"] < joined].groupby("row"):
            ax.plot(g["x"], g["y"], color="grey", lw=0.4, alpha=0.5, zorder=1)
        for lang in language_order(df["language"].unique(), order):
            g = df[df["language"] == lang]
            ax.scatter(g["x"], g["y"], s=6, color=language_colour(lang), label=language_label(lang),
                       zorder=2)
        ax.set_title(f"layer {layer}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), markerscale=2)
    return fig


# ---- chapter 06 -------------------------------------------------------------------------

EDGE_COLOURS = {"positive": "#2166ac", "negative": "#b2182b"}
CELL_ROWS = 3              # nodes of one (layer, position) stacked at most this high
SHARED_COLOUR, FEATURE_COLOUR = "#7b3294", "#f4a261"


def _prune_graph(nodes: pd.DataFrame, edges: pd.DataFrame, max_nodes: int, max_edges: int,
                 max_tokens: int = 6):
    """The ``max_nodes`` most influential feature and error nodes, the target(s), the
    ``max_edges`` strongest edges among them and from the input tokens, and the (at most
    ``max_tokens``) tokens those edges read most."""
    inner = nodes[nodes["kind"].isin(["feature", "error"])]
    inner = inner.assign(_i=inner["influence"].fillna(0)).nlargest(max_nodes, "_i").drop(columns="_i")
    keep = set(inner["node"]) | set(nodes.loc[nodes["kind"] == "logit", "node"])
    tokens = set(nodes.loc[nodes["kind"] == "token", "node"])
    e = edges[edges["source"].isin(keep | tokens) & edges["target"].isin(keep)]
    e = e.reindex(e["weight"].abs().sort_values(ascending=False).index).head(max_edges)
    # the input tokens whose edges weigh most, at most max_tokens of them
    reads = e[e["source"].isin(tokens)].groupby("source")["weight"].apply(lambda w: w.abs().sum())
    read = set(reads.nlargest(max_tokens).index)
    e = e[~e["source"].isin(tokens) | e["source"].isin(read)]
    return nodes[nodes["node"].isin(keep | read)], e


def graph_figure(graphs: Sequence[Mapping], feature_labels: Mapping[tuple[int, int], str] | None = None,
                 shared: set | frozenset = frozenset(), language_features: Mapping[tuple[int, int], str] | None = None,
                 max_nodes: int = 20, max_edges: int = 60, labelled: int = 8):
    """Pruned attribution graphs side by side, drawn to be traced by eye (the book's offline
    graph view). ``graphs``: one mapping per panel with ``nodes`` and ``edges`` (the graphs
    stage's tables for one graph), ``tokens`` (the prompt's token texts) and ``title``.

    Each panel keeps the ``max_nodes`` most influential feature and error nodes, the target
    and the tokens linked to them, and the ``max_edges`` strongest edges among them. Token
    positions are columns, layers rows (embeddings at the bottom, the target on top); the
    nodes of one cell are spread on a small grid. Features are circles sized by influence,
    coloured purple when ``shared`` holds their (layer, feature) (found in the graphs of the
    other languages of the concept), in their language's colour when ``language_features``
    names one (chapter 05), orange otherwise; error nodes are grey squares. Edge colour is
    its sign (blue raises its target, red lowers it), width its weight. The ``labelled``
    most influential features are numbered on the graph and listed under it as
    ``L<layer>/<id>`` and ``feature_labels[(layer, feature)]`` (e.g. the tokens they
    promote), so no label covers another."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not graphs:
        raise ValueError("no graph to draw")
    n_layers = max(int(g["nodes"]["layer"].max()) for g in graphs)
    fig, axes = panels(len(graphs), per_row=2, height=max(3.4, 1.0 * (n_layers + 2)) + 0.13 * labelled, sharey=True)
    feature_labels, language_features = feature_labels or {}, language_features or {}
    langs_shown = set()
    for ax, g in zip(axes, graphs):
        nodes, e = _prune_graph(g["nodes"], g["edges"], max_nodes, max_edges)
        tokens = g["tokens"]
        inner = nodes[nodes["kind"].isin(["feature", "error", "token"])]
        cols = sorted(set(inner["position"].astype(int)) | {len(tokens) - 1})
        # a column is as wide as its fullest cell needs: up to CELL_ROWS nodes above each
        # other, then side by side, so the position most nodes sit at gets the room
        fullest = nodes.groupby("position").apply(lambda d: d.groupby("layer").size().max())
        widths = [max(0.8, 0.42 * -(-int(fullest.get(p, 1)) // CELL_ROWS) + 0.4) for p in cols]
        centre = dict(zip(cols, np.cumsum(widths) - np.asarray(widths) / 2))
        xy = {}
        for (layer, pos), cell in nodes.groupby(["layer", "position"]):
            cell = cell.assign(_i=cell["influence"].fillna(0)).sort_values("_i", ascending=False)
            n_rows = min(len(cell), CELL_ROWS)
            n_cols = -(-len(cell) // n_rows)
            for j, node in enumerate(cell["node"]):
                c, r = divmod(j, n_rows)
                x = centre.get(int(pos), centre[cols[-1]]) + (c - (n_cols - 1) / 2) * 0.42
                y = layer + (r - (n_rows - 1) / 2) * (0.6 / max(n_rows - 1, 1) if n_rows > 1 else 0)
                xy[int(node)] = (x, y)
        wmax = float(e["weight"].abs().max()) if len(e) else 1.0
        for r in e.itertuples():
            a, b = xy.get(int(r.source)), xy.get(int(r.target))
            if a is None or b is None:
                continue
            ax.plot([a[0], b[0]], [a[1], b[1]], color=EDGE_COLOURS["positive" if r.weight > 0 else "negative"],
                    lw=0.4 + 2.6 * abs(r.weight) / wmax, alpha=0.45, zorder=1)
        infl = nodes["influence"].fillna(0)
        top = max(float(infl.max()), 1e-12)
        for node in nodes.itertuples():
            x, y = xy[int(node.node)]
            if node.kind == "feature":
                key = (int(node.layer), int(node.feature))
                colour = (SHARED_COLOUR if key in shared else
                          language_colour(language_features[key]) if key in language_features else FEATURE_COLOUR)
                if key not in shared and key in language_features:
                    langs_shown.add(language_features[key])
                ax.scatter(x, y, s=15 + 130 * (node.influence or 0) / top, color=colour, marker="o",
                           edgecolors="k", linewidths=0.4, zorder=3)
            elif node.kind == "error":
                ax.scatter(x, y, s=15 + 130 * (node.influence or 0) / top, color="#bbbbbb", marker="s",
                           edgecolors="k", linewidths=0.4, zorder=3)
            elif node.kind == "token":
                ax.scatter(x, y, s=45, color="#404040", marker="D", zorder=3)
            else:
                ax.scatter(x, y, s=140, color="#2a9d8f", marker="*", edgecolors="k", linewidths=0.4, zorder=3)
        # the most influential features get a number on the graph and a line in the key below
        feats = nodes[nodes["kind"] == "feature"].assign(_i=lambda d: d["influence"].fillna(0))
        key_lines = []
        for i, node in enumerate(feats.nlargest(labelled, "_i").itertuples(), start=1):
            key = (int(node.layer), int(node.feature))
            x, y = xy[int(node.node)]
            ax.annotate(str(i), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7,
                        fontweight="bold", zorder=4)
            key_lines.append(f"{i}  L{key[0]}/{key[1]}" + (f"  {feature_labels[key]}" if key in feature_labels else ""))
        if key_lines:
            ax.text(0.0, -0.2, "\n".join(key_lines), transform=ax.transAxes, va="top", ha="left", fontsize=7,
                    linespacing=1.3)
        names = [tokens[p] if len(tokens[p]) <= 9 else tokens[p][:8] + "…" for p in cols]
        ax.set_xticks([centre[p] for p in cols], [f"{n}\n@{p}" for n, p in zip(names, cols)], fontsize=7)
        ax.set_yticks(range(-1, n_layers + 1), ["embed"] + [f"layer {l}" for l in range(n_layers)] + ["target"])
        ax.tick_params(axis="y", labelleft=ax is axes[0])
        ax.set_xlim(0, float(np.sum(widths)))
        ax.set_ylim(-1.6, n_layers + 0.6)
        ax.grid(False)
        if g.get("title"):
            ax.set_title(g["title"], loc="left", fontsize=9)
    handles = [Line2D([], [], marker="o", ls="", color=SHARED_COLOUR, mec="k", label="feature shared with the other languages"),
               Line2D([], [], marker="o", ls="", color=FEATURE_COLOUR, mec="k", label="other feature"),
               Line2D([], [], marker="s", ls="", color="#bbbbbb", mec="k", label="error node"),
               Line2D([], [], marker="D", ls="", color="#404040", label="input token"),
               Line2D([], [], marker="*", ls="", color="#2a9d8f", mec="k", ms=10, label="target"),
               Line2D([], [], color=EDGE_COLOURS["positive"], lw=2, label="edge raises its target"),
               Line2D([], [], color=EDGE_COLOURS["negative"], lw=2, label="edge lowers its target")]
    handles[2:2] = [Line2D([], [], marker="o", ls="", color=language_colour(l), mec="k",
                           label=f"{language_label(l)} language feature") for l in sorted(langs_shown)]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return fig


def shared_influence_figure(shared: pd.DataFrame):
    """Per layer, the share of a graph's feature influence carried by features found in the
    graphs of every language of the same concept, and by features found in at least one
    other language's graph (means over concepts and languages; bars: spread over them)."""
    fig, axes = panels(1, height=2.8)
    ax = axes[0]
    for col, style in {"shared influence": dict(marker="o", label="in every language"),
                       "pair influence": dict(marker="s", ls="--", label="in at least one other language")}.items():
        g = shared.groupby("layer")[col]
        ax.errorbar(g.mean().index, g.mean().values, yerr=g.std().fillna(0).values, capsize=3, **style)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of a graph's feature\ninfluence carried by features")
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ---- chapter 07 -------------------------------------------------------------------------

def switch_strength_figure(rates: pd.DataFrame):
    """Switch success against steering strength (columns strength, kind, success), the
    language-feature steering against the random-feature control."""
    fig, axes = panels(1, height=2.8)
    ax = axes[0]
    for kind, style in {"steer": dict(color="#1f77b4", marker="o", label="language features"),
                        "control": dict(color="grey", marker="s", ls="--", label="random features (control)")}.items():
        part = rates[rates["kind"] == kind].sort_values("strength")
        ax.plot(part["strength"], part["success"], **style)
    ax.set_xscale("log", base=2)
    strengths = sorted(rates["strength"].unique())
    ax.set_xticks(strengths, [f"{s:g}" for s in strengths])
    ax.minorticks_off()
    ax.set_xlabel("strength (target features set to this × their mean firing value)")
    ax.set_ylabel("continuations in the\ntarget language")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left")
    return fig


def switch_matrix_figure(matrix: pd.DataFrame, title: str):
    """Source x target matrix of switch success (rows: the prompt's language)."""
    fig, ax = _annotated_matrix(matrix.to_numpy(dtype=float), list(matrix.columns), list(matrix.index),
                                "{:.0%}", "share switched", vmin=0, vmax=1)
    ax.set_xlabel("target language")
    ax.set_ylabel("prompt language")
    ax.set_title(title, loc="left")
    return fig


# ---- chapter 08 -------------------------------------------------------------------------

FINETUNE_STYLE = {"weak": dict(color="#d62728", label="weak-language finetune"),
                  "mixture": dict(color="grey", label="mixture finetune (more training)"),
                  "strong": dict(color="#1f77b4", label="strong-language finetune")}


def finetune_loss_figure(losses: pd.DataFrame, order: Sequence[str]):
    """Change of test loss per language for each finetune against the base model (columns
    variant, language, change, low, high), bars with their 95 % intervals; below 0: better."""
    fig, axes = panels(1, height=2.8)
    ax = axes[0]
    langs = [lang for lang in order if lang in set(losses["language"])]
    variants = [v for v in FINETUNE_STYLE if v in set(losses["variant"])]
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        part = losses[losses["variant"] == v].set_index("language").reindex(langs)
        x = np.arange(len(langs)) + (i - (len(variants) - 1) / 2) * width
        err = np.vstack([part["change"] - part["low"], part["high"] - part["change"]])
        ax.bar(x, part["change"], width, yerr=err, capsize=2, **FINETUNE_STYLE[v])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(langs)), [language_label(lang) for lang in langs])
    ax.set_ylabel("test loss change\n(finetuned − base, nats)")
    ax.legend(fontsize=7, loc="best")
    return fig


def feature_change_figure(changes: pd.DataFrame, expected: float):
    """Share of CLT features changed beyond the noise floor per layer, for each further-trained
    CLT (columns variant, layer, changed, features); ``expected``: the share the floor lets
    through by chance (a dashed line)."""
    styles = {"stagewise": dict(color="#d62728", marker="o", label="stage-wise (weak finetune)"),
              "mixture": dict(color="grey", marker="s", label="mixture finetune"),
              "strong": dict(color="#1f77b4", marker="^", label="strong-language finetune"),
              "data_only": dict(color="#9467bd", marker="D", ls="--", label="data only (base model, weak text)")}
    fig, axes = panels(1, height=2.8)
    ax = axes[0]
    for v, style in styles.items():
        part = changes[changes["variant"] == v].sort_values("layer")
        if len(part):
            ax.plot(part["layer"], part["changed"] / part["features"], **style)
    ax.axhline(expected, color="black", ls=":", lw=0.8, label="passes the floor by chance")
    layers = sorted(changes["layer"].unique())
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("features changed\nbeyond the floor")
    ax.legend(fontsize=7, loc="best")
    return fig


def relative_norm_figure(norms: pd.DataFrame):
    """Histogram of the crosscoder latents' relative decoder norm (0: base only, 0.5: shared,
    1: finetuned only), one panel per layer, live latents only."""
    layers = sorted(norms["layer"].unique())
    fig, axes = panels(len(layers), per_row=len(layers), height=2.4, sharey=True)
    for ax, layer in zip(axes, layers):
        part = norms[(norms["layer"] == layer) & (norms["fires"] > 0)]
        ax.hist(part["relative_norm"], bins=np.linspace(0, 1, 21), color="#1f77b4")
        for x in (0.1, 0.9):
            ax.axvline(x, color="black", ls=":", lw=0.8)
        ax.set_title(f"layer {layer}", loc="left", fontsize=9)
        ax.set_xlabel("relative decoder norm")
    axes[0].set_ylabel("latents")
    return fig


def transplant_figure(summary: pd.DataFrame):
    """Share of the finetuning gain closed (base to finetuned) or undone (finetuned to base) by
    moving a feature set's decoders or activations, with 95 % intervals, against random sets of
    equal size (grey)."""
    fig, axes = panels(1, height=1.0 + 0.22 * len(summary))
    ax = axes[0]
    labels = [f"{d}: {m} of {s}" for d, m, s in zip(summary["direction"], summary["move"], summary["set"])]
    y = np.arange(len(summary))[::-1]
    colours = ["grey" if s.startswith("random") else "#d62728" for s in summary["set"]]
    for yi, c, (_, r) in zip(y, colours, summary.iterrows()):
        ax.plot([r["low"], r["high"]], [yi, yi], color=c, lw=2)
        ax.plot([r["share"]], [yi], "o", color=c)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("share of the finetuning loss gain")
    return fig


# ---- chapter 09 -------------------------------------------------------------------------

def latent_language_figure(shares: pd.DataFrame, languages: Sequence[str]):
    """Share of live SAE latents that are one language's only or bilingual, against training
    step: one panel per layer position (column ``position``: first / middle / last), one
    colour per label, one line style per model (column ``model``)."""
    positions = list(dict.fromkeys(shares["position"]))
    fig, axes = panels(len(positions), per_row=3, height=2.7, sharey=True)
    colours = {**{l: language_colour(l) for l in languages}, "bilingual": "#17becf"}   # no language uses cyan
    styles = {m: s for m, s in zip(dict.fromkeys(shares["model"]), ["-", "--", ":", "-."])}
    for ax, pos in zip(axes, positions):
        part = shares[shares["position"] == pos]
        for (model, label), g in part.groupby(["model", "label"], sort=False):
            if label not in colours:
                continue
            g = g.sort_values("step")
            ax.plot(g["step"], g["share"], marker="o", ms=3, color=colours[label], ls=styles[model],
                    label=f"{language_label(label) if label in languages else label}, {model}")
        ax.set_xscale("log")
        ax.set_title(f"{pos} layer", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of live latents")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    return fig


def stitching_figure(summary: pd.DataFrame, languages: Sequence[str], title: str):
    """Change of the early checkpoint's loss when latents of the final model are added to
    its residual stream: one panel per layer position (column ``position``), one bar group
    per condition, one bar per language, 95 % confidence intervals over text batches."""
    positions = list(dict.fromkeys(summary["position"]))
    conditions = ["bilingual", "monolingual", "random"]
    fig, axes = panels(len(positions), per_row=3, height=2.7, sharey=True)
    width = 0.8 / len(languages)
    for ax, pos in zip(axes, positions):
        part = summary[summary["position"] == pos].set_index(["condition", "language"])
        for j, lang in enumerate(languages):
            x = np.arange(len(conditions)) + (j - (len(languages) - 1) / 2) * width
            m = [part.loc[(c, lang), "loss_change"] if (c, lang) in part.index else np.nan for c in conditions]
            lo = [part.loc[(c, lang), "low"] if (c, lang) in part.index else np.nan for c in conditions]
            hi = [part.loc[(c, lang), "high"] if (c, lang) in part.index else np.nan for c in conditions]
            ax.bar(x, m, width, color=language_colour(lang), label=language_label(lang),
                   yerr=[np.subtract(m, lo), np.subtract(hi, m)], capsize=2)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xticks(range(len(conditions)), conditions, rotation=20, fontsize=8)
        ax.set_title(f"{pos} layer", fontsize=10)
    axes[0].set_ylabel("loss change (nats)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    return fig


# ---- chapter 10 -------------------------------------------------------------------------

def similarity_figure(sim: np.ndarray, languages: Sequence[str], title: str = "", meaning_rows: int = 12):
    """The cosine-similarity matrix of activation patterns twice: rows ordered by language
    (blocks along the diagonal = language regions) and by meaning for the first
    ``meaning_rows`` sentences (each sentence's translations side by side; bright blocks =
    semantic alignment). ``sim`` has the languages in blocks of equal size, in the order of
    ``languages``."""
    from .style import colour_bar

    n_lang = len(languages)
    rows = sim.shape[0] // n_lang
    if rows * n_lang != sim.shape[0]:
        raise ValueError(f"a {sim.shape[0]}-row matrix cannot hold {n_lang} languages in equal blocks")
    # by meaning: the first few sentences only, so that each sentence's block of translations
    # (n_lang x n_lang) is visible
    shown = min(rows, meaning_rows)
    by_meaning = np.arange(sim.shape[0]).reshape(n_lang, rows)[:, :shown].T.ravel()
    fig, axes = panels(2, height=3.3)
    lo, hi = np.percentile(sim, 1), np.percentile(sim, 99.5)
    for ax, order, label in ((axes[0], np.arange(sim.shape[0]), "ordered by language"),
                             (axes[1], by_meaning, "ordered by meaning")):
        im = ax.imshow(sim[np.ix_(order, order)], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.grid(False)
        ax.set_title(label, fontsize=10)
        if label.endswith("language"):
            ticks = [rows * i + rows / 2 - 0.5 for i in range(n_lang)]
            ax.set_xticks(ticks, [language_label(l) for l in languages], rotation=90, fontsize=8)
            ax.set_yticks(ticks, [language_label(l) for l in languages], fontsize=8)
        else:
            ticks = [n_lang * i + n_lang / 2 - 0.5 for i in range(shown)]
            ax.set_xticks(ticks, [str(i + 1) for i in range(shown)], fontsize=7)
            ax.set_yticks([])
            ax.set_xlabel(f"sentence (its {n_lang} translations side by side)")
    colour_bar(fig, im, axes[1], "cosine similarity")
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    return fig


def region_score_figure(scores: pd.DataFrame, x: str = "step"):
    """LRDS (left) and SADS (right) against ``x`` ("step": training step, log scale, all
    layers together; "layer": per layer at the last step), one line per model (column
    ``model``) and unit kind (column ``unit``: MLP neurons solid, CLT features dashed); a
    shaded band where the table has the score's interval (``lrds_low``, ``lrds_high``, ...)."""
    fig, axes = panels(2, height=2.9)
    colours = {}
    for ax, score, name in ((axes[0], "lrds", "language region score (LRDS)"),
                            (axes[1], "sads", "semantic alignment score (SADS)")):
        for (model, unit), part in scores.groupby(["model", "unit"], sort=False):
            c = colours.setdefault(model, f"C{len(colours)}")
            part = part.sort_values(x)
            label = f"{model}, {'MLP neurons' if unit == 'mlp' else 'CLT features'}"
            ax.plot(part[x], part[score], color=c, ls="-" if unit == "mlp" else "--",
                    marker="o" if x == "layer" or len(part) < 12 else None, label=label)
            if f"{score}_low" in part:
                ax.fill_between(part[x], part[f"{score}_low"], part[f"{score}_high"], color=c, alpha=0.15, lw=0)
        ax.set_ylabel(name)
        ax.axhline(0, color="grey", lw=0.6)
        if x == "step":
            ax.set_xscale("log")
            ax.set_xlabel("training step")
        else:
            ax.set_xlabel("layer")
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def key_unit_figure(counts: pd.DataFrame, languages: Sequence[str]):
    """Key linguistic units per layer, stacked by language (columns layer, language,
    units), one panel per model (column ``model``), as a share of the layer's units
    (column ``width``)."""
    models = list(dict.fromkeys(counts["model"]))
    fig, axes = panels(len(models), height=2.8)
    for ax, model in zip(axes, models):
        part = counts[counts["model"] == model]
        bottom = None
        for lang in languages:
            rows = part[part["language"] == lang].sort_values("layer")
            share = (rows["units"] / rows["width"]).to_numpy()
            ax.bar(rows["layer"], share, bottom=bottom, color=language_colour(lang), label=language_label(lang))
            bottom = share if bottom is None else bottom + share
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("key units / units of the layer")
    axes[len(models) - 1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def ablation_figure(summary: pd.DataFrame, languages: Sequence[str], title: str):
    """Ablated language x evaluated language: relative change of the loss when one
    language's key neurons are zeroed, minus the mean change for random neurons."""
    m = (summary.pivot(index="ablated", columns="language", values="excess")
         .reindex(index=[l for l in languages if l in set(summary["ablated"])], columns=languages))
    fig, ax = _annotated_matrix(100 * m.to_numpy(dtype=float), list(m.columns),
                                [language_label(l) for l in m.index], "{:+.1f}",
                                "loss change beyond\nrandom neurons (%)")
    ax.set_xlabel("language evaluated")
    ax.set_ylabel("key neurons zeroed")
    ax.set_title(title, loc="left")
    return fig


VERDICT_COLOURS = {"holds": "#2ca02c", "fails": "#d62728", "inconclusive": "#7f7f7f"}


def forest_figure(rows: pd.DataFrame):
    """Each verdict row's estimate with its 95 % interval against its null (a vertical line),
    one panel per claim (statistics on different scales never share an axis); colour: the
    verdict; hollow markers: rows shown but not counted."""
    claims = list(dict.fromkeys(rows["claim"]))
    if not claims:
        raise ValueError("no verdict rows to draw")
    heights = [max(1, int((rows["claim"] == c).sum())) for c in claims]
    fig, axes = panels(len(claims), per_row=1, height=(0.6 + 0.32 * sum(heights)) / len(claims) + 0.35,
                       gridspec_kw={"height_ratios": heights}, constrained_layout=True)
    for ax, claim in zip(axes, claims):
        part = rows[rows["claim"] == claim].reset_index(drop=True)
        for i, r in part.iterrows():
            y = len(part) - 1 - i
            colour = VERDICT_COLOURS.get(r["verdict"], "black")
            ax.plot([r["low"], r["high"]], [y, y], color=colour, lw=2)
            ax.plot([r["estimate"]], [y], "o", color=colour, mfc=colour if r["counted"] else "white")
            ax.axvline(r["null"], color="black", lw=0.6, ymin=(y + 0.1) / len(part), ymax=(y + 0.9) / len(part))
        labels = [(f"{m} · " if isinstance(m, str) else "") + _short(s) for m, s in zip(part["model"], part["statistic"])]
        ax.set_yticks(range(len(part)))
        ax.set_yticklabels(labels[::-1], fontsize=7)
        ax.set_ylim(-0.6, len(part) - 0.4)
        ax.set_title(claim, loc="left", fontsize=9, pad=2)
        ax.tick_params(axis="x", labelsize=7)
    return fig


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"



def retrieval_figure(table: pd.DataFrame, k: int = 1, x: str = "step", line: str = "layer"):
    """Translation retrieval at ``k`` (``features.retrieval``): one panel per model (column
    ``model``), one line per value of ``line`` against ``x`` ("step": training step, log
    scale; or "layer"), a band for the 95 % interval over verses and a dashed line at chance
    (k / N)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    part = table[table["k"] == k]
    models = list(dict.fromkeys(part["model"]))
    fig, axes = panels(len(models), height=2.7, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, model in zip(axes, models):
        rows = part[part["model"] == model]
        values = list(dict.fromkeys(rows[line]))
        for i, value in enumerate(values):
            r = rows[rows[line] == value].sort_values(x)
            c = cmap(i / max(1, len(values) - 1)) if line == "layer" else f"C{i}"
            ax.plot(r[x], r["share"], color=c, marker="o", ms=3, label=f"layer {value}" if line == "layer" else value)
            ax.fill_between(r[x], r["low"], r["high"], color=c, alpha=0.15, lw=0)
        ax.axhline(float(rows["chance"].iloc[0]), color="grey", ls="--", lw=0.8, label="chance")
        ax.set_title(model, fontsize=10)
        if x == "step":
            ax.set_xscale("log")
            ax.set_xlabel("training step")
        else:
            ax.set_xlabel(x)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].set_ylabel(f"translation found (top {k})")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig
