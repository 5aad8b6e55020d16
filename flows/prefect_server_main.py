"""The process of a run's own Prefect API server (flows/prefect_server.py starts it by path).

It ties its life to the run's first, then serves Prefect's API exactly as Prefect's ephemeral
server does (``python -m uvicorn ... prefect.server.api.server:create_app``, the arguments come
from the parent). Run by path, not as ``flows.…``: importing the ``flows`` package would load
every stage for nothing.

The tie: on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill this process the
moment the thread that started it ends (the run's main thread, so: the run), however it ends,
``kill -9`` included. Elsewhere a thread polls the parent's pid twice a second.

Usage: ``python prefect_server_main.py PARENT_PID UVICORN_ARGS...``
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def tie_to_parent(parent: int) -> None:
    """End this process when ``parent`` ends (see the module's docstring)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tied = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl: not Linux
        tied = False
    if os.getppid() != parent:  # the run died before the tie was made
        os._exit(0)
    if not tied:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main() -> None:
    parent, args = int(sys.argv[1]), sys.argv[2:]
    tie_to_parent(parent)
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # flows/ itself is no package root: its modules must not shadow others
    import uvicorn

    sys.argv = ["uvicorn", *args]
    uvicorn.main()


if __name__ == "__main__":
    main()
