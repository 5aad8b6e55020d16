"""One writer per workspace.

``fcntl.flock`` is the lock: the kernel drops it when the holding process dies,
however it dies (``kill -9`` included), so a lock can never outlive its holder
on this machine. The lock file's JSON body only *names* the holder, for the
error message a second writer sees and for the "recovered a stale lock" note
when the previous holder died without cleaning up.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from data.errors import UserError


class WorkspaceBusyError(UserError, RuntimeError):
    """Another live process holds the workspace."""


class WorkspaceLock:
    """Exclusive, non-blocking lock on ``<workspace>/.lock``.

    Use as a context manager. ``stale`` is the previous holder's record when
    the file existed but nobody held the lock (a killed process), else None.
    """

    def __init__(self, workspace: Path, command: str | None = None) -> None:
        self.path = Path(workspace) / ".lock"
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> WorkspaceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise self._busy(holder) from None
        previous = _read_holder(fd)
        if previous.get("pid"):
            self.stale = previous
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def check_free(self) -> None:
        """Refuse at once if a live process holds the workspace; take and write nothing.

        For the checks a command runs before starting Prefect: the lock itself is taken later,
        so this is advice, not a reservation (a run that starts in between is still refused
        by :meth:`acquire`). The lock file's record is left for the real holder to read.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(_read_holder(fd)) from None
        finally:
            os.close(fd)  # closing drops a lock this check took

    def _busy(self, holder: dict[str, Any]) -> WorkspaceBusyError:
        return WorkspaceBusyError(
            f"workspace {self.path.parent} is in use by {describe_holder(holder)}; "
            "wait for it to finish or stop it first"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        # Empty the record before unlocking so the next holder does not report
        # a clean exit as a stale lock.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} "
        f"({holder.get('command')!r}, started {holder.get('started')})"
    )
