"""Progress bars of long work: widgets in an interactive notebook; in the chapters the runner
executes (it sets ``MLCLT_PLAIN_PROGRESS``) one plain line per bar, written to the kernel
process's own stderr, so that it shows in the runner's log and never in the executed page
(the book holds no widget that needs scripts from the network and no progress text;
``runner.tidy_executed`` removes what other libraries' bars leave there)."""

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
            print(line, file=sys.__stderr__ or sys.stderr, flush=True)

    return SummaryBar


def progress_bar(**kwargs):
    if os.environ.get(PLAIN_ENV):
        return _summary_bar()(**kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
