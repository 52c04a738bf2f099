"""Helper package of the multilingual CLT book.

The names below are what the chapters use; each is imported on first use, so
``import mlclt_utils`` stays cheap (no torch until a name needs it)::

    from mlclt_utils import start_chapter, build, load
    cfg, run = start_chapter(preset, run, overrides)
    build("models", cfg, run, "s-en50")
    model = load("models", cfg, run, "s-en50")

Homes: ``stages`` (every artifact of the chain), ``data/`` (corpora, mixtures),
``tokenizer``, ``models/``, ``clt/``, ``features/``, ``graphs/``, ``interventions``, ``diffing``,
``neurons``, ``sae/``, ``viz/``, ``results``, ``claims``,
``bench/``, ``runner``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "start_chapter": "chapter",
    "end_chapter": "chapter",
    "load_preset": "presets",
    "model_names": "presets",
    "mixture_name": "presets",
    "reference_model": "presets",
    "diffing_base": "presets",
    "size_models": "presets",
    "build": "stages",
    "load": "stages",
    "require_current": "stages",
    "stage": "stages",
    "clt_kind": "stages",
    "model_mixture": "stages",
    "StaleStage": "stages",
    "load_model": "stages",
    "greedy_continuations": "models.load",
    "read_metrics": "stages",
    "verse_rows": "data.datasets",
    "top_activating_examples": "features.examples",
    "load_parallel": "features.parallel",
    "overlap_by_layer": "features.overlap",
    "parallel_verse_examples": "features.examples",
    "check_targets": "clt.targets",
    "record_results": "results",
    "table": "viz.table",
    "read_results": "results",
    "verdict": "claims",
    "read_verdicts": "claims",
}
_RENAMED = {"record_results": "record", "read_results": "read_all"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mlclt_utils' has no attribute {name!r}")
    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    value = getattr(module, _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
