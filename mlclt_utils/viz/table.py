"""``table(df)``: every table of the book goes through here.

What it does to a DataFrame, so no chapter thinks about it:

* numbers rounded to significant digits per column (``digits``), integers with thousands
  separators, percentages when asked (``percent``);
* headers made readable (``fvu`` -> FVU, ``ce_recovered`` -> CE recovered, snake_case ->
  words; ``headers`` overrides);
* a meaningless index (0, 1, 2, ...) is not shown; named index levels become key columns
  that never wrap (model names like ``s-en50``);
* columns with one value in every row are left out and said once under the table;
* long text left-aligned and wrapped, with ``dir="auto"`` so right-to-left text lays out;
* optional colour scales, one per column (``colour``), so a column of gaps is not drowned
  by a column of losses;
* a table wider than the text column is transposed when it has few rows, else split into
  column groups that repeat the key columns.

Written by hand because pandas' Styler renders only part of this and its HTML needs its
own CSS per table; here the look lives in the book's CSS (``mlclt-table``).
"""

from __future__ import annotations

import html
import re
import math
from numbers import Integral, Real
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

COLUMN_PX = 690           # the book's text column
CHAR_PX = 7.5             # average width of a character in the table font
PAD_PX = 20               # cell padding, both sides

HEADERS = {
    "fvu": "FVU", "l0": "L0", "kl": "KL", "ce": "CE", "ce_recovered": "CE recovered",
    "ce_original": "CE, model", "ce_replacement": "CE, replacement",
    "ce_zero_ablation": "CE, MLPs zeroed", "top1_agreement": "top-1 agreement",
    "dead_fraction": "dead features", "n_tokens": "tokens", "ratio_to_reference": "relative to English",
    "tokens_per_unit": "tokens per word", "multi_piece_share": "words in ≥ 2 pieces",
    "chars_per_token": "characters per token", "met": "met",
}


def readable(name) -> str:
    if isinstance(name, tuple):
        return " · ".join(readable(n) for n in name if str(n))
    name = str(name)
    return HEADERS.get(name, name.replace("_", " "))


def format_number(v, digits: int = 3, percent: bool = False) -> str:
    """Significant digits, thousands separators, no scientific notation for usual sizes."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if percent:
        return f"{float(v) * 100:.{max(digits - 2, 0)}f} %"
    if isinstance(v, Integral):
        return f"{int(v):,}"
    v = float(v)
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    if abs(v) < 1e-4:
        return f"{v:.{max(digits - 1, 0)}e}"
    decimals = max(digits - 1 - int(math.floor(math.log10(abs(v)))), 0)
    return f"{v:,.{decimals}f}"


# an estimate with its interval, "+0.012 [+0.003, +0.021]" or "0.5 (0.4-0.6)": kept on one line
INTERVAL = re.compile(r"^[+\-−]?[\d.]+%?\s*[\[(][+\-−]?[\d.]+%?,?\s*(?:to|-|–)?\s*[+\-−]?[\d.]+%?[\])]$")


def _strings(s: pd.Series) -> bool:
    """A column of Python strings (object dtype, or pandas' string dtype)."""
    return (s.dtype == object or pd.api.types.is_string_dtype(s)) and len(s) > 0 and \
        s.map(lambda x: isinstance(x, str)).all()


def _is_interval(s: pd.Series) -> bool:
    return _strings(s) and s.map(lambda x: bool(INTERVAL.match(x))).all()


def _is_text(s: pd.Series) -> bool:
    return _strings(s) and s.map(len).mean() > 24 and not _is_interval(s)


# Columns that identify a row: shown first in every part of a split table, never wrapped.
KEY_COLUMNS = ("model", "language", "layer", "feature", "mixture", "size", "transcoder")


def _width(df: pd.DataFrame, cells: Mapping[str, list[str]]) -> float:
    """Estimated width in pixels: headers wrap between words, long text wraps at about
    24 characters, numbers do not wrap."""
    px = 0.0
    for c in df.columns:
        header = max((len(w) for w in readable(c).split()), default=0)
        longest = max([header] + [len(x) for x in cells[c]])
        px += min(longest, 24) * CHAR_PX + PAD_PX
    return px


class Table:
    """HTML for the book (``_repr_html_``) and the DataFrame for code (``.data``)."""

    def __init__(self, parts: list[str], data: pd.DataFrame, note: str = "", folded: str = ""):
        self.parts, self.data, self.note, self.folded = parts, data, note, folded

    def _repr_html_(self) -> str:
        note = f'<p class="mlclt-note">{html.escape(self.note)}</p>' if self.note else ""
        body = "".join(self.parts) + note
        if self.folded:            # long detail: folded under a line that says what it holds
            return (f'<details class="mlclt-fold"><summary>{html.escape(self.folded)}</summary>'
                    f"{body}</details>")
        return body

    def __repr__(self) -> str:
        return self.data.to_string() + (f"\n{self.note}" if self.note else "")


def _colours(values: pd.Series, cmap: str, scale: pd.DataFrame | None = None) -> list[str]:
    """Cell styles of one column on ``cmap``, scaled over ``scale`` (the columns that share
    one colour scale) or over the column itself."""
    import matplotlib as mpl

    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    pool = v if scale is None else scale.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float).ravel()
    finite = pool[np.isfinite(pool)]
    if finite.size == 0:
        return [""] * len(v)
    lo, hi = finite.min(), finite.max()
    out = []
    for x in v:
        if not np.isfinite(x):
            out.append("")
            continue
        r, g, b, _ = mpl.colormaps[cmap](0.15 + 0.7 * ((x - lo) / (hi - lo) if hi > lo else 0.5))
        ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "#fff"
        out.append(f"background-color:{mpl.colors.to_hex((r, g, b))};color:{ink}")
    return out


FOLD_ROWS = 20             # longer tables are folded (``table(fold=...)``)


def table(df: pd.DataFrame, digits: int | Mapping[str, int] = 3, headers: Mapping | None = None,
          percent: Sequence[str] = (), colour: Mapping[str, str] | None = None,
          html_columns: Sequence[str] = (), keep_constant: bool = False, caption: str | None = None,
          max_width: float = COLUMN_PX, fold: int | None = FOLD_ROWS) -> Table:
    """The book's rendering of ``df`` (see the module docstring). ``colour``: column (or a
    tuple of columns that share one scale) -> matplotlib colour map name; ``html_columns``:
    columns whose cells are HTML already. A table of more than ``fold`` rows is folded under
    a "show the table" line (None: never), so that long detail does not stand where a
    figure summarises it."""
    data = df.copy()
    if isinstance(data.columns, pd.MultiIndex):
        data.columns = [readable(c) for c in data.columns]
    keys: list = []
    for level in range(data.index.nlevels):
        name = data.index.names[level]
        values = data.index.get_level_values(level)
        if name is None and pd.api.types.is_integer_dtype(values):
            continue                         # row numbers: meaningless to a reader
        column = name if name is not None else ""
        data.insert(len(keys), column, list(values))
        keys.append(column)
    data = data.reset_index(drop=True)
    keys += [c for c in data.columns if c in KEY_COLUMNS and c not in keys]
    data = data[keys + [c for c in data.columns if c not in keys]]
    note = ""
    names = {c: (headers or {}).get(c, readable(c)) for c in data.columns}
    if not keep_constant and len(data) > 1:
        constant = [c for c in data.columns if c not in keys and c not in html_columns
                    and data[c].astype(str).nunique() == 1]
        if constant:
            note = "In every row: " + "; ".join(
                f"{names[c]} = {_cell(data[c].iloc[0], c, digits, percent)}" for c in constant) + "."
            data = data.drop(columns=constant)
    cells = {c: [_cell(v, c, digits, percent) for v in data[c]] for c in data.columns}
    if _width(data, cells) > max_width and len(data) <= 3 and len(data.columns) > len(data) + 1 \
            and not html_columns and not colour and not percent:
        # few rows, many columns: one row per column reads better
        label = keys[0] if keys else None
        cols = [c for c in data.columns if c != label]
        flipped = pd.DataFrame({(data[label].iloc[i] if label is not None else f"{i + 1}"):
                                [data[c].iloc[i] for c in cols] for i in range(len(data))},
                               index=[names[c] for c in cols])
        return table(flipped, digits, None, (), None, (), True, caption, max_width, fold)
    groups = [list(data.columns)]
    if _width(data, cells) > max_width:
        groups, current = [], list(keys)
        for c in [c for c in data.columns if c not in keys]:
            trial = current + [c]
            if len(current) > len(keys) and _width(data[trial], cells) > max_width:
                groups.append(current)
                current = list(keys) + [c]
            else:
                current = trial
        groups.append(current)
    parts, first_caption = [], caption
    for group in groups:
        parts.append(_html(data, group, names, cells, keys, colour or {}, html_columns, caption))
        caption = None
    folded = ""
    if fold is not None and len(data) > fold:
        folded = f"Show the table ({len(data)} rows" + (f": {first_caption}" if first_caption else "") + ")"
    return Table(parts, df, note, folded)


def _cell(v, column, digits, percent) -> str:
    d = digits.get(column, 3) if isinstance(digits, Mapping) else digits
    if isinstance(v, (Real, np.bool_)) and not isinstance(v, str):
        return format_number(v, d, column in percent)
    return "–" if v is None else str(v)


def _html(data, group, names, cells, keys, colour, html_columns, caption) -> str:
    rows = []
    styles = {}
    for spec, cmap in colour.items():
        members = [c for c in (spec if isinstance(spec, tuple) else (spec,)) if c in data.columns]
        for c in members:
            if c in group:
                styles[c] = _colours(data[c], cmap, data[members] if len(members) > 1 else None)
    head = "".join(f"<th>{html.escape(str(names[c]))}</th>" for c in group)
    intervals = {c for c in group if _is_interval(data[c])}
    for i in range(len(data)):
        tds = []
        for c in group:
            v = data[c].iloc[i]
            numeric = isinstance(v, (Real, np.bool_)) and not isinstance(v, str)
            cls = "key" if c in keys else ("num" if numeric or c in intervals else ("text" if _is_text(data[c]) else ""))
            style = f' style="{styles[c][i]}"' if c in styles and styles[c][i] else ""
            text = cells[c][i] if c in html_columns else html.escape(cells[c][i])
            attrs = f' class="{cls}"' if cls else ""
            if cls in ("text", "") and not numeric:
                attrs += ' dir="auto"'
            tds.append(f"<td{attrs}{style}>{text}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f'<div class="mlclt-scroll"><table class="mlclt-table">{cap}<thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></div>')


# ---- the chapters' summary tables (DataFrames; show them with ``table``) ------------------

def final_losses(metrics: Mapping[str, pd.DataFrame], languages) -> pd.DataFrame:
    """Last validation loss per model (rows) and language (columns), and the
    English-dominance gap: mean loss of the other languages minus English's."""
    from ..models.load import val_loss_columns

    rows = {}
    for name, df in metrics.items():
        val = val_loss_columns(df, languages)
        last = df.dropna(subset=list(val.values())).iloc[-1]
        rows[name] = {lang: float(last[col]) for lang, col in val.items()}
    table = pd.DataFrame(rows).T[list(languages)]
    table.index.name = "model"
    if "en" in table:
        others = [lang for lang in languages if lang != "en"]
        table["gap to English"] = table[others].mean(axis=1) - table["en"]
    return table


def mixture_report_table(reports: Mapping[str, Mapping[str, Mapping]]) -> pd.DataFrame:
    """One row per language; per mixture its realised training tokens, their share of the
    mixture and the passes over the language's text (above 1: the text is repeated)."""
    columns = {}
    for mixture, per_lang in reports.items():
        total = sum(r["realised_tokens"] for r in per_lang.values())
        columns[f"tokens, {mixture}"] = {lang: r["realised_tokens"] for lang, r in per_lang.items()}
        columns[f"share, {mixture}"] = {lang: r["realised_tokens"] / total for lang, r in per_lang.items()}
        columns[f"passes, {mixture}"] = {lang: r["epochs"] for lang, r in per_lang.items()}
    out = pd.DataFrame(columns)
    out.index.name = "language"
    return out


def transcoder_comparison_table(results: Mapping[str, Mapping[str, pd.DataFrame]]) -> pd.DataFrame:
    """One row per transcoder variant: mean FVU, mean L0, dead fraction, CE recovered, KL."""
    rows = {}
    for label, r in results.items():
        layers = r["layers"]
        if "language" in layers:
            layers = layers[layers["language"] == "all"]
        lang = r["languages"].set_index("language")
        pooled = lang.loc["all"] if "all" in lang.index else lang.mean(numeric_only=True)
        rows[label] = {"mean FVU": layers["fvu"].mean(), "mean L0": layers["l0"].mean(),
                       "dead fraction": layers["dead_fraction"].mean(),
                       "CE recovered": pooled["ce_recovered"], "KL": pooled["kl"],
                       "top-1 agreement": pooled["top1_agreement"]}
    out = pd.DataFrame(rows).T
    out.index.name = "transcoder"
    return out
