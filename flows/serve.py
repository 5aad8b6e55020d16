"""Nightly scheduling: the cron schedule, and ``mpd serve`` (a schedule without a worker).

Each night continues the campaign by ``rounds_per_night`` rounds (``flows/nightly.py`` says
which round that reaches). Two ways to run the schedule, with the same cron and parameters:

- ``prefect.yaml``: the ``nightly-compression`` deployment on a ``process`` work
  pool, run by ``prefect worker start`` (the production shape: a server, a pool,
  workers anywhere);
- ``mpd serve``: ``campaign_flow.serve(...)``, one long-running process that is
  both the deployment and its executor. Nothing else to start but the API.

It imports the campaign flow (and so Prefect): ``mpd`` imports it only for ``mpd serve``.
"""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.schedules import CronSchedule
from prefect.schedules import Cron, Schedule
from pydantic import ValidationError

from flows.campaign import campaign_flow

NIGHTLY = "nightly-compression"
DEFAULT_CRON = "0 2 * * *"  # 02:00 every day: the machine is idle and the morning has results
DEFAULT_TIMEZONE = "UTC"  # an IANA name ("Europe/Paris", "America/New_York") moves 02:00 with DST


def nightly_schedule(cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE) -> Schedule:
    """The nightly cron schedule; the time zone is explicit so 02:00 means the same everywhere.

    Both strings are checked here (``Cron`` alone leaves the time zone to the
    server), so a typo fails before anything is registered, as one line.
    """
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
    campaign_flow.serve(**serve_options(**kwargs))
