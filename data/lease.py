"""Leases: one writer per workspace, with a fencing token.

A lease is a record ``{pid, host, machine_id, boot_id, pid_ns, command, started, expires,
generation, owner}`` kept where every writer can see it: the file ``<workspace>/.lock``
(data/lock.py) or the object ``<prefix>/.lock`` (:class:`ObjectLease`). Its holder renews
``expires`` every third of its lifetime (``$MPD_LEASE_S``, default 120 s).

- **Stale only by its expiry**, with one exception that cannot be wrong: a holder on this very
  machine, boot and pid namespace (data/hostid.py) whose pid no longer exists is dead now. The
  host name decides nothing: two machines (containers) named alike never take over each other's
  live lease.
- **Taken over** by a conditional write on the stale record (a ``flock`` critical section on
  local disk, ``If-Match`` on its ETag on object storage), so two writers taking over at once
  cannot both win. The new lease's ``generation`` is the old one's plus one: a fencing token
  (data/fence.py) that every publish and delete checks. A released lease keeps its record's
  generation (``{"generation": g, "released": ...}``) so the next one counts on from it.
- **Lost**: a renewal that finds another owner marks the lease lost; from then on (and, through
  the store's checks, even before the heartbeat notices) this process publishes and deletes
  nothing, and its run ends with one line (:class:`data.fence.LeaseLostError`, exit 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from data.errors import UserError
from data.fence import LeaseLostError
from data.hostid import describe_host, same_host
from data.objstore import ObjectStore, StorageError, StorageUnreachableError

log = logging.getLogger("mpd.lock")
LEASE_S = 120.0  # a lease's lifetime; renewed every third of it ($MPD_LEASE_S overrides)


class WorkspaceBusyError(UserError):
    """Another live process holds the workspace."""


def lease_seconds(ttl: float | None = None) -> float:
    return ttl or float(os.environ.get("MPD_LEASE_S") or LEASE_S)


def lease_stale(holder: dict[str, Any]) -> bool:
    """Expired, or held by a process of this machine, boot and pid namespace that no longer
    exists. A lease mpd did not write (no holder, an expiry that is not a number) and a released
    one name no live holder: stale too, so a damaged lease cannot block the workspace (or
    crash the check) forever."""
    if not holder.get("pid") or not holder.get("host"):
        return True
    try:
        expires = float(holder.get("expires") or 0)
    except (TypeError, ValueError):
        return True
    if not expires >= time.time():  # NaN too
        return True
    if same_host(holder):
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def next_generation(holder: dict[str, Any] | None) -> int:
    """One more than the token the previous lease carried (1 for the first)."""
    try:
        return max(int((holder or {}).get("generation") or 0), 0) + 1
    except (TypeError, ValueError, OverflowError):  # a damaged record: count from nothing
        return 1


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder or not holder.get("pid"):
        return "another process"
    return (
        f"pid {holder.get('pid')} on {describe_host(holder)} "
        f"({holder.get('command')!r}, started {holder.get('started')})"
    )


def busy_error(where: str, holder: dict[str, Any]) -> WorkspaceBusyError:
    when = ""
    with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError, OSError):
        until = time.localtime(float(holder["expires"]))
        when = f"; its lease runs until {time.strftime('%H:%M:%S', until)}"
    return WorkspaceBusyError(
        f"workspace {where} is in use by {describe_holder(holder)}{when}; "
        "wait for it to finish or stop it first"
    )


class Lease:
    """What both kinds of lease share: the record, the token, the heartbeat, the lost flag."""

    where = ""  # the workspace, for messages

    def __init__(self, record: dict[str, Any], ttl: float | None = None) -> None:
        self.record, self.ttl = dict(record), lease_seconds(ttl)
        self.token = 0  # the fencing token; set when taken
        self.owner = uuid.uuid4().hex  # tells this lease from any other, whatever its token
        self.stale: dict[str, Any] | None = None
        self.lost: str | None = None  # the one line a fenced write raises, once lost
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- for subclasses -------------------------------------------------------
    def _renew(self) -> bool:  # pragma: no cover - abstract
        """Push ``expires`` on if the lease is still ours; False when another owner has it."""
        raise NotImplementedError

    def _holder(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def body(self) -> bytes:
        record = {**self.record, "generation": self.token, "owner": self.owner}
        return json.dumps({**record, "expires": time.time() + self.ttl}).encode()

    def released_body(self) -> bytes:
        """A released lease: no holder, the token kept for the next one to count on from."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return json.dumps({"generation": self.token, "released": stamp}).encode()

    def mine(self, holder: dict[str, Any]) -> bool:
        return holder.get("owner") == self.owner and holder.get("generation") == self.token

    def start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._beat, name="mpd-lease", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=10)

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseLostError(self.lost)

    def mark_lost(self, holder: dict[str, Any]) -> LeaseLostError:
        """Record that another writer has the lease; the error a fenced write raises."""
        if self.lost is None:  # said once, by the error (a log line here would repeat it)
            who = describe_holder(holder) if holder.get("pid") else "another writer"
            since = "" if holder.get("pid") else ", released since"
            self.lost = (
                f"lost the lease on workspace {self.where} (token {self.token}) to {who} "
                f"(token {holder.get('generation', '?')}{since}): this run stopped without "
                "publishing or deleting anything; the other writer's commits stand"
            )
        return LeaseLostError(self.lost)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self._renew():
                    continue
            except (OSError, StorageError, StorageUnreachableError) as exc:  # next beat
                log.warning("could not renew the lease on %s: %s", self.where, exc)
                continue
            self.mark_lost(self._holder())
            return


class ObjectLease(Lease):
    """The one-writer lease of an object-storage workspace: the object ``<prefix>/.lock``."""

    def __init__(self, store: ObjectStore, record: dict[str, Any], ttl: float | None = None):
        super().__init__(record, ttl)
        self.store, self.where = store, store.url
        self.path = store.path(".lock")
        self._etag: str | None = None

    def acquire(self) -> ObjectLease:
        """Take the lease or raise :class:`WorkspaceBusyError` naming its live holder."""
        holder, etag = self._read()
        if holder is not None and not lease_stale(holder):
            raise busy_error(self.store.url, holder)
        self.token = next_generation(holder)
        new = self.store.put_if(self.path, self.body(), etag=etag)
        if new is None:  # someone else took it first
            raise busy_error(self.store.url, self._read()[0] or {})
        self._etag = new
        self.stale = holder if holder and holder.get("pid") else None
        self.start_heartbeat()
        return self

    def check_free(self) -> None:
        holder, _ = self._read()
        if holder is not None and not lease_stale(holder):
            raise busy_error(self.store.url, holder)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """The lease object read back: still ours, or :class:`LeaseLostError`. (The store
        has no lock to hold through the block: the writes inside are conditional themselves,
        see data/fence.py.)"""
        self.check()
        holder = self._holder()
        if not self.mine(holder):
            raise self.mark_lost(holder)
        yield

    def release(self) -> None:
        """Let go: the record becomes a released one (its token kept), unless another writer
        has it by now (then it is left alone)."""
        self.stop_heartbeat()
        if self._etag is not None and self.lost is None:
            holder, etag = self._read()
            if holder is not None and self.mine(holder):
                self.store.put_if(self.path, self.released_body(), etag=etag)
        self._etag = None

    # -- internals ----------------------------------------------------------
    def _renew(self) -> bool:
        etag = self.store.put_if(self.path, self.body(), etag=self._etag)
        if etag is None:
            return False
        self._etag = etag
        return True

    def _holder(self) -> dict[str, Any]:
        return self._read()[0] or {}

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
