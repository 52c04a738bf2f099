"""The benchmarks' own plumbing (their figures are printed, never asserted)."""

import pytest


def test_the_controls_benchmark_rebuilds_in_a_scratch_root_that_links_the_rest(tmp_path):
    from mlclt_utils.bench.controls import _scratch

    run = tmp_path / "root" / "small"
    for kind in ("models", "clt", "interventions"):
        (run / kind / "s-en50").mkdir(parents=True)
    scratch = _scratch(tmp_path / "root", "small", "interventions", tmp_path / "scratch")
    made = {p.name: p.is_symlink() for p in (scratch / "small").iterdir()}
    assert made == {"models": True, "clt": True}                   # the rebuilt kind is left out
    assert (scratch / "small" / "models" / "s-en50").is_dir()


def test_the_peer_comparison_names_the_package_it_needs(monkeypatch):
    import sys

    from mlclt_utils.bench.clt import peer_run

    monkeypatch.setitem(sys.modules, "clt", None)          # decode-clt not installed
    monkeypatch.setitem(sys.modules, "clt.config", None)
    with pytest.raises(ImportError, match="pip install --no-deps decode-clt"):
        peer_run(threads=1, steps=1)
