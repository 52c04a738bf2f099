"""The quality-target check and the results records a chapter writes."""

import math

import numpy as np
import pandas as pd
import pytest

from mlclt_utils import results
from mlclt_utils.artifacts import Stage
from mlclt_utils.clt.targets import CLT_TARGETS, check_targets


def _tables(fvu, l0, dead, ce):
    layers = pd.DataFrame({"fvu": fvu, "l0": l0, "dead_fraction": dead},
                          index=pd.MultiIndex.from_tuples([("a", i) for i in range(len(fvu))],
                                                          names=["model", None]))
    languages = pd.DataFrame({"language": ["en", "all"], "ce_recovered": [0.1, ce]},
                             index=pd.Index(["a", "a"], name="model"))
    return layers, languages


def test_targets_on_known_values():
    # mean FVU 0.2 exactly meets "<= 0.20"; mean L0 40 misses "<= 32"; the pooled CE row is read
    layers, languages = _tables([0.1, 0.3], [30.0, 50.0], [0.0, 0.1], 0.85)
    t = check_targets(layers, languages).set_index("metric")
    assert list(t.index) == list(CLT_TARGETS)
    assert t.loc["mean FVU", "value"] == pytest.approx(0.2) and t.loc["mean FVU", "met"]
    assert t.loc["mean L0", "value"] == 40.0 and not t.loc["mean L0", "met"]
    assert t.loc["CE loss recovered", "value"] == 0.85 and t.loc["CE loss recovered", "met"]
    assert t.loc["dead features", "value"] == pytest.approx(0.05) and t.loc["dead features", "met"]
    assert t.loc["CE loss recovered", "criterion"] == "≥ 0.8"


def test_a_missing_pooled_row_never_meets_a_target():
    layers, languages = _tables([0.1], [1.0], [0.0], 0.9)
    languages = languages[languages["language"] != "all"]
    t = check_targets(layers, languages).set_index("metric")
    assert math.isnan(t.loc["CE loss recovered", "value"]) and not t.loc["CE loss recovered", "met"]


def test_results_round_trip_and_gather(tmp_path):
    up = Stage("r", "clt_eval/a", tmp_path)
    up.start()
    up.finish({"x": 1})
    rows = [{"model": "a", "metric": "mean FVU", "value": np.float64(0.25), "criterion": "≤ 0.2",
             "met": False},
            {"metric": "languages", "value": 5}]
    results.record("r", "03", rows, inputs=[up], root=tmp_path)
    results.record("r", "02", [{"metric": "gap", "value": float("nan")}], root=tmp_path)
    df = results.read("r", "03", tmp_path)
    assert list(df.columns) == results.COLUMNS
    assert df.loc[0, "value"] == 0.25 and not df.loc[0, "met"] and df.loc[0, "chapter"] == "03"
    everything = results.read_all("r", tmp_path)
    assert list(everything["chapter"]) == ["02", "03", "03"]
    assert everything["value"].isna().tolist() == [True, False, False]
    # rebuilding what the numbers came from makes the record stale
    up.start()
    up.finish({"x": 2})
    with pytest.raises(Exception, match="clt_eval/a"):
        results.read("r", "03", tmp_path)


def test_bad_rows_are_named(tmp_path):
    with pytest.raises(ValueError, match="needs 'metric' and 'value'"):
        results.record("r", "03", [{"metric": "x"}], root=tmp_path)
    with pytest.raises(ValueError, match="unknown results fields \\['unit'\\]"):
        results.record("r", "03", [{"metric": "x", "value": 1, "unit": "s"}], root=tmp_path)


def test_a_chapter_run_keeps_its_record_beside_its_numbers(tmp_path, monkeypatch):
    import json

    from mlclt_utils import chapter

    monkeypatch.setattr(chapter, "_started", {})
    results.record("r", "02", [{"metric": "x", "value": 1}], root=tmp_path)
    assert not Stage("r", "results/02", tmp_path).file("run.json").exists()  # no chapter started
    cfg, _ = chapter.start_chapter("tiny", overrides={"training.tokens": 4096})
    results.record("r", "02", [{"metric": "x", "value": 1}], root=tmp_path)
    record = json.loads(Stage("r", "results/02", tmp_path).file("run.json").read_text())
    assert record["preset"] == "tiny" and record["overrides"] == {"training.tokens": 4096}
    from mlclt_utils.device import describe_device

    assert record["device"] == describe_device() and "torch" in record["versions"] and record["wall_seconds"] >= 0
    assert record["config_hash"] != chapter.run_record(chapter.start_chapter("tiny")[0])["config_hash"]
