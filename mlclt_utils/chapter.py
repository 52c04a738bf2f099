"""The header every chapter runs: one call that turns the notebook's parameters into the
validated preset and the run name."""

from __future__ import annotations

from typing import Any, Mapping


def start_chapter(preset: str = "tiny", run: str | None = None,
                  overrides: Mapping[str, Any] | None = None) -> tuple[dict, str]:
    """``(cfg, run)``: the preset with its overrides (validated, a bad key or value raises
    before any work) and the run name (default: the preset's name)."""
    from .presets import load_preset

    cfg = load_preset(preset, overrides or {})
    return cfg, run or preset
