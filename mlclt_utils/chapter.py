"""The header and footer every chapter runs. ``start_chapter`` turns the notebook's
parameters into the validated preset and the run name, sets the book's figure style and
shows the run's parameters and device once, in a small box. ``run_record`` is what the
chapter ends with (``results.record`` stores and shows it; ``end_chapter`` only shows it):
preset, configuration hash, package versions, device and wall time."""

from __future__ import annotations

import html
import json
import time
from typing import Any, Mapping

PACKAGES = ("torch", "transformer-lens", "circuit-tracer", "sae-lens", "transformers", "numpy")
_started: dict[str, Any] = {}  # what start_chapter saw: the preset and the start time


def run_box_html(cfg: Mapping[str, Any], run: str) -> str:
    overrides = cfg.get("overrides") or {}
    parts = [f"preset <b>{html.escape(cfg['name'])}</b> (version {cfg.get('version', '?')})",
             f"run <b>{html.escape(run)}</b>"]
    if overrides:
        parts.append("overrides: " + ", ".join(f"<code>{html.escape(k)}={html.escape(json.dumps(v))}</code>"
                                               for k, v in overrides.items()))
    else:
        parts.append("no overrides")
    from .device import describe_device

    parts.append(f"device <b>{html.escape(describe_device())}</b>")
    return f'<div class="mlclt-run-box">This run: {" · ".join(parts)}</div>'


def run_record(cfg: Mapping[str, Any] | None = None) -> dict:
    """The record a chapter ends with: preset, configuration hash (of the validated preset
    with its overrides), package versions, device and the wall time since
    ``start_chapter``. ``cfg`` defaults to the preset ``start_chapter`` loaded."""
    from importlib.metadata import PackageNotFoundError, version

    from .artifacts import config_hash
    from .device import describe_device

    cfg = cfg if cfg is not None else _started.get("cfg")
    if cfg is None:
        raise ValueError("no preset: call start_chapter first or pass cfg")
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    started = _started.get("time")
    return {"preset": cfg["name"], "overrides": dict(cfg.get("overrides") or {}),
            "config_hash": config_hash({k: v for k, v in cfg.items() if k != "overrides"}),
            "versions": versions, "device": describe_device(),
            "wall_seconds": None if started is None else round(time.time() - started, 1)}


def run_record_html(record: Mapping[str, Any]) -> str:
    wall = record.get("wall_seconds")
    wall = ("?" if wall is None else f"{wall:.0f} s" if wall < 60
            else f"{int(wall // 60)} min {wall % 60:.0f} s")
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return (f'<div class="mlclt-run-box">This chapter ran with preset <b>{html.escape(record["preset"])}</b> '
            f'(configuration <code>{record["config_hash"]}</code>) on {html.escape(record["device"])} '
            f'in {wall} · {html.escape(versions)}</div>')


def show_run_record(record: Mapping[str, Any]) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        if get_ipython() is not None:
            display(HTML(run_record_html(record)))
    except ImportError:
        pass


def end_chapter(cfg: Mapping[str, Any] | None = None) -> dict:
    """Show the run record (for chapters that record no results) and return it."""
    record = run_record(cfg)
    show_run_record(record)
    return record


def start_chapter(preset: str = "tiny", run: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> tuple[dict, str]:
    """``(cfg, run)``: the preset with its overrides (validated, a bad key or value raises
    before any work) and the run name (default: the preset's name)."""
    from .presets import load_preset
    from .viz.style import use_book_style

    cfg = load_preset(preset, overrides or {})
    run = run or preset
    _started.update(cfg=cfg, time=time.time())
    use_book_style()
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        if get_ipython() is not None:
            display(HTML(run_box_html(cfg, run)))
    except ImportError:
        pass
    return cfg, run
