"""Fencing: a writer that lost its lease can neither publish nor delete.

A lease (data/lock.py, data/lease.py) can be lost while its holder lives: a process paused
(SIGSTOP, a suspended laptop, a VM frozen) past its lease's expiry finds, once resumed, that
another writer has taken the workspace over. Renewing in a heartbeat cannot prevent that; only
the store's writes can refuse it. So every lease carries a *token* (its generation: one more
than the lease it replaced, each won by exactly one conditional write), and every write that
changes what is committed (a local commit's rename, a manifest PUT, a delete of committed
objects or of staging) first asks the lease this process holds for that workspace, here, whether
its token is still the current one:

- on local disk, the check and the write are one critical section under ``flock`` on the
  lease file, which a takeover also needs: no other writer can take over in between;
- on object storage, the check reads the lease object, then the manifest PUT is conditional
  (``If-Match`` on the manifest's ETag read *before* the check: a newer writer's commit of that
  stage in between makes it fail), and a delete removes only object folders whose token is
  not newer than ours (``<key16>-g<token>-<time>``): a newer writer's files are never ours
  to delete, whenever we run.

A process that holds no lease for a workspace (an in-process test, a read-only command) is not
fenced: nothing is registered for it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from data.errors import ResourceError


class LeaseLostError(ResourceError):
    """Another writer took this run's workspace over (our lease expired while we were paused
    or cut off). Not the user's mistake (exit 2 would say "fix your command"), not a bug, and
    not retried: a retry meets the same newer lease. Like a full disk, the machine-level
    resource the run needs, the workspace held alone, is gone: one line, exit 1. The other
    writer's commits stand; this run published and deleted nothing after it lost the lease."""


class Fence(Protocol):
    token: int

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """Raise :class:`LeaseLostError` unless the lease is still ours, and keep it ours (or
        as nearly as the store allows) until the block ends."""
        ...

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease is known to be lost (no I/O)."""
        ...


_FENCES: dict[str, Fence] = {}


def key_of(where: str | Path) -> str:
    """The registry's key: a local workspace's resolved path, or an object store's URL."""
    text = str(where)
    return text.rstrip("/") if "://" in text else str(Path(text).resolve())


def hold(where: str | Path, fence: Fence) -> None:
    _FENCES[key_of(where)] = fence


def drop(where: str | Path, fence: Fence) -> None:
    if _FENCES.get(key_of(where)) is fence:
        del _FENCES[key_of(where)]


def fence_of(where: str | Path) -> Fence | None:
    """The lease this process holds for ``where``; None when it holds none."""
    return _FENCES.get(key_of(where))


@contextlib.contextmanager
def guarded(where: str | Path) -> Iterator[Fence | None]:
    """Run the block only while this process's lease on ``where`` is current (see the
    module's docstring); without a lease, run it as is."""
    fence = fence_of(where)
    if fence is None:
        yield None
        return
    with fence.guard():
        yield fence


def verify(where: str | Path) -> None:
    """Raise :class:`LeaseLostError` unless this process's lease on ``where`` (if any) is still
    current: a check before work that only a current writer may start."""
    with guarded(where):
        return


def check(where: str | Path) -> None:
    """Raise :class:`LeaseLostError` if this process's lease on ``where`` is known lost: the
    cheap check before writing a shard (the heartbeat found out; no I/O here)."""
    if (fence := fence_of(where)) is not None:
        fence.check()
