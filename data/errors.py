"""What a failure means, defined once: the CLI, the flows and the Prefect stage task all ask here.

Four kinds, by meaning rather than by base class:

- :class:`UserError`: something the user can fix (a wrong key, a missing model, a filter that
  keeps nothing, a server that refuses the API key). One line, exit code 2, never retried.
- :class:`TransientError`: may pass on its own (a dead engine worker, a server that kept timing
  out after the engine's own request retries, a lost connection). The stage task retries it with
  backoff; if it still fails, the CLI prints one line and exits 1.
- :class:`ResourceError`: the machine ran out of something the run needs (a full disk, a disk
  quota). Not the user's input (exit 2 says "fix your command"), not a bug (a traceback helps
  nobody), and not retried: the stage task's retry comes seconds later, finds the same full
  disk, and would only repeat the failure. One line naming what to free, exit code 1 (run
  again once freed: finished shards and checkpoints are kept, so the next run resumes).
- anything else is a bug: not retried, a traceback and a non-zero exit.

Subclasses keep ``ValueError`` or ``RuntimeError`` as a second base where older code catches them
that way; the kind is decided here, never by ``except ValueError``.
"""

from __future__ import annotations

import errno
import os
from typing import Literal

Kind = Literal["user", "transient", "resource", "bug"]


class UserError(Exception):
    """Something the user can fix: one line, exit code 2, never retried."""


class TransientError(Exception):
    """A failure that may pass on a retry: retried with backoff by the stage task."""


class ResourceError(Exception):
    """The machine lacks a resource the run needs (disk space): one line, exit 1, not retried."""


# Library exceptions that mean the same as TransientError (a connection reset, a socket timeout).
TRANSIENT_BUILTINS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def kind_of(exc: BaseException) -> Kind:
    """The kind of ``exc``: "user", "transient", "resource" or "bug".

    A full disk is "resource" however it arrives: as our :class:`ResourceError` naming the path,
    or as a library's own exception that only carries the OS error (DuckDB's, torch's).
    """
    if isinstance(exc, UserError):
        return "user"
    if isinstance(exc, ResourceError) or is_disk_full(exc):
        return "resource"
    if isinstance(exc, (TransientError, *TRANSIENT_BUILTINS)):
        return "transient"
    return "bug"


# A write refused for lack of space: ENOSPC (the filesystem is full), EDQUOT (the user's quota).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that keep only the text of the OS error say it (DuckDB, safetensors, torch's
# zip writer): "No space left on device", "Disk quota exceeded".
_DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or during, is a full disk."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_retried(exc: BaseException) -> bool:
    """Whether the stage task retries after ``exc`` (transient failures only)."""
    return kind_of(exc) == "transient"


def one_line(exc: BaseException) -> str:
    """The message as the CLI prints it: the first non-empty line, never a traceback."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
