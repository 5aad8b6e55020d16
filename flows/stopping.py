"""A stop signal ends ``mpd run`` / ``rerun`` / ``bench`` in seconds, whatever the run is doing.

SIGTERM (a scheduler, systemd, ``kill``) and SIGINT (Ctrl-C) end a run within seconds: finished
shards are kept, the workspace lock or object-storage lease is released, the flow run is marked
Crashed, and the command prints one line and exits 143 or 130 (128 + the signal, what a shell
reports for a process the signal ended).

Why not let the signal unwind the run as an exception (Prefect's own SIGTERM bridge raises
``TerminationSignal``, Python's SIGINT ``KeyboardInterrupt``):

- Python runs a signal handler only in the main thread, between bytecodes: a main thread inside
  a long torch call hears it late;
- unwinding closes the engines under the shard threads still decoding with them, and Prefect
  logs every crashed task with its traceback;
- the interpreter's exit then joins the shard threads (an in-flight shard of hundreds of tokens
  runs to its end) and drains Prefect's log and event queues through the API, which Ctrl-C has
  just stopped too (the run's server is in its process group): that exit took 150 s and more.

So ``signal.set_wakeup_fd`` makes the C-level handler write the signal's number into a pipe the
moment it arrives, in whatever thread; a watchdog thread reading that pipe does what matters (see
:func:`_cleanup`), with a deadline, prints one line and ends the process with ``os._exit``. The
main thread's Python-level handler parks the main thread, so it commits nothing more while the
lock is being released.

``os._exit`` is safe because everything a run writes is committed atomically (a shard's file and
then its marker, a stage by rename, a manifest last): an exit at any instant leaves what a
``kill -9`` leaves, which the resume contract covers (tests/test_campaign.py). What it skips is
the interpreter's clean exit: joining the shard threads (their shards are redone by the next
run) and draining Prefect's queued logs and events (the stop is in the flow run's state).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from data.lock import release_held

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEADLINE_S = 7.0  # the cleanup's budget: the process ends within 10 s of the signal
API_TIMEOUT_S = 3.0  # marking the flow run Crashed: a busy or gone API server is not waited on
_DONE = 0  # the byte the cleanup writes when it has finished (a signal's number is never 0)
_EOF = -1  # what _read returns once the pipe's write end is closed

_CLEANUPS: list[Callable[[], None]] = []  # e.g. the run's own API server's kill
_STOPPER: _Stopper | None = None


def on_stop(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` when a stop signal ends this process (after the flow runs are marked)."""
    _CLEANUPS.append(cleanup)


def off_stop(cleanup: Callable[[], None]) -> None:
    """Forget a cleanup :func:`on_stop` registered (its work is over)."""
    with contextlib.suppress(ValueError):
        _CLEANUPS.remove(cleanup)


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Within this block, SIGTERM and SIGINT end the process as this module describes.

    The command line wraps ``run``, ``rerun`` and ``bench`` in it. Outside the main thread (where
    Python allows no signal handlers) it does nothing; on leaving, the previous handlers are back
    (an in-process caller, such as a test, keeps its own Ctrl-C).
    """
    global _STOPPER
    if threading.current_thread() is not threading.main_thread() or _STOPPER is not None:
        yield
        return
    _STOPPER = _Stopper()
    try:
        yield
    finally:
        _STOPPER.uninstall()
        _STOPPER = None


@contextlib.contextmanager
def in_flow() -> Iterator[None]:
    """The body of a flow that ``mpd`` started: SIGTERM stays ours, and a stop marks the run.

    Prefect swaps its own SIGTERM handler in for each flow run it starts (``capture_sigterm``):
    inside the run, ours is put back; Prefect restores ours when the run ends. Without
    :func:`stoppable` (a deployment's run, started by a Prefect worker) this does nothing, and
    Prefect's cancellation works as Prefect defines it.
    """
    stopper = _STOPPER
    if stopper is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run_id = ctx.flow_run.id if ctx is not None and ctx.flow_run is not None else None
    stopper.take_signals()
    stopper.runs.append(run_id)
    try:
        yield
    finally:
        stopper.runs.remove(run_id)


class _Stopper:
    """The pipe, the handlers and the watchdog thread of one :func:`stoppable` block."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # the C handler must never block on it
        self.runs: list[Any] = []  # flow run ids, outermost first (a bench and its campaigns)
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.take_signals()
        self.thread = threading.Thread(target=self._watch, name="mpd-stop", daemon=True)
        self.thread.start()

    def take_signals(self) -> None:
        for sig, before in self.previous.items():
            if before is not signal.SIG_IGN:  # `nohup`, a background job: ignored stays ignored
                signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        for sig, handler in self.previous.items():
            if handler is not None:  # None: set outside Python, and not ours to put back
                signal.signal(sig, handler)
        os.close(self.write_fd)  # the watchdog reads EOF and ends
        self.thread.join(timeout=5)
        os.close(self.read_fd)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Main thread: make sure the watchdog heard, then park until it ends the process."""
        # Someone (an asyncio loop in this thread) may have taken the wakeup fd: then the C
        # handler did not write to our pipe, and this handler tells the watchdog itself.
        if signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False) != self.write_fd:
            _poke(self.write_fd, signum)
        while True:
            time.sleep(60)

    def _watch(self) -> None:
        # The C handler writes the number of every signal with a Python handler (a library's
        # SIGALRM too): only a stop signal stops.
        while (signum := _read(self.read_fd, None)) not in STOP_SIGNALS:
            if signum is None or signum == _EOF:  # uninstalled
                return
        started = time.monotonic()
        problems: list[str] = []
        work = threading.Thread(
            target=self._cleanup, args=(signum, problems), name="mpd-stop-cleanup", daemon=True
        )
        work.start()
        while (left := DEADLINE_S - (time.monotonic() - started)) > 0:
            got = _read(self.read_fd, left)
            if got in (_DONE, _EOF):
                break
            if got in STOP_SIGNALS:  # a second one: the user insists
                problems.append(f"stopped again by {signal.Signals(got).name} before cleaning up")
                break
        else:
            problems.append(f"cleaning up took over {DEADLINE_S:g} s")
        name = signal.Signals(signum).name
        note = f" ({'; '.join(problems)})" if problems else ""
        line = f"mpd: stopped by {name}; finished shards are kept and reused by the next run{note}"
        with contextlib.suppress(OSError):
            os.write(2, (line + "\n").encode())
        os._exit(128 + signum)

    def _cleanup(self, signum: int, problems: list[str]) -> None:
        """What matters before the process ends, most important first; then tell the watchdog.

        1. the workspace locks and leases: a lease left behind makes the next run on another
           host wait for it to expire; 2. the flow runs, marked Crashed (what Prefect marks a
           run a signal ended), so a Prefect server does not show them running forever; 3. the
           registered cleanups (the run's own API server); 4. buffered stdout.
        """
        try:
            if release_held():
                problems.append("a workspace lock was being taken or released: left to the kernel")
        except Exception as exc:  # boundary: a stop signal's cleanup tries every step, then exits
            problems.append(f"could not release the workspace lease: {_short(exc)}")
        try:
            _mark_crashed([r for r in self.runs if r is not None], signal.Signals(signum).name)
        except Exception as exc:  # boundary: as above (the Prefect API may be gone)
            problems.append(f"the Prefect flow run was not marked Crashed: {_short(exc)}")
        for cleanup in reversed(_CLEANUPS):  # last registered first, as atexit (a bench's
            # campaigns are told to stop before the API server they report to is killed)
            with contextlib.suppress(Exception):  # boundary: as above, each cleanup tried
                cleanup()
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout
            sys.stdout.flush()
        _poke(self.write_fd, _DONE)


def _mark_crashed(run_ids: list[Any], signame: str) -> None:
    """Set each flow run (innermost first) Crashed, as Prefect does for a run a signal ends."""
    if not run_ids:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True, httpx_settings={"timeout": API_TIMEOUT_S}) as client:
        for run_id in reversed(run_ids):
            message = f"Stopped by {signame}; finished shards are kept for the next run."
            client.set_flow_run_state(run_id, Crashed(message=message), force=True)


def _poke(fd: int, value: int) -> None:
    with contextlib.suppress(OSError):  # a full pipe already holds a wake-up
        os.write(fd, bytes([value]))


def _read(fd: int, timeout: float | None) -> int | None:
    """The next byte of the pipe as an int; ``_EOF`` at its end, None after ``timeout``."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    data = os.read(fd, 1)
    return data[0] if data else _EOF


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
