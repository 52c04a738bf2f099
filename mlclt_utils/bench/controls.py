"""What the repeated control draws cost: ``python -m mlclt_utils.bench controls --preset small``.

Three parts of the book draw their controls several times: chapter 07's random-feature
steering (``interventions.controls``), chapter 09's monolingual and random stitching
(``bilingual.control_draws``) and chapter 10's random-neuron ablations
(``neurons.ablation_draws``). For each, this times the work with one draw and with the
preset's draws and prints the difference. A stage is rebuilt in a scratch artifact root whose
other stage folders are links to the run's own, so the run's artifacts are never rewritten;
the ablations are timed by calling ``neurons.ablation_table`` on each model's key neurons.
The run must be built up to chapter 10 (and chapter 09's bilingual run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _scratch(root: Path, run: str, rebuilt: str, into: Path) -> Path:
    """``into/<run>`` with every stage kind of ``root/<run>`` linked, except ``rebuilt``."""
    out = into / run
    out.mkdir(parents=True)
    for kind in (root / run).iterdir():
        if kind.name != rebuilt:
            (out / kind.name).symlink_to(kind.resolve(), target_is_directory=True)
    return into


def _time_stage(kind: str, preset, run: str, key: str, root: Path) -> float:
    from .. import stages

    with tempfile.TemporaryDirectory() as tmp:
        scratch = _scratch(root, run, kind, Path(tmp))
        t = time.perf_counter()
        stages.build(kind, preset, run, key, scratch, progress=False)
        return time.perf_counter() - t


def _time_ablations(preset, run: str, root: Path, draws: int) -> float:
    from .. import stages
    from ..neurons import ablation_table
    from ..presets import mixture_name, size_models

    n_ctx = preset["models"]["n_ctx"]
    rows = max(1, preset["neurons"]["ablation_tokens"] // n_ctx)
    data = stages.load_built("data", run, mixture_name(preset["models"]["size_comparison_share"]), root)
    total = 0.0
    for name in size_models(preset):
        model = stages.load_built("models", run, name, root)
        key = stages.load_built("neurons", run, name, root)
        sets = {lang: data["validation"][lang][:rows] for lang in key["languages"] if lang in data["validation"]}
        t = time.perf_counter()
        ablation_table(model, sets, key["key_units"], list(sets), draws, preset["seed"], progress=False)
        total += time.perf_counter() - t
    return total


def run_controls_benchmark(preset_name: str, run: str | None, root) -> list[dict]:
    from ..presets import BILINGUAL_SUFFIX, bilingual_preset, load_preset, reference_model, size_models

    base = load_preset(preset_name)
    run = run or preset_name
    root = Path(root).resolve()
    rows = []
    parts = [("07 interventions", "interventions.controls", base["interventions"]["controls"]),
             ("09 stitching", "bilingual.control_draws", base["bilingual"]["control_draws"]),
             ("10 ablations", "neurons.ablation_draws", base["neurons"]["ablation_draws"])]
    for part, key, draws in parts:
        seconds = {}
        for n in sorted({1, draws}):
            p = load_preset(preset_name, {key: n})
            if part.startswith("07"):
                seconds[n] = _time_stage("interventions", p, run, reference_model(p), root)
            elif part.startswith("09"):
                bi = bilingual_preset(p)
                seconds[n] = _time_stage("stitching", bi, run + BILINGUAL_SUFFIX, size_models(bi)[0], root)
            else:
                seconds[n] = _time_ablations(p, run, root, n)
            print(f"{part}: {key} = {n}: {seconds[n]:.1f} s", flush=True)
        rows.append({"part": part, "key": key, "draws": draws, "one_draw_s": seconds[1],
                     "all_draws_s": seconds[draws], "extra_s": seconds[draws] - seconds[1]})
    total = sum(r["extra_s"] for r in rows)
    print(f"\n{'part':18s} {'draws':>5s} {'1 draw (s)':>11s} {'all (s)':>9s} {'extra (s)':>10s}")
    for r in rows:
        print(f"{r['part']:18s} {r['draws']:5d} {r['one_draw_s']:11.1f} {r['all_draws_s']:9.1f} {r['extra_s']:10.1f}")
    print(f"{'extra in all':18s} {'':5s} {'':11s} {'':9s} {total:10.1f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    from ..artifacts import artifacts_root

    ap = argparse.ArgumentParser(prog="python -m mlclt_utils.bench controls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--run", default=None, help="run name (default: the preset's)")
    ap.add_argument("--root", default=None, help="artifact root (default $MLCLT_ARTIFACTS or ./artifacts)")
    opts = ap.parse_args(argv)
    run_controls_benchmark(opts.preset, opts.run, artifacts_root(opts.root))
