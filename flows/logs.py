"""Logging for the mpd command: one handler on the ``mpd`` logger, timestamps, stderr."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Our one console handler. ``mpd`` records do not propagate to the root logger, where
    importing Prefect installs its own console handler: each line would print twice. Hub
    progress bars (transformers' "Loading weights" on every model load) are off: a model
    loads in a fraction of a second here, and the bars would drown the stage logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    log = logging.getLogger("mpd")
    # Prefect may have put its API handler here (PREFECT_LOGGING_EXTRA_LOGGERS=mpd, inherited
    # from a parent `mpd run`): that one prints nothing, so only a console handler counts.
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in log.handlers
    ):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    return log


def quiet_returned_failures() -> None:
    """Install :class:`NoEmptyTraceback` on Prefect's task-run logger (once per process). Called
    where a campaign starts, inside its flow too: a deployment's flow run never passes through
    the CLI."""
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, NoEmptyTraceback) for f in task_runs.filters):
        task_runs.addFilter(NoEmptyTraceback())


class NoEmptyTraceback(logging.Filter):
    """Drops a traceback request made with no exception in flight.

    Prefect logs a task that *returned* a Failed state (``tasks/failing.py``: a user mistake
    or a full disk, said in one line) with ``exc_info=True`` outside any ``except``; Python
    formats that as a line ``NoneType: None`` under the record. The record itself is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True
