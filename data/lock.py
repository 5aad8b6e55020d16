"""One writer per workspace.

``fcntl.flock`` is the lock: the kernel drops it when the holding process dies,
however it dies (``kill -9`` included), so a lock can never outlive its holder
on this machine. The lock file's JSON body only *names* the holder, for the
error message a second writer sees and for the "recovered a stale lock" note
when the previous holder died without cleaning up.

A workspace on object storage (data/objstore.py) is written from several machines, where no
kernel can drop a lock: there the lock is also a *lease*, the object ``<prefix>/.lock``, created
with a conditional put (``If-None-Match: *``: exactly one creator wins) and renewed by a
heartbeat every third of its lifetime with ``If-Match`` on its last ETag. A lease that expired
(its holder stopped renewing), or one held by a dead process on this host, is stale: the next
writer takes it over with ``If-Match`` on the stale ETag, so two writers taking over at once
cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from data.diskfull import naming
from data.errors import UserError
from data.objstore import ObjectStore, StorageError, StorageUnreachableError, attached

log = logging.getLogger("mpd.lock")
LEASE_S = 120.0  # a lease's lifetime; renewed every third of it ($MPD_LEASE_S overrides)
_HELD: set[WorkspaceLock] = set()  # every lock this process holds, for release_held()


class WorkspaceBusyError(UserError):
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
        try:
            with naming(self.path):  # a full disk: one line, and the lock not kept
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                os.fsync(fd)
        except BaseException:  # boundary: the lock not kept (fd closed), re-raised unchanged
            os.close(fd)
            raise
        self._fd = fd
        if (remote := attached(self.path.parent)) is not None:
            try:
                self._lease = ObjectLease(remote, record).acquire()
            except BaseException:  # boundary: the local lock let go, re-raised unchanged
                self._release()
                raise
            self.stale = self.stale or self._lease.stale

    def check_free(self) -> None:
        """Refuse at once if a live process of this machine holds the workspace; take and
        write nothing. (On object storage the lease is checked apart, by ``ObjectLease``:
        another machine's working copy may not exist yet.)

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
            self._lease.release()
            self._lease = None
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


class ObjectLease:
    """The one-writer lease of an object-storage workspace (see the module's docstring)."""

    def __init__(self, store: ObjectStore, record: dict[str, Any], ttl: float | None = None):
        self.store, self.record = store, dict(record)
        self.ttl = ttl or float(os.environ.get("MPD_LEASE_S") or LEASE_S)
        self.path = store.path(".lock")
        self.stale: dict[str, Any] | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> ObjectLease:
        """Take the lease or raise :class:`WorkspaceBusyError` naming its live holder."""
        if (etag := self._put(if_none_match=True)) is None:
            holder, held_etag = self._read()
            if holder is not None and not _lease_stale(holder):
                raise self._busy(holder)
            etag = self._put(if_match=held_etag) if held_etag else self._put(if_none_match=True)
            if etag is None:  # someone else took it over first
                raise self._busy(self._read()[0] or {})
            self.stale = holder
        self._etag = etag
        self._heartbeat = threading.Thread(target=self._renew, name="mpd-lease", daemon=True)
        self._heartbeat.start()
        return self

    def check_free(self) -> None:
        holder, _ = self._read()
        if holder is not None and not _lease_stale(holder):
            raise self._busy(holder)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        _, etag = self._read()
        if etag is not None and etag == self._etag:  # never delete a lease someone took over
            self.store._call(self.store.fs.rm_file, self.path)
        self._etag = None

    # -- internals ----------------------------------------------------------
    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                etag = self._put(if_match=self._etag)
            except (StorageError, StorageUnreachableError) as exc:  # try again next beat
                log.warning("could not renew the lease on %s: %s", self.store.url, exc)
                continue
            if etag is None:
                holder = describe_holder(self._read()[0] or {})
                log.error("lost the lease on %s to %s", self.store.url, holder)
                return
            self._etag = etag

    def _body(self) -> bytes:
        return json.dumps({**self.record, "expires": time.time() + self.ttl}).encode()

    def _put(self, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """A conditional put of the lease; its new ETag, or None when the condition failed."""
        fs = self.store.fs
        if hasattr(fs, "call_s3"):
            bucket, key, _ = fs.split_path(self.path)
            condition = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": f'"{if_match}"'}
            try:
                out = self.store._call(
                    fs.call_s3, "put_object", Bucket=bucket, Key=key, Body=self._body(), **condition
                )
            except (FileExistsError, StorageError) as exc:
                if isinstance(exc, FileExistsError) or "pre-condition" in str(exc):
                    return None
                raise
            return str(out.get("ETag", "")).strip('"') or None
        # Other fsspec stores: exclusive create where the store has one; a renewal overwrites.
        try:
            if if_none_match:
                with fs.open(self.path, "xb") as fh:
                    fh.write(self._body())
            else:
                fs.pipe_file(self.path, self._body())
        except FileExistsError:
            return None
        return self._read()[1]

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease's holder record and ETag; (None, None) when there is no lease."""
        fs = self.store.fs
        try:
            info = self.store._call(fs.info, self.path)
            holder = json.loads(self.store._call(fs.cat_file, self.path))
        except FileNotFoundError:
            return None, None
        except ValueError:
            holder = {}
        if not isinstance(holder, dict):  # not a lease mpd wrote: it names no live holder
            holder = {}
        etag = info.get("ETag") or info.get("etag") or str(info.get("mtime", ""))
        return holder, str(etag).strip('"') or None

    def _busy(self, holder: dict[str, Any]) -> WorkspaceBusyError:
        when = ""
        with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError, OSError):
            until = time.localtime(float(holder["expires"]))
            when = f"; its lease runs until {time.strftime('%H:%M:%S', until)}"
        return WorkspaceBusyError(
            f"workspace {self.store.url} is in use by {describe_holder(holder)}"
            f"{when}; wait for it to finish or stop it first"
        )


def _lease_stale(holder: dict[str, Any]) -> bool:
    """Expired, or held by a process of this host that no longer exists. A lease mpd did not
    write (no holder, an expiry that is not a number) names no live holder: stale too, so a
    damaged lease object cannot block the workspace (or crash the check) forever."""
    if not holder.get("pid") or not holder.get("host"):
        return True
    try:
        expires = float(holder.get("expires") or 0)
    except (TypeError, ValueError):
        return True
    if not expires >= time.time():  # NaN too
        return True
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder record of a lock file; {} when it is empty or not one (a damaged file)."""
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} "
        f"({holder.get('command')!r}, started {holder.get('started')})"
    )
