"""One home for the look of every figure: sizes that stay legible in the book's text
column, fixed language colours and order, labelled colour bars, zoomed axes.

The book's text column is about 690 px wide; a figure wider than that is scaled down and
its labels shrink with it. So figures are drawn at most ``TEXT_WIDTH`` inches wide at
``DPI`` (one inch = 100 px), with 10-11 pt text: what is drawn is what the reader sees.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import matplotlib as mpl
import numpy as np

from ..languages import LANGUAGES, language_name

DPI = 100
TEXT_WIDTH = 6.8          # inches: the width of the book's text column at DPI
PANEL_HEIGHT = 2.9        # inches per row of panels

# Fixed colours per language, the same in every figure of the book. English, the reference
# of the mixtures, is dark grey; the languages of the multilingual-CLT study come first.
_FIXED = {"en": "#404040", "fr": "#1f77b4", "de": "#ff7f0e", "ar": "#2ca02c", "zh": "#d62728",
          "ja": "#9467bd", "es": "#8c564b", "ru": "#e377c2", "it": "#bcbd22", "pt": "#17becf"}


def language_colour(code: str) -> str:
    if code in _FIXED:
        return _FIXED[code]
    cmap = mpl.colormaps["tab20b"]
    others = [c for c in LANGUAGES if c not in _FIXED]
    i = others.index(code) if code in others else abs(hash(code))
    return mpl.colors.to_hex(cmap(i % cmap.N))


def language_label(code: str) -> str:
    """'fr (French)'; unknown codes as they are."""
    try:
        return f"{code} ({language_name(code)})"
    except ValueError:
        return code


def language_order(languages: Iterable[str], book_order: Sequence[str]) -> list[str]:
    """``languages`` in the book's order (the run's ``corpus.languages``), unknown ones last."""
    languages = list(languages)
    ranked = [c for c in book_order if c in languages]
    return ranked + [c for c in languages if c not in ranked]


# fonts that draw Chinese, Japanese and Arabic tokens in figures, used after DejaVu Sans when
# the machine has them (Debian: fonts-noto-cjk, fonts-noto-core); see book/how_to_run.md
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans Arabic", "Noto Naskh Arabic")


def _font_families() -> list[str]:
    from matplotlib import font_manager

    have = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [f for f in FALLBACK_FONTS if f in have]


def use_book_style() -> None:
    """Matplotlib settings of the book (called by ``start_chapter``). A figure that prints a
    token no installed font can draw shows a box there; the warning that says so is kept
    out of the pages (the how-to page names the fonts to install)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
    mpl.rcParams.update({"font.family": _font_families()})
    mpl.rcParams.update({
        "figure.dpi": DPI, "savefig.dpi": DPI, "figure.figsize": (TEXT_WIDTH, PANEL_HEIGHT),
        "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
        "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False, "figure.constrained_layout.use": True,
        "legend.frameon": False,
    })


def panels(n: int, per_row: int = 2, height: float = PANEL_HEIGHT, **kwargs):
    """``fig, axes`` with ``n`` panels, at most ``per_row`` side by side, the whole figure
    one text column wide; unused panels are hidden. ``axes`` is a flat list."""
    import matplotlib.pyplot as plt

    cols = max(1, min(n, per_row))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(TEXT_WIDTH, height * rows), squeeze=False,
                             **kwargs)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def colour_bar(fig, mappable, ax, label: str):
    """A colour bar that says what its colours measure."""
    bar = fig.colorbar(mappable, ax=ax, shrink=0.9)
    bar.set_label(label)
    return bar


def zoom_to_data(ax, values, axis: str = "y", narrow: float = 0.1, pad: float = 0.15) -> bool:
    """When every value sits in a band narrower than ``narrow`` times the largest magnitude
    (e.g. all bars near 1.0 on a 0-1 axis), zoom the axis to the data so differences show,
    and say so on the axis label. Returns True when it zoomed."""
    v = np.asarray([x for x in np.ravel(values) if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return False
    lo, hi = float(v.min()), float(v.max())
    scale = max(abs(lo), abs(hi), 1e-12)
    if hi - lo >= narrow * scale:
        return False
    margin = max((hi - lo) * pad, scale * 0.005)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(lo - margin, hi + margin)
    label = ax.get_ylabel() if axis == "y" else ax.get_xlabel()
    note = "axis zoomed to the data"
    (ax.set_ylabel if axis == "y" else ax.set_xlabel)(f"{label}\n({note})" if label else note)
    return True


def bar_labels(ax, bars, fmt: str = "{:.2f}") -> None:
    """Value labels above bars, with head room so they never touch the frame."""
    ax.bar_label(bars, labels=[fmt.format(b.get_height()) for b in bars], padding=2, fontsize=8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))
