"""Results as data: each chapter's headline numbers, written to the artifact store.

A chapter calls :func:`record` with rows ``{"metric", "value", "criterion", "met", "model"}``
(criterion and met optional) and its verdict rows (``claims.verdict``); they land in stage
``results/<chapter>`` of the run (``results.csv``, ``verdicts.csv``), with a manifest that
names the stages the numbers were computed from. :func:`read_all` gathers the
records of every chapter of a run, for the claims chapter: it reads measured values, not
pictures.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

from .artifacts import Stage, atomic_path

COLUMNS = ["chapter", "model", "metric", "value", "criterion", "met"]


def _clean(row: Mapping[str, Any], chapter: str) -> dict:
    if "metric" not in row or "value" not in row:
        raise ValueError(f"a results row needs 'metric' and 'value', got {dict(row)}")
    value = row["value"]
    if value is not None and not isinstance(value, (int, float, str)):
        value = float(value)            # numpy scalars
    extra = set(row) - set(COLUMNS)
    if extra:
        raise ValueError(f"unknown results fields {sorted(extra)}; allowed: {COLUMNS}")
    return {"chapter": chapter, "model": row.get("model"), "metric": row["metric"],
            "value": value, "criterion": row.get("criterion"), "met": row.get("met")}


def record(run: str, chapter: str, rows: Iterable[Mapping[str, Any]],
           inputs: list[Stage] | None = None, root=None,
           verdicts: Iterable[Mapping[str, Any]] = ()) -> Stage:
    """Write ``rows`` (and the chapter's verdict rows) as the results of ``chapter`` (e.g.
    "03"), replacing earlier ones."""
    import pandas as pd

    from .claims import COLUMNS as VERDICT_COLUMNS

    rows = [_clean(r, chapter) for r in rows]
    verdicts = [dict(v) for v in verdicts]
    for v in verdicts:
        if set(v) != set(VERDICT_COLUMNS):
            raise ValueError(f"a verdict row needs exactly the fields {VERDICT_COLUMNS}; build it with "
                             f"claims.verdict (got {sorted(v)})")
        if v["chapter"] != chapter:
            raise ValueError(f"verdict row of chapter {v['chapter']!r} recorded by chapter {chapter!r}")
    for r in rows:
        if isinstance(r["value"], float) and math.isnan(r["value"]):
            r["value"] = None
    st = Stage(run, f"results/{chapter}", root)
    st.start()
    with atomic_path(st.file("results.csv")) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)
    with atomic_path(st.file("verdicts.csv")) as tmp:
        pd.DataFrame(verdicts, columns=VERDICT_COLUMNS).to_csv(tmp, index=False)
    from .chapter import _started, run_record, show_run_record

    if _started.get("cfg") is not None:  # a chapter's run: keep how it ran beside its numbers
        run_info = run_record()
        with atomic_path(st.file("run.json")) as tmp:
            tmp.write_text(json.dumps(run_info, indent=1))
        show_run_record(run_info)
    st.finish({"chapter": chapter}, inputs=inputs or [])
    return st


def read(run: str, chapter: str, root=None):
    """The results of one chapter as a DataFrame (inputs checked intact)."""
    import pandas as pd

    st = Stage(run, f"results/{chapter}", root)
    st.require()
    return pd.read_csv(st.file("results.csv"), dtype={"chapter": str})


def read_all(run: str, root=None):
    """The results of every chapter of ``run`` that recorded any, in chapter order."""
    import pandas as pd

    folder = Stage(run, "results", root).path
    chapters = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []
    frames = [read(run, c, root) for c in chapters if Stage(run, f"results/{c}", root).is_complete()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
