"""The header every chapter runs: one call that turns the notebook's parameters into the
validated preset and the run name, sets the book's figure style and shows the run's
parameters once, in a small box."""

from __future__ import annotations

import html
import json
from typing import Any, Mapping


def run_box_html(cfg: Mapping[str, Any], run: str) -> str:
    overrides = cfg.get("overrides") or {}
    parts = [f"preset <b>{html.escape(cfg['name'])}</b> (version {cfg.get('version', '?')})",
             f"run <b>{html.escape(run)}</b>"]
    if overrides:
        parts.append("overrides: " + ", ".join(f"<code>{html.escape(k)}={html.escape(json.dumps(v))}</code>"
                                               for k, v in overrides.items()))
    else:
        parts.append("no overrides")
    return f'<div class="mlclt-run-box">This run: {" · ".join(parts)}</div>'


def start_chapter(preset: str = "tiny", run: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> tuple[dict, str]:
    """``(cfg, run)``: the preset with its overrides (validated, a bad key or value raises
    before any work) and the run name (default: the preset's name)."""
    from .presets import load_preset
    from .viz.style import use_book_style

    cfg = load_preset(preset, overrides or {})
    run = run or preset
    use_book_style()
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display

        if get_ipython() is not None:
            display(HTML(run_box_html(cfg, run)))
    except ImportError:
        pass
    return cfg, run
