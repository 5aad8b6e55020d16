"""What "one more night" means: the round a nightly run reaches.

A campaign is continued, not restarted, each night. The nightly deployment does
not name a round to reach (that number would have to be edited every morning);
it names ``rounds_per_night``, and the flow reaches

    rounds committed in the workspace + rounds_per_night      (capped by ``rounds`` if given)

where a round counts as committed when its last stage, ``eval``, is committed and
intact for it and every round before it. Every stage is cached by its key, so a
night that was interrupted resumes where it stopped, and a night after a config
change recomputes only what the change touches (docs/storage.md).

Its own module because the campaign flow reads it and the schedule (``flows/serve.py``)
serves the campaign flow: neither imports the other back.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from data.errors import UserError
from data.store import StageStore

log = logging.getLogger("mpd")

LAST_STAGE = "eval"  # a round is done when its evaluation is committed


def committed_rounds(workspace: Path | str) -> int:
    """The last round ``r`` such that rounds 1..r all have an intact committed evaluation.

    Counting stops at the first gap, so a workspace whose round 2 was moved aside
    (``mpd rerun``) or corrupted continues from round 1, and the next night redoes
    round 2 first. Round 0 (the starting student) is not a round of training.
    """
    local = StageStore(workspace)
    store = local.remote or local  # object storage, when the workspace is a copy of one
    r = 0
    while (man := store.manifest(LAST_STAGE, r + 1)) is not None and not store.validate(
        LAST_STAGE, r + 1, deep=False, man=man
    ):
        r += 1
    return r


def rounds_to_reach(workspace: Path | str, rounds_per_night: int, cap: int | None = None) -> int:
    """The round a nightly run must reach: committed rounds + ``rounds_per_night``, at most ``cap``.

    ``cap`` is the ``rounds`` flow parameter when one is passed: it turns an open-ended
    nightly into a campaign of fixed length whose later nights only re-check the cache.
    """
    if rounds_per_night < 1:
        raise UserError(f"rounds_per_night must be at least 1, got {rounds_per_night}")
    done = committed_rounds(workspace)
    target = done + rounds_per_night
    if cap is not None:
        target = min(target, cap)
    _run_logger().info(
        "nightly: %d round(s) committed in %s, running up to round %d", done, workspace, target
    )
    return target


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Inside a flow run, the run's logger (its line shows in the UI); else the mpd logger.

    The mpd logger is only raised to INFO once the campaign starts, after this decision.
    """
    return get_run_logger() if FlowRunContext.get() is not None else log
