"""The project's quality targets for a trained CLT, and the check of a run against them.

The targets were set for the ``small`` preset; a ``tiny`` run is not expected to meet them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CLT_TARGETS = {"mean FVU": ("≤", 0.20), "mean L0": ("≤", 32.0), "CE loss recovered": ("≥", 0.80),
               "dead features": ("≤", 0.10)}


def check_targets(layers: pd.DataFrame, languages: pd.DataFrame) -> pd.DataFrame:
    """Per model and target: the measured value and whether it meets the target.

    ``layers``: per-layer rows (index level ``model``; columns fvu, l0, dead_fraction) of
    the pooled language set; ``languages``: replacement metrics (index level ``model``;
    column language with a pooled row ``all``; column ce_recovered). Returns columns
    model, metric, criterion, value, met (bool), one row per model and target, in the
    shape of a results record.
    """
    rows = []
    pooled = languages.reset_index(level="model")
    pooled = pooled[pooled["language"] == "all"].set_index("model")
    for name, df in layers.groupby(level="model", sort=False):
        measured = {"mean FVU": df["fvu"].mean(), "mean L0": df["l0"].mean(),
                    "CE loss recovered": pooled.loc[name, "ce_recovered"] if name in pooled.index else np.nan,
                    "dead features": df["dead_fraction"].mean()}  # same F in every layer
        for target, (op, bound) in CLT_TARGETS.items():
            v = float(measured[target])
            met = bool(v <= bound if op == "≤" else v >= bound)   # NaN never meets a target
            rows.append({"model": name, "metric": target, "criterion": f"{op} {bound:g}",
                         "value": v, "met": met})
    return pd.DataFrame(rows, columns=["model", "metric", "criterion", "value", "met"])
