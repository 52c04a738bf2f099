"""Figures of the chapters (matplotlib, so the book renders them as images)."""

from __future__ import annotations

import math
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..languages import language_name


def _label(lang: str) -> str:
    try:
        return f"{lang} ({language_name(lang)})"
    except ValueError:
        return lang


# ---- chapter 01 -------------------------------------------------------------------------

def fertility_figure(fertility: pd.DataFrame):
    """Three panels: tokens per unit, share of multi-piece units, tokens relative to English."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    langs = list(fertility.index)
    colours = ["tab:gray" if lang == "en" else "tab:blue" for lang in langs]
    panels = [
        ("tokens_per_unit", "tokens per word\n(per character for zh, ja)"),
        ("multi_piece_share", "share of words split into ≥ 2 pieces\n(zh, ja: characters not in the vocabulary)"),
        ("ratio_to_reference", "tokens for the same verses,\nrelative to English"),
    ]
    for ax, (column, title) in zip(axes, panels):
        ax.bar(langs, fertility[column], color=colours)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(fertility[column]):
            if not (isinstance(v, float) and math.isnan(v)):
                ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    fig.suptitle("Tokenizer fertility on the parallel set", y=1.03)
    fig.tight_layout()
    return fig


def _val_columns(df: pd.DataFrame, languages) -> dict[str, str]:
    """Map language -> the metrics column holding its validation loss."""
    out = {}
    for lang in languages:
        for col in (f"val_loss_{lang}", f"val_loss/{lang}", f"val/{lang}", lang):
            if col in df.columns:
                out[lang] = col
                break
    return out


def loss_curves(metrics: Mapping[str, pd.DataFrame], languages):
    """One panel per model: validation loss per language against training tokens."""
    n = len(metrics)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), sharey=True, squeeze=False)
    for ax, (name, df) in zip(axes.flat, metrics.items()):
        val = _val_columns(df, languages)
        evals = df.dropna(subset=list(val.values())) if val else df
        for lang, col in val.items():
            ax.plot(evals["tokens"], evals[col], marker=".", label=lang)
        if "train_loss" in df:
            ax.plot(df["tokens"], df["train_loss"], color="k", alpha=0.25, lw=0.8, label="train")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("validation loss (nats/token)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def final_losses(metrics: Mapping[str, pd.DataFrame], languages) -> pd.DataFrame:
    """Last validation loss per model (rows) and language (columns), plus the gap to English."""
    rows = {}
    for name, df in metrics.items():
        val = _val_columns(df, languages)
        last = df.dropna(subset=list(val.values())).iloc[-1]
        rows[name] = {lang: float(last[col]) for lang, col in val.items()}
    table = pd.DataFrame(rows).T[list(languages)]
    if "en" in table:
        others = [lang for lang in languages if lang != "en"]
        table["gap to en (mean)"] = table[others].mean(axis=1) - table["en"]
    return table


def loss_heatmap(table: pd.DataFrame, title: str = "final validation loss"):
    table = table[[c for c in table.columns if not str(c).startswith("gap")]]
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 2, 0.5 * table.shape[0] + 1.5))
    im = ax.imshow(table.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.values[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < np.nanmean(table.values) else "k", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ---- chapter 03 -------------------------------------------------------------------------

def clt_layer_figure(layers: pd.DataFrame):
    """FVU, L0 and dead fraction by layer, one line per model (index level 'model')."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, df in layers.groupby(level="model"):
        for ax, col in zip(axes, ("fvu", "l0", "dead_fraction")):
            ax.plot(df["layer"], df[col], marker="o", label=name)
    for ax, title in zip(axes, ("FVU (target variance)", "L0 (active features / token)",
                                "dead features (fraction)")):
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def ce_recovered_figure(languages: pd.DataFrame):
    """CE loss recovered and top-1 agreement of the replacement model, per language and model."""
    df = languages.reset_index(level="model")
    df = df[df["language"] != "all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, col, title in ((axes[0], "ce_recovered", "CE loss recovered"),
                           (axes[1], "top1_agreement", "top-1 agreement with the model")):
        table = df.pivot(index="language", columns="model", values=col)
        table.plot.bar(ax=ax, rot=0, legend=False)
        ax.set_title(title)
        ax.set_ylim(min(0.0, float(np.nanmin(table.values)) - 0.05),
                    max(1.0, float(np.nanmax(table.values))) + 0.05)
        ax.axhline(0, color="k", lw=0.6)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(title="model", fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig
