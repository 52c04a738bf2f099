"""Run the chain of chapters with papermill, then build the book.

    python -m mlclt_utils.runner --preset tiny                 # every chapter, then the book
    python -m mlclt_utils.runner --preset small --chapters 01 02 --no-build
    python -m mlclt_utils.runner --preset tiny --param training.tokens=200000

Chapters are executed in the order of ``_toc.yml`` from ``notebooks/NN_slug.ipynb`` into
``book/chapters/NN_slug.ipynb``. The first failing chapter stops the run with its name and
the failing cell. The book is then built with Jupyter Book in strict mode (warnings are
errors). Artifacts go to ``$MLCLT_ARTIFACTS``, by default ``artifacts/`` at the repository root.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .artifacts import ENV_ROOT
from .presets import PRESETS, load_preset, parse_override
from .viz.progress import PLAIN_ENV

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
# executed chapters go where the book reads them; MLCLT_EXECUTED sends them elsewhere (a run
# that is not the book's, e.g. a test's)
EXECUTED = Path(os.environ.get("MLCLT_EXECUTED", REPO / "book" / "chapters"))


class ChapterFailed(RuntimeError):
    pass


def chapter_sources() -> list[Path]:
    """Chapter sources in toc order (the toc lists book/chapters/NN_slug entries)."""
    import yaml

    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    entries = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                entries.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    names = [Path(e).name for e in entries if e.startswith("book/chapters/")]
    sources = [NOTEBOOKS / f"{n}.ipynb" for n in names]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise FileNotFoundError(f"_toc.yml lists chapters without a source notebook: {missing}")
    return sources


def select(sources: list[Path], wanted: list[str] | None) -> list[Path]:
    if not wanted:
        return sources
    by_prefix = {s.name.split("_")[0]: s for s in sources}
    chosen = []
    for w in wanted:
        key = w.split("_")[0].zfill(2)
        if key not in by_prefix:
            raise ValueError(f"unknown chapter {w!r}; chapters: {', '.join(sorted(by_prefix))}")
        chosen.append(by_prefix[key])
    return sorted(chosen)



def run_chapter(source: Path, parameters: dict, kernel: str = "python3") -> Path:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    EXECUTED.mkdir(parents=True, exist_ok=True)
    out = EXECUTED / source.name
    tmp = out.with_name(f".running.{out.name}")
    try:
        pm.execute_notebook(str(source), str(tmp), parameters=parameters, kernel_name=kernel,
                            cwd=str(NOTEBOOKS), progress_bar=False, log_output=True)
    except PapermillExecutionError as err:
        raise ChapterFailed(
            f"chapter {source.stem} failed in cell {err.exec_count} "
            f"({err.ename}: {err.evalue}); the partial notebook is {tmp}") from None
    tidy_executed(tmp)
    os.replace(tmp, out)
    return out


# Chapters that cannot run on a run's loaded models (mlclt_utils.sources), with the reason
# their page gives instead of results
SKIPPED_WHEN_LOADED = {
    "08": "it finetunes the base model and trains CLTs on the finetunes: training this chain "
          "does not do for loaded models.",
}


def skip_reason(source: Path, preset: dict) -> str | None:
    """Why ``source`` is not run for this preset (None: it runs)."""
    from .sources import loads_models

    chapter = source.name[:2]
    if chapter in SKIPPED_WHEN_LOADED and loads_models(preset):
        return (f"This run loads its models (source.models) instead of training them, so this "
                f"chapter was skipped: {SKIPPED_WHEN_LOADED[chapter]} Run it with a preset "
                "that trains its models (tiny, small, colab, paper).")
    return None


def write_skipped(source: Path, reason: str) -> Path:
    """The chapter's page for a run that skips it: its title and the reason, no code."""
    import nbformat

    nb = nbformat.read(str(source), as_version=4)
    title = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    nb.cells = ([title] if title is not None else []) + [nbformat.v4.new_markdown_cell(f"```{{note}}\n{reason}\n```")]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"skipped-{i}"
    EXECUTED.mkdir(parents=True, exist_ok=True)
    out = EXECUTED / source.name
    tmp = out.with_name(f".skipped.{out.name}")
    nbformat.write(nb, str(tmp))
    os.replace(tmp, out)
    return out


HIDDEN_TAGS = {"parameters", "injected-parameters"}


# a tqdm line: "desc: 40%|####      | 4/10 [00:01<00:02, 3.1it/s]" (any bar characters)
PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?\s*\[|\d+(?:it|s)?\s*\[\d+:\d\d(?::\d\d)?(?:<[\d:?]+)?,")


def is_progress(text: str) -> bool:
    """Whether a line of stream output is a progress bar's (tqdm's format)."""
    return bool(PROGRESS_LINE.search(text))


def tidy_executed(path: Path) -> None:
    """Make an executed chapter read as a book page: the notebook's and papermill's
    parameter cells are removed from the page (the chapter's header shows the run's
    parameters once), the code of every other cell is folded under a "show code" button
    (``hide-input``) unless the chapter already tags it, and progress-bar lines are taken
    out of the stderr stream outputs (the book's own bars, ``viz.progress``, and other
    libraries'; papermill has logged them while the chapter ran), so the page reads as text,
    figures and tables."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if HIDDEN_TAGS & set(tags) and "remove-cell" not in tags:
            tags.append("remove-cell")
        elif cell.cell_type == "code" and not any(t.startswith(("remove-", "hide-")) for t in tags):
            tags.append("hide-input")
        if cell.cell_type == "code":
            cell.outputs = [o for o in map(_without_progress, cell.outputs) if o is not None]
    nbformat.write(nb, str(path))


def _without_progress(output):
    """A stderr stream output without its progress-bar lines (None when nothing is left)."""
    if output.get("output_type") != "stream" or output.get("name") != "stderr":
        return output
    # a bar redraws with carriage returns: each redraw is a line of its own
    lines = re.split(r"(?<=\n)|\r", output.get("text", ""))
    kept = "".join(l for l in lines if l and not is_progress(l))
    if not kept.strip():
        return None
    output["text"] = kept
    return output


LANDING = EXECUTED / "claims_landing.md"    # included by book/intro.md


def write_landing(preset: str, run: str, overrides: dict | None = None) -> Path:
    """The landing page's claims table for the run the book is built from."""
    import datetime

    from .artifacts import Stage, atomic_path, config_hash
    from .claims import landing_markdown, read_verdicts

    cfg = load_preset(preset, overrides or {})
    folder = Stage(run, "results").path
    stamps = [p.stat().st_mtime for p in folder.glob("*/verdicts.csv")] if folder.exists() else []
    date = datetime.date.fromtimestamp(max(stamps)).isoformat() if stamps else "no recorded verdicts"
    chapters = {s.name[:2]: f"/book/chapters/{s.stem}" for s in chapter_sources()}
    EXECUTED.mkdir(parents=True, exist_ok=True)
    with atomic_path(LANDING) as tmp:
        Path(tmp).write_text(landing_markdown(read_verdicts(run), preset, config_hash(cfg), date, chapters))
    return LANDING


def build_book(strict: bool = True, preset: str = "tiny", run: str | None = None,
               overrides: dict | None = None) -> Path:
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(REPO)]
    if strict:
        cmd += ["--warningiserror", "--keep-going"]
    missing = [s.name for s in chapter_sources() if not (EXECUTED / s.name).exists()]
    if missing:
        raise ChapterFailed(f"cannot build the book: chapters not executed yet: {missing}")
    write_landing(preset, run or preset, overrides)
    subprocess.run(cmd, check=True, cwd=REPO)
    return REPO / "_build" / "html" / "index.html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--run", default=None, help="run name (artifact folder); defaults to the preset")
    ap.add_argument("--chapters", nargs="*", help="chapter numbers to run, e.g. 01 02 (default: all)")
    ap.add_argument("--param", action="append", default=[], help="override, e.g. training.tokens=2e5")
    ap.add_argument("--no-build", action="store_true", help="run chapters only")
    ap.add_argument("--build-only", action="store_true", help="build the book from executed chapters")
    args = ap.parse_args(argv)

    try:  # fail here, before any work, on a bad preset, key or value
        overrides = dict(parse_override(p) for p in args.param)
        load_preset(args.preset, overrides)
        chapters = select(chapter_sources(), args.chapters)
    except (ValueError, FileNotFoundError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    parameters = {"preset": args.preset, "run": args.run or args.preset, "overrides": overrides}
    # Chapters run with the notebooks folder as working directory; without this the default
    # relative root would put the artifacts there instead of at the repository root.
    os.environ.setdefault(ENV_ROOT, str(REPO / "artifacts"))
    os.environ[PLAIN_ENV] = "1"        # progress bars as text in the executed chapters

    try:
        if not args.build_only:
            cfg = load_preset(args.preset, overrides)
            for source in chapters:
                start = time.time()
                reason = skip_reason(source, cfg)
                if reason:
                    write_skipped(source, reason)
                    print(f"== chapter {source.stem} skipped: {reason}", flush=True)
                    continue
                print(f"== chapter {source.stem} ({args.preset})", flush=True)
                run_chapter(source, parameters)
                print(f"== chapter {source.stem} done in {time.time() - start:.0f} s", flush=True)
        if not args.no_build:
            index = build_book(preset=args.preset, run=parameters["run"], overrides=overrides)
            print(f"book built: {index}")
    except ChapterFailed as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        print(f"ERROR: the book build failed (exit {err.returncode})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
