"""Nightly scheduling: what "one more night" means, and ``mpd serve`` (a schedule without a worker).

A campaign is continued, not restarted, each night. The nightly deployment does
not name a round to reach (that number would have to be edited every morning);
it names ``rounds_per_night``, and the flow reaches

    rounds committed in the workspace + rounds_per_night      (capped by ``rounds`` if given)

where a round counts as committed when its last stage, ``eval``, is committed and
intact for it and every round before it. Every stage is cached by its key, so a
night that was interrupted resumes where it stopped, and a night after a config
change recomputes only what the change touches (see README, "Storage and caching
contract").

Two ways to run the schedule, with the same cron and parameters:

- ``prefect.yaml``: the ``nightly-compression`` deployment on a ``process`` work
  pool, run by ``prefect worker start`` (the production shape: a server, a pool,
  workers anywhere);
- ``mpd serve``: ``campaign_flow.serve(...)``, one long-running process that is
  both the deployment and its executor. Nothing else to start but the API.

Prefect is imported inside the functions, so ``mpd --help`` stays instant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.errors import UserError
from data.store import StageStore

if TYPE_CHECKING:
    from prefect.schedules import Schedule

log = logging.getLogger("mpd")

NIGHTLY = "nightly-compression"
DEFAULT_CRON = "0 2 * * *"  # 02:00 every day: the machine is idle and the morning has results
DEFAULT_TIMEZONE = "UTC"  # an IANA name ("Europe/Paris", "America/New_York") moves 02:00 with DST
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
    from prefect.context import FlowRunContext
    from prefect.logging import get_run_logger

    return get_run_logger() if FlowRunContext.get() is not None else log


def nightly_schedule(cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE) -> Schedule:
    """The nightly cron schedule; the time zone is explicit so 02:00 means the same everywhere.

    Both strings are checked here (``Cron`` alone leaves the time zone to the
    server), so a typo fails before anything is registered, as one line.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return Cron(cron, timezone=timezone)


def nightly_parameters(
    config: str | None,
    rounds_per_night: int,
    workspace: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """campaign_flow parameters for one night, omitting the ones left to the config."""
    params: dict[str, Any] = {"rounds_per_night": rounds_per_night}
    if config is not None:
        params["config"] = config
    if workspace is not None:
        params["workspace"] = workspace
    if overrides:
        params["overrides"] = list(overrides)
    return params


def serve_options(
    config: str | None = None,
    rounds_per_night: int = 1,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    workspace: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments shared by ``campaign_flow.serve`` and ``campaign_flow.to_deployment``.

    One builder for both, so the test of ``to_deployment`` checks what ``mpd serve`` serves.
    """
    return {
        "name": NIGHTLY,
        "schedule": nightly_schedule(cron, timezone),
        "parameters": nightly_parameters(config, rounds_per_night, workspace, overrides),
        "description": f"Continue the campaign by {rounds_per_night} round(s) at '{cron}' "
        f"({timezone}).",
        "tags": ["mpd", "nightly"],
    }


def serve_nightly(**kwargs: Any) -> None:
    """Register the nightly deployment and execute its runs in this process until interrupted.

    Runs start as subprocesses in the current directory, so relative config and
    workspace paths mean what they mean here.
    """
    from flows.campaign import campaign_flow

    campaign_flow.serve(**serve_options(**kwargs))
