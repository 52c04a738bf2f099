"""How a claim is decided: intervals, the verdict rule, verdict rows and the claims table.

A *verdict row* says, for one claim of the book (A1 … C4) and usually one model: the
statistic in words, its estimate, a 95 % interval over the units that vary (verses,
prompts, text batches, latents, neurons), the value it must beat (a null or a matched
control), and the verdict:

* **holds**: the interval excludes the null in the claimed direction;
* **fails**: it excludes the null the other way;
* **inconclusive**: it straddles the null.

Chapters build rows with :func:`verdict` and write them with their results record
(``results.record(..., verdicts=rows)``); chapter 11 and the landing page read them back with
:func:`read_verdicts` and :func:`claims_table`. A row can be *shown but not counted*
(``counted=False``, with the reason in ``note``): a language the model never saw, an SAE below
the quality bar, a checkpoint before training has moved.

Intervals: :func:`mean_interval` (t quantiles under 30 units, a percentile bootstrap
above), :func:`paired_difference` (the same on per-unit differences), :func:`wilson` for
proportions and :func:`bootstrap` for any statistic of resampled units. They are written
here, not taken from scipy.stats.bootstrap, because the rows need one rule for "few units"
across chapters and a seed that makes a rebuilt book print the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
FEW_UNITS = 30          # below this many units an interval of a mean uses t quantiles
VERDICTS = ("holds", "fails", "inconclusive")
DIRECTIONS = ("greater", "less")
COLUMNS = ["claim", "model", "statistic", "estimate", "low", "high", "null", "control",
           "criterion", "verdict", "n_units", "units", "counted", "note", "chapter"]


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    chapter: str
    study: str          # what the study reported, in words


CLAIMS: dict[str, Claim] = {c.id: c for c in [
    Claim("A1", "the same features fire for the same content across languages; beyond a "
          "different-sentence control the overlap is highest in the middle layers", "04",
          "shared features across languages, overlap lowest at the first and last layers and "
          "highest in the middle (an inverted U)"),
    Claim("A2", "the shared space has the same structure in a model trained without English", "04",
          "the inverted U appears in the model trained without English too"),
    Claim("A3", "language identity is decodable from the first layers beyond what the token "
          "says; language features sit in late layers and point at their language's vocabulary",
          "05", "language linearly decodable from the first layers; high-frequency language "
          "features in late layers drive decoding"),
    Claim("A4", "clamping one language's features and adding another's switches the output "
          "language, more than a matched random control, keeping the content", "07",
          "interventions on language features switch the output language"),
    Claim("A5", "a weak language has dim late language features, weak middle clusters and early "
          "word-reassembly features; finetuning strengthens them", "08",
          "finetuning on the weak language strengthens its features and their links"),
    Claim("B1", "early in training latents are mostly monolingual; bilingual latents appear later",
          "09", "monolingual latents first, bilingual latents later in training"),
    Claim("B2", "bilingual latents concentrate in the middle layers", "09",
          "bilingual latents concentrate in the middle layers"),
    Claim("B3", "the larger model has more bilingual latents at equal SAE sparsity", "09",
          "the larger model has more bilingual latents"),
    Claim("B4", "stitching the final model's bilingual latents into a mid-training checkpoint "
          "lowers its loss more than monolingual latents of equal count", "09",
          "bilingual latents help the mid-training model more than monolingual ones"),
    Claim("C1", "language regions (LRDS) and semantic alignment (SADS) exist; SADS grows with "
          "training", "10", "LRDS and SADS are positive and SADS grows over training"),
    Claim("C2", "SADS grows with model size", "10", "larger models align meaning more"),
    Claim("C3", "key linguistic neurons concentrate in the first and last layers", "10",
          "key neurons concentrate in the first and last layers and get denser in the first "
          "layers over training"),
    Claim("C4", "zeroing a language's key neurons hurts that language more than random neurons "
          "and more than the other languages", "10",
          "zeroing key neurons hurts their own language's perplexity most"),
]}


# ----------------------------------------------------------------------------- intervals
def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of the finite ``values`` and its Student-t interval (NaN bounds under 2 units)."""
    from scipy.stats import t

    v = _finite(values)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float, float]:
    """Share ``successes / n`` and its Wilson score interval."""
    from scipy.stats import norm

    if n <= 0:
        return math.nan, math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def proportion_difference(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL
                          ) -> tuple[float, float, float]:
    """``k1/n1 - k2/n2`` for two independent shares, with Newcombe's hybrid score interval
    (from the two Wilson intervals)."""
    p1, l1, u1 = wilson(k1, n1, level)
    p2, l2, u2 = wilson(k2, n2, level)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def bootstrap(units: Sequence | np.ndarray, statistic: Callable[[np.ndarray], float],
              n_boot: int = 1000, seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
    """``statistic`` of ``units`` (resampled along the first axis) and its percentile
    bootstrap interval. Rows of a 2-D array are resampled whole, so a statistic of several
    columns (layers, arms) measured on the same unit is paired."""
    x = np.asarray(units, dtype=float)
    if x.shape[0] == 0:
        return math.nan, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    stats = np.array([statistic(x[i]) for i in idx])
    stats = stats[np.isfinite(stats)]
    est = float(statistic(x))
    if stats.size == 0:
        return est, math.nan, math.nan
    lo, hi = np.quantile(stats, [(1 - level) / 2, 0.5 + level / 2])
    return est, float(lo), float(hi)


def mean_interval(values, n_boot: int = 1000, seed: int = 0, level: float = LEVEL
                  ) -> tuple[float, float, float]:
    """Mean and 95 % interval: t quantiles under ``FEW_UNITS`` units, bootstrap above."""
    v = _finite(values)
    if v.size < FEW_UNITS:
        return t_interval(v, level)
    return bootstrap(v, np.mean, n_boot, seed, level)


def paired_difference(a, b, n_boot: int = 1000, seed: int = 0, level: float = LEVEL
                      ) -> tuple[float, float, float]:
    """Mean of ``a - b`` over units measured both ways, with :func:`mean_interval`."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same units on both sides, got {a.shape} and {b.shape}")
    return mean_interval(a - b, n_boot, seed, level)


# ----------------------------------------------------------------------------- verdicts
def decide(low: float, high: float, null: float = 0.0, direction: str = "greater") -> str:
    """holds / fails / inconclusive for an interval against ``null`` (see module docstring)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if direction == "greater":
        return "holds" if low > null else "fails" if high < null else "inconclusive"
    return "holds" if high < null else "fails" if low > null else "inconclusive"


def verdict(claim: str, statistic: str, estimate: float, low: float, high: float, *,
            null: float = 0.0, control: str, n_units: int, units: str, chapter: str,
            direction: str = "greater", model: str | None = None, counted: bool = True,
            note: str = "") -> dict:
    """One verdict row (``COLUMNS``); the verdict is computed here, never passed in."""
    if claim not in CLAIMS:
        raise ValueError(f"unknown claim {claim!r}; allowed: {', '.join(CLAIMS)}")
    sign = ">" if direction == "greater" else "<"
    return {"claim": claim, "model": model, "statistic": statistic, "estimate": float(estimate),
            "low": float(low), "high": float(high), "null": float(null), "control": control,
            "criterion": f"95 % interval {sign} {null:g}", "verdict": decide(low, high, null, direction),
            "n_units": int(n_units), "units": units, "counted": bool(counted), "note": note,
            "chapter": chapter}


def sentence(row: Mapping) -> str:
    """The row in words, led by its claim and verdict: "A1, …: holds — estimate 0.012
    (95 % interval 0.004 to 0.020, 300 verses) against 0 (control …)"."""
    head = f"{row['claim']} ({row['model']})" if row.get("model") else row["claim"]
    status = row["verdict"] if row.get("counted", True) else f"{row['verdict']}, not counted ({row['note']})"
    return (f"**{head}: {status}.** {row['statistic']}: {_fmt(row['estimate'])} "
            f"(95 % interval {_fmt(row['low'])} to {_fmt(row['high'])}, {row['n_units']} {row['units']}) "
            f"against {_fmt(row['null'])}, {row['control']}.")


def _fmt(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


# ----------------------------------------------------------------------------- the claims table
def read_verdicts(run: str, root=None):
    """Every verdict row recorded by the chapters of ``run`` (complete records only)."""
    import pandas as pd

    from .artifacts import Stage

    folder = Stage(run, "results", root).path
    frames = []
    if folder.exists():
        for chapter in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            st = Stage(run, f"results/{chapter}", root)
            if st.is_complete() and st.file("verdicts.csv").exists():
                frames.append(pd.read_csv(st.file("verdicts.csv"), dtype={"chapter": str}))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    out["counted"] = out["counted"].astype(bool)
    return out


def combine(verdicts: Iterable[str]) -> str:
    """A claim's verdict over its counted rows: holds (fails) when every row holds (fails),
    otherwise inconclusive; "not measured" when there is no counted row."""
    v = list(verdicts)
    if not v:
        return "not measured"
    if all(x == "holds" for x in v):
        return "holds"
    if all(x == "fails" for x in v):
        return "fails"
    return "inconclusive"


def claims_table(rows):
    """One line per claim of :data:`CLAIMS`, in order: the claim, the chapter, the combined
    verdict of its counted rows and how they split, and what the study reported."""
    import pandas as pd

    rows = pd.DataFrame(rows, columns=COLUMNS) if not isinstance(rows, pd.DataFrame) else rows
    out = []
    for c in CLAIMS.values():
        mine = rows[rows["claim"] == c.id]
        counted = mine[mine["counted"].astype(bool)] if len(mine) else mine
        split = ", ".join(f"{int((counted['verdict'] == v).sum())} {v}" for v in VERDICTS
                          if (counted["verdict"] == v).any())
        out.append({"claim": c.id, "chapter": c.chapter, "question": c.claim,
                    "verdict": (combine(counted["verdict"]) if len(counted) else "inconclusive")
                    if len(mine) else "not measured",
                    "rows": split or ("shown only" if len(mine) else ""), "study": c.study})
    return pd.DataFrame(out)


def landing_markdown(rows, preset: str, config_hash: str, date: str,
                     chapters: Mapping[str, str] | None = None) -> str:
    """The claims table of the landing page (MyST): one line per claim with its verdict,
    the run it was measured on and a link to the chapter (``chapters``: number -> document
    path, e.g. ``{"04": "/book/chapters/04_shared_features"}``)."""
    table = claims_table(rows)
    lines = [f"Verdicts of this build (preset `{preset}`, configuration `{config_hash[:12]}`, "
             f"run of {date}); {{doc}}`/book/chapters/11_claims` gives each with its estimate, "
             "interval and control.", ""]
    if preset == "tiny":
        lines += ["At `tiny` the models are trained for seconds: these verdicts are about the code running, "
                  "not about the findings (a verdict that holds here may rest on shared tokens or chance "
                  "structure of an untrained-looking model).", ""]
    lines += ["| claim | question | verdict | rows | chapter |", "|---|---|---|---|---|"]
    for r in table.itertuples():
        doc = (chapters or {}).get(r.chapter)
        link = f"{{doc}}`{r.chapter} <{doc}>`" if doc else r.chapter
        lines.append(f"| {r.claim} | {r.question} | **{r.verdict}** | {r.rows} | {link} |")
    return "\n".join(lines) + "\n"
