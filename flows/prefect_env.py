"""How mpd's commands start Prefect: environment defaults, and a local API that may be slow.

Without ``PREFECT_API_URL`` a run needs a local API server (``flows/prefect_server.py`` starts
it; commands that do not, Prefect itself) and waits for it
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (Prefect's default, 20 s). At a load
average of 9-10 on two cores that wait ran out and runs died with a traceback before doing
anything. So mpd waits longer by default, retries a start-up that still timed out once, and then
says so in one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from data.errors import TransientError

if TYPE_CHECKING:
    from flows.prefect_server import APIServer

log = logging.getLogger("mpd")

STARTUP_TIMEOUT_S = 120  # Prefect's default is 20: not enough on a loaded 2-core machine
_STARTUP_FAILED = "ephemeral Prefect API server"  # in the RuntimeError Prefect raises


class PrefectStartupError(TransientError):
    """The local Prefect API server did not start, twice (one line)."""


def prefect_env() -> None:
    """Defaults every mpd flow wants; set before Prefect is imported (it reads them then)."""
    # Stage logs go through Prefect's handlers: to the console and to the run in the UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mpd")
    # An offline pipeline: no telemetry from the embedded server (it only logs errors here).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_TIMEOUT_S)
    )


def run_flow(call: Callable[[], Any], api: APIServer | None = None) -> Any:
    """``call()`` (a flow call) once ``api`` (the run's own server, if it has one) answers;
    retried once when Prefect's ephemeral API server failed to start."""
    if api is not None:
        api.wait()
    for attempt in (1, 2):
        try:
            return call()
        except RuntimeError as exc:
            if _STARTUP_FAILED not in str(exc):
                raise
            wait = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "?")
            if attempt == 2:
                raise PrefectStartupError(
                    f"the local Prefect API server did not start within {wait} s, twice (a busy "
                    "machine?): run again, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
                    "or point PREFECT_API_URL at a running `prefect server`"
                ) from None
            log.warning(
                "the local Prefect API server did not start within %s s; retrying once", wait
            )
    raise AssertionError("unreachable")


def finish(state: Any) -> int:
    """A flow's final state as the command's exit code: a failure raises its exception (a user
    error prints one line in ``flows.cli.main``, a bug its traceback)."""
    import sys

    if not state.is_failed():
        return 0
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    print(f"mpd: error: {state.message}", file=sys.stderr)
    return 2
