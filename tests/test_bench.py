"""The benchmarks' own plumbing (their figures are printed, never asserted)."""


def test_the_controls_benchmark_rebuilds_in_a_scratch_root_that_links_the_rest(tmp_path):
    from mlclt_utils.bench.controls import _scratch

    run = tmp_path / "root" / "small"
    for kind in ("models", "clt", "interventions"):
        (run / kind / "s-en50").mkdir(parents=True)
    scratch = _scratch(tmp_path / "root", "small", "interventions", tmp_path / "scratch")
    made = {p.name: p.is_symlink() for p in (scratch / "small").iterdir()}
    assert made == {"models": True, "clt": True}                   # the rebuilt kind is left out
    assert (scratch / "small" / "models" / "s-en50").is_dir()
