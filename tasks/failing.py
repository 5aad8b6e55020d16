"""A failed task's state without a traceback, for the failures a traceback does not help.

Used by the stage task (``tasks/prefect_stage.py``) and the shard task (``tasks/shards.py``); a
module of its own so that a stage's code closure reaches it without reaching the stage task
and its cache policy (orchestration, which shapes no row).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.states import Failed

from data.errors import kind_of, one_line


def failed_quietly(run: Callable[[], Any]) -> Any:
    """``run()``, with a user mistake or a full disk turned into a Failed state that carries it.

    Prefect logs a raised exception with its whole traceback (~50 lines before the CLI's one
    line); a returned Failed state is logged as one line, and ``state.result()`` (or a
    future's ``result()``) still raises the exception for the caller. Neither kind is retried.
    Bugs and transient failures are raised as usual: their traceback helps, and the retry
    condition sees them.
    """
    try:
        return run()
    except Exception as exc:  # boundary: the stage's failure to a Failed state, by its kind
        if kind_of(exc) not in ("user", "resource"):
            raise
        return Failed(message=one_line(exc), data=exc)
