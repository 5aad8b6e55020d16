"""One writer per workspace: a lease file, and a lease object on object storage.

The lock is a lease (data/lease.py: expiry, renewal, a fencing token) kept in
``<workspace>/.lock``. Every read-modify-write of that file (taking the lease, renewing it,
letting it go, and a commit's check-and-rename, data/fence.py) is one short critical section
under ``fcntl.flock`` on it: the kernel drops a ``flock`` when its holder dies, however it
dies, so a killed process never blocks the next one, and no takeover can fall between a
commit's token check and its rename. The lease itself is not a ``flock`` held for the whole
run: a process paused past its lease's expiry loses the workspace to the next writer (and, once
resumed, can neither publish nor delete: it is fenced), and a workspace on a file system that
several machines mount is judged by expiry, not by a lock another machine's kernel holds.

A workspace on object storage (data/objstore.py) is written from several machines: there the
local working copy's lease is joined by :class:`data.lease.ObjectLease` on ``<prefix>/.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from data import fence
from data.diskfull import naming
from data.hostid import identity
from data.lease import (
    LEASE_S,
    Lease,
    ObjectLease,
    WorkspaceBusyError,
    busy_error,
    describe_holder,
    lease_stale,
    next_generation,
)
from data.objstore import StorageError, StorageUnreachableError, attached

__all__ = [
    "LEASE_S",
    "FileLease",
    "ObjectLease",
    "WorkspaceBusyError",
    "WorkspaceLock",
    "describe_holder",
    "release_held",
]
FLOCK_WAIT_S = 10.0  # how long a critical section on the lease file may be waited for
_HELD: set[WorkspaceLock] = set()  # every lock this process holds, for release_held()


class WorkspaceLock:
    """Exclusive lease on ``<workspace>/.lock`` (and on the object store it belongs to).

    Use as a context manager. ``stale`` is the previous holder's record when its lease was
    taken over (a killed process, an expired lease), else None. While held, the leases are
    registered with data/fence.py: the store's commits and deletes check them.
    """

    def __init__(self, workspace: Path, command: str | None = None) -> None:
        self.path = Path(workspace) / ".lock"
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.stale: dict[str, Any] | None = None
        self._file: FileLease | None = None
        self._lease: ObjectLease | None = None
        # acquire and release are one step each, whichever thread calls them: a stop signal's
        # cleanup (flows/stopping.py) releases from another thread than the one that took it.
        self._mutex = threading.Lock()

    def acquire(self) -> WorkspaceLock:
        with self._mutex:
            self._acquire()
            _HELD.add(self)
        return self

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            **identity(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._file = FileLease(self.path, record).acquire()
        self.stale = self._file.stale
        fence.hold(self.path.parent, self._file)
        if (remote := attached(self.path.parent)) is not None:
            try:
                self._lease = ObjectLease(remote, record).acquire()
            except BaseException:  # boundary: the local lease let go, re-raised unchanged
                self._release()
                raise
            fence.hold(remote.url, self._lease)
            self.stale = self.stale or self._lease.stale

    @property
    def lost(self) -> str | None:
        """The one line saying the lease was lost (another writer has the workspace), or None."""
        leases = [lease for lease in (self._file, self._lease) if lease is not None]
        return next((lease.lost for lease in leases if lease.lost), None)

    def check_free(self) -> None:
        """Refuse at once if a live lease holds the workspace; take and write nothing. (On
        object storage the lease is checked apart, by ``ObjectLease``: another machine's
        working copy may not exist yet.)

        For the checks a command runs before starting Prefect: the lock itself is taken later,
        so this is advice, not a reservation (a run that starts in between is still refused
        by :meth:`acquire`). The lock file's record is left for the real holder to read.
        """
        if not self.path.exists():
            return
        FileLease(self.path, {}).check_free()

    def release(self, timeout: float = -1) -> bool:
        """Release the lock (and lease); a second call does nothing.

        With ``timeout``, give up after that many seconds if another thread is inside
        acquire or release (returns False): a stop signal's cleanup must not wait on a main
        thread it interrupted there (the kernel drops the flock at exit anyway).
        """
        if not self._mutex.acquire(timeout=timeout):
            return False
        try:
            self._release()
        finally:
            _HELD.discard(self)
            self._mutex.release()
        return True

    def _release(self) -> None:
        if self._lease is not None:
            fence.drop(self._lease.store.url, self._lease)
            self._lease.release()
            self._lease = None
        if self._file is not None:
            fence.drop(self.path.parent, self._file)
            self._file.release()
            self._file = None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class FileLease(Lease):
    """The lease of a local workspace: the file ``<workspace>/.lock`` (see the module's
    docstring). Every step is a critical section under ``flock`` on the file."""

    def __init__(self, path: Path, record: dict[str, Any], ttl: float | None = None) -> None:
        super().__init__(record, ttl)
        self.path, self.where = Path(path), str(Path(path).parent)

    def acquire(self) -> FileLease:
        """Take the lease or raise :class:`WorkspaceBusyError` naming its live holder."""
        with self._locked(create=True) as fd:
            assert fd is not None  # created if missing
            holder = _read_holder(fd)
            if holder and not lease_stale(holder):
                raise busy_error(self.where, holder)
            self.token = next_generation(holder)
            self._write(fd, self.body())
        self.stale = holder if holder.get("pid") else None
        self.start_heartbeat()
        return self

    def check_free(self) -> None:
        with self._locked(create=False) as fd:
            holder = {} if fd is None else _read_holder(fd)
        if holder and not lease_stale(holder):
            raise busy_error(self.where, holder)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Still ours, or :class:`LeaseLostError`; and ours until the block ends (the flock
        is held through it: a takeover waits)."""
        self.check()
        with self._locked(create=False) as fd:
            holder = {} if fd is None else _read_holder(fd)
            if not self.mine(holder):
                raise self.mark_lost(holder)
            yield

    def release(self) -> None:
        """Let go: the record becomes a released one (its token kept), unless another writer
        has it by now (then it is left alone)."""
        self.stop_heartbeat()
        if self.lost is not None or self.token == 0:
            return
        with self._locked(create=False) as fd:
            if fd is not None and self.mine(_read_holder(fd)):
                self._write(fd, self.released_body())

    # -- internals ----------------------------------------------------------
    def _renew(self) -> bool:
        with self._locked(create=False) as fd:
            if fd is None or not self.mine(_read_holder(fd)):
                return False
            self._write(fd, self.body())
        return True

    def _holder(self) -> dict[str, Any]:
        with self._locked(create=False) as fd:
            return {} if fd is None else _read_holder(fd)

    def _write(self, fd: int, body: bytes) -> None:
        with naming(self.path):  # a full disk: one line naming .lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
            os.fsync(fd)

    @contextlib.contextmanager
    def _locked(self, *, create: bool) -> Iterator[int | None]:
        """The lease file open and ``flock``-ed for one short step. A fresh open file each
        time, so that threads of this process (the heartbeat, a commit) exclude each other
        too. Waits up to FLOCK_WAIT_S for a holder inside its own step. None: there is no
        lease file (``create`` False), so nobody, this process included, holds the lease."""
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:  # no lease file (any more): it names nobody, ours neither
            yield None
            return
        try:
            deadline = time.monotonic() + FLOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise busy_error(self.where, _read_holder(fd)) from None
                    time.sleep(0.02)
            yield fd
        finally:
            os.close(fd)  # closing drops the flock


def release_held(timeout: float = 1.0) -> list[WorkspaceLock]:
    """Release every workspace lock this process holds; the ones that could not be released
    within ``timeout`` each (another thread is inside their acquire or release).

    Every lock is tried; a lease the store did not let go of is raised after the others.
    """
    busy, failed = [], []
    for lock in list(_HELD):
        try:
            if not lock.release(timeout=timeout):
                busy.append(lock)
        except (OSError, StorageError, StorageUnreachableError) as exc:  # the file, the lease
            failed.append(exc)
    if failed:
        raise failed[0]
    return busy


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder record of a lock file; {} when it is empty or not one (a damaged file)."""
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
