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
