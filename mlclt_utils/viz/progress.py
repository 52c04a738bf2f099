"""Progress bars of long work: widgets in an interactive notebook; in the chapters the runner
executes (it sets ``MLCLT_PLAIN_PROGRESS``) one plain line per bar when it closes, which
papermill logs as the chapter runs; ``runner.tidy_executed`` then takes every progress line
(the book's and other libraries') out of the executed page, so the built book holds neither
a widget that needs scripts from the network nor progress text."""

from __future__ import annotations

import io
import os
import sys

PLAIN_ENV = "MLCLT_PLAIN_PROGRESS"


def _summary_bar():
    from tqdm.std import tqdm

    class SummaryBar(tqdm):
        """Draws nothing while it runs; prints its final state once, when closed."""

        def __init__(self, *args, **kwargs):
            kwargs["file"] = io.StringIO()
            kwargs.setdefault("ascii", True)
            super().__init__(*args, **kwargs)

        def close(self):
            if self.disable or getattr(self, "_summarised", False):
                return super().close()
            self._summarised = True
            line = self.format_meter(**self.format_dict)
            super().close()
            print(line, file=sys.stderr, flush=True)

    return SummaryBar


def progress_bar(**kwargs):
    if os.environ.get(PLAIN_ENV):
        return _summary_bar()(**kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
