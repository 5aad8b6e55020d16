"""What a failure means, defined once: the CLI, the flows and the Prefect stage task all ask here.

Three kinds, by meaning rather than by base class:

- :class:`UserError`: something the user can fix (a wrong key, a missing model, a filter that
  keeps nothing, a server that refuses the API key). One line, exit code 2, never retried.
- :class:`TransientError`: may pass on its own (a dead engine worker, a server that kept timing
  out after the engine's own request retries, a lost connection). The stage task retries it with
  backoff; if it still fails, the CLI prints one line and exits 1.
- anything else is a bug: not retried, a traceback and a non-zero exit.

Subclasses keep ``ValueError`` or ``RuntimeError`` as a second base where older code catches them
that way; the kind is decided here, never by ``except ValueError``.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["user", "transient", "bug"]


class UserError(Exception):
    """Something the user can fix: one line, exit code 2, never retried."""


class TransientError(Exception):
    """A failure that may pass on a retry: retried with backoff by the stage task."""


# Library exceptions that mean the same as TransientError (a connection reset, a socket timeout).
TRANSIENT_BUILTINS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def kind_of(exc: BaseException) -> Kind:
    """The kind of ``exc``: "user", "transient" or "bug"."""
    if isinstance(exc, UserError):
        return "user"
    if isinstance(exc, (TransientError, *TRANSIENT_BUILTINS)):
        return "transient"
    return "bug"


def is_retried(exc: BaseException) -> bool:
    """Whether the stage task retries after ``exc`` (transient failures only)."""
    return kind_of(exc) == "transient"


def one_line(exc: BaseException) -> str:
    """The message as the CLI prints it: the first non-empty line, never a traceback."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
