"""Deciding a claim: interval helpers against closed forms, the verdict rule, verdict rows
through the results record, and the claims table with a chapter missing."""

import math

import numpy as np
import pandas as pd
import pytest

from mlclt_utils import claims
from mlclt_utils.claims import (CLAIMS, bootstrap, claims_table, decide, mean_interval,
                                paired_difference, read_verdicts, t_interval, verdict, wilson)
from mlclt_utils.results import record


def test_wilson_matches_the_closed_form():
    p, lo, hi = wilson(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 20)[1] == 0.0 and wilson(0, 20)[2] == pytest.approx(0.1611, abs=1e-4)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)


def test_t_interval_uses_t_quantiles_for_few_units():
    mean, lo, hi = t_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)            # t(0.975, 4) · s / √n
    assert mean == 3 and lo == pytest.approx(3 - half) and hi == pytest.approx(3 + half)
    assert mean_interval([1, 2, 3, 4, 5]) == (mean, lo, hi)    # few units: the t interval
    assert math.isnan(t_interval([1.0])[1])


def test_bootstrap_interval_covers_the_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        x = rng.exponential(1.0, 60)                         # skewed, true mean 1
        _, lo, hi = bootstrap(x, np.mean, n_boot=400, seed=trial)
        covered += lo < 1.0 < hi
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_difference_resamples_units_together():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, 200)                             # large spread shared by both arms
    est, lo, hi = paired_difference(base + 0.3 + rng.normal(0, 0.1, 200), base)
    assert lo > 0.25 and hi < 0.35 and lo < est < hi
    with pytest.raises(ValueError, match="same units"):
        paired_difference([1, 2], [1, 2, 3])


def test_decide_in_both_directions():
    assert decide(0.1, 0.3) == "holds" and decide(-0.3, -0.1) == "fails" and decide(-0.1, 0.1) == "inconclusive"
    assert decide(-0.3, -0.1, direction="less") == "holds"
    assert decide(0.5, 0.9, null=1.0) == "fails"
    assert decide(float("nan"), 1.0) == "inconclusive"
    with pytest.raises(ValueError, match="direction"):
        decide(0, 1, direction="up")


def _row(claim, v, chapter, model="m", counted=True):
    lo, hi = {"holds": (0.1, 0.2), "fails": (-0.2, -0.1), "inconclusive": (-0.1, 0.1)}[v]
    return verdict(claim, "a statistic", (lo + hi) / 2, lo, hi, control="a control", n_units=10,
                   units="verses", chapter=chapter, model=model, counted=counted,
                   note="" if counted else "not trained on")


def test_verdict_rows_refuse_unknown_claims_and_compute_the_verdict():
    assert _row("A1", "holds", "04")["verdict"] == "holds"
    with pytest.raises(ValueError, match="unknown claim 'Z9'"):
        verdict("Z9", "s", 0, 0, 0, control="c", n_units=1, units="u", chapter="04")


def test_claims_table_reads_recorded_rows_and_marks_missing_chapters(tmp_path):
    record("r", "04", [], root=tmp_path, verdicts=[_row("A1", "holds", "04", "a"),
                                                    _row("A1", "holds", "04", "b"),
                                                    _row("A2", "holds", "04", counted=False)])
    record("r", "10", [], root=tmp_path, verdicts=[_row("C1", "holds", "10", "a"),
                                                    _row("C1", "fails", "10", "b")])
    rows = read_verdicts("r", tmp_path)
    assert len(rows) == 5 and rows["counted"].dtype == bool
    table = claims_table(rows).set_index("claim")
    assert list(table.index) == list(CLAIMS) and len(table) == 13
    assert table.loc["A1", "verdict"] == "holds" and table.loc["A1", "rows"] == "2 holds"
    assert table.loc["C1", "verdict"] == "inconclusive"           # rows disagree
    assert table.loc["A2", "verdict"] == "inconclusive"           # shown, nothing counted
    assert table.loc["B4", "verdict"] == "not measured"           # chapter 09 never ran
    assert table.loc["A5", "verdict"] == "not measured"


def test_record_refuses_a_verdict_row_of_another_chapter(tmp_path):
    with pytest.raises(ValueError, match="recorded by chapter '05'"):
        record("r", "05", [], root=tmp_path, verdicts=[_row("A1", "holds", "04")])
    with pytest.raises(ValueError, match="claims.verdict"):
        record("r", "04", [], root=tmp_path, verdicts=[{"claim": "A1"}])


def test_sentence_leads_with_claim_and_verdict():
    s = claims.sentence(_row("B4", "fails", "09", "s-en50"))
    assert s.startswith("**B4 (s-en50): fails.**") and "10 verses" in s
    assert "not counted (not trained on)" in claims.sentence(_row("A2", "holds", "04", counted=False))


def test_landing_table_links_chapters_and_says_what_tiny_verdicts_mean():
    rows = pd.DataFrame([_row("A1", "holds", "04")])
    text = claims.landing_markdown(rows, "tiny", "abcdef0123456789", "2026-12-03",
                                   {"04": "/book/chapters/04_shared_features"})
    assert "{doc}`04 </book/chapters/04_shared_features>`" in text and "`abcdef012345`" in text
    assert "about the code running" in text
    assert "| A5 |" in text and "not measured" in text
    assert "about the code running" not in claims.landing_markdown(rows, "small", "x", "d")
