"""Tables of the chapters, computed from stage outputs."""

from __future__ import annotations

from typing import Mapping

import pandas as pd


def mixture_report_table(reports: Mapping[str, Mapping[str, Mapping]]) -> pd.DataFrame:
    """Realised training tokens (and passes over the data) per mixture and language."""
    rows = []
    for mixture, per_lang in reports.items():
        for lang, r in per_lang.items():
            rows.append({"mixture": mixture, "language": lang, "tokens": r["realised_tokens"],
                         "epochs": r["epochs"]})
    df = pd.DataFrame(rows)
    tokens = df.pivot(index="mixture", columns="language", values="tokens")
    share = tokens.div(tokens.sum(axis=1), axis=0)
    epochs = df.pivot(index="mixture", columns="language", values="epochs")
    return pd.concat({"tokens": tokens, "share": share.round(3), "epochs": epochs.round(3)}, axis=1)


# ---- chapter 02 -------------------------------------------------------------------------

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
    return pd.DataFrame(rows).T.round(4)
