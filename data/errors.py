"""What a failure means, defined once: the CLI, the flows and the Prefect stage task all ask here.

Four kinds, by meaning rather than by base class. Every error class of mpd derives from exactly
one of the four bases below and from no builtin error besides ``Exception`` (a test checks it):
a second base such as ``ValueError`` let a ``except ValueError`` written for a library's
parse error decide, by accident, what a user mistake was.

- :class:`UserError`: something the user can fix (a wrong key, a missing model, a filter that
  keeps nothing, a server that refuses the API key). One line, exit code 2, never retried.
- :class:`TransientError`: may pass on its own (a dead engine worker, a server that kept timing
  out after the engine's own request retries, a lost connection, an object store or the model
  hub not answering). The stage task retries it with backoff; if it still fails, the CLI prints
  one line and exits 1.
- :class:`ResourceError`: the machine ran out of something the run needs (a full disk, a disk
  quota, memory: the CPU's or a GPU's). Not the user's input (exit 2 says "fix your command"),
  not a bug (a traceback helps nobody), and not retried: the stage task's retry comes seconds
  later, finds the same full disk or the same model too big for the GPU, and would only repeat
  the failure. One line naming what and where, exit code 1 (run again once freed: finished
  shards and checkpoints are kept, so the next run resumes).
- :class:`InternalError`, and anything else not named here: a bug. Not retried, a traceback
  and a non-zero exit. ``InternalError`` marks our own broken invariants (a table that does
  not match its schema, a stage committed with a shard missing); a library's ``ValueError``
  met where none was expected is a bug as well.

A library's exception is given its kind where it is caught, by what the call was (loading a
model: a missing file is the user's, an allocation that failed is the machine's); the
exceptions below that mean the same wherever they surface (a connection reset, a full disk, an
allocator out of memory) are recognised here, so that one reaching the CLI is still one line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from typing import Literal

Kind = Literal["user", "transient", "resource", "bug"]


class UserError(Exception):
    """Something the user can fix: one line, exit code 2, never retried."""


class TransientError(Exception):
    """A failure that may pass on a retry: retried with backoff by the stage task."""


class ResourceError(Exception):
    """The machine lacks a resource the run needs (disk space, memory): one line, exit 1, not
    retried."""


class InternalError(Exception):
    """A broken invariant of mpd itself: a bug, with its traceback; never retried."""


# The four bases, by kind (what the error-class test checks every class against).
BASES: dict[Kind, type[Exception]] = {
    "user": UserError,
    "transient": TransientError,
    "resource": ResourceError,
    "bug": InternalError,
}

# Library exceptions that mean the same as TransientError (a connection reset, a socket timeout).
TRANSIENT_BUILTINS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def kind_of(exc: BaseException) -> Kind:
    """The kind of ``exc``: "user", "transient", "resource" or "bug".

    A full disk or an exhausted memory is "resource" however it arrives: as our
    :class:`ResourceError` naming what and where, or as a library's own exception that only
    carries the OS error or the allocator's words (DuckDB's, torch's).
    """
    if isinstance(exc, UserError):
        return "user"
    if isinstance(exc, ResourceError) or is_disk_full(exc) or is_out_of_memory(exc):
        return "resource"
    if isinstance(exc, (TransientError, *TRANSIENT_BUILTINS)):
        return "transient"
    return "bug"


# A write refused for lack of space: ENOSPC (the filesystem is full), EDQUOT (the user's quota).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that keep only the text of the OS error say it (DuckDB, safetensors, torch's
# zip writer): "No space left on device", "Disk quota exceeded".
_DISK_FULL_TEXTS = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS)
# How torch says an allocation failed. A GPU's: ``torch.OutOfMemoryError`` ("CUDA out of
# memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of ..."), or a plain
# RuntimeError from a kernel launch ("CUDA error: out of memory"). The CPU's: a plain
# RuntimeError, "[enforce fail at alloc_cpu.cpp:127] ... DefaultCPUAllocator: can't allocate
# memory: you tried to allocate 70368744177664 bytes. Error code 12 (Cannot allocate memory)".
_OUT_OF_MEMORY_TEXTS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    os.strerror(errno.ENOMEM),  # "Cannot allocate memory"
)
# torch's class (``torch.OutOfMemoryError``, also ``torch.cuda.OutOfMemoryError``) and DuckDB's
# (``duckdb.OutOfMemoryException``), known by name so that this module imports neither.
_OUT_OF_MEMORY_CLASSES = ("OutOfMemoryError", "OutOfMemoryException")


def chain_of(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or during, is a full disk."""
    for current in chain_of(exc):
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXTS):
            return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or during, is an allocation that
    failed: Python's ``MemoryError``, torch's ``OutOfMemoryError``, an OS error ENOMEM, or a
    torch RuntimeError in the allocator's words (CPU or CUDA)."""
    for current in chain_of(exc):
        if isinstance(current, MemoryError):
            return True
        if isinstance(current, OSError) and current.errno == errno.ENOMEM:
            return True
        if any(cls.__name__ in _OUT_OF_MEMORY_CLASSES for cls in type(current).__mro__):
            return True
        if isinstance(current, RuntimeError) and any(
            text in str(current) for text in _OUT_OF_MEMORY_TEXTS
        ):
            return True
    return False


def is_retried(exc: BaseException) -> bool:
    """Whether the stage task retries after ``exc`` (transient failures only)."""
    return kind_of(exc) == "transient"


def one_line(exc: BaseException) -> str:
    """The message as the CLI prints it: the first non-empty line, never a traceback."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def best_effort(what: str, log: logging.Logger) -> Iterator[None]:
    """Run a block whose failure must not fail the run: what only shows a run's progress or
    outcome (a Prefect artifact, a progress bar), never its data. A failure is logged in one
    line; a bug is logged with its traceback too, so that it is seen, not hidden."""
    try:
        yield
    except Exception as exc:  # boundary: visibility only, the run's own data never passes here
        log.warning("%s: %s", what, one_line(exc), exc_info=kind_of(exc) == "bug")
