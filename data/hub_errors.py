"""Whether the Hugging Face hub answered: a problem set named by a hub id (``openai/gsm8k``) is
fetched by ``datasets.load_dataset``, and its failure means one of two things.

- The hub did not answer (connection refused or dropped, a timeout, an HTTP 5xx, 408 or 429
  after the hub client's own retries): :class:`HubUnreachableError`, transient, retried by the
  stage task, then one line, exit 1.
- Anything else the hub or ``datasets`` said (no such dataset or config, a gated one, files
  that do not parse, the hub switched off here by HF_HUB_OFFLINE with the dataset not cached):
  the user's, said by the caller (``data/problem_readers.py``).

datasets words the hub's failures as it likes (a 503 arrives as "FileNotFoundError: Couldn't
find 'openai/gsm8k' on the Hugging Face Hub either", the offline switch as a ConnectionError),
so the whole cause chain is read.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

from data.errors import TransientError, chain_of

RETRIED_STATUS = (408, 429)  # the hub's "try again": not answering, as a 5xx is


class HubUnreachableError(TransientError):
    """The Hugging Face hub did not answer for a dataset id: retried by the stage task, then one
    line naming the dataset, exit 1."""


@functools.cache
def transport_errors() -> tuple[type[BaseException], ...]:
    """The transport error base of the HTTP client under huggingface_hub (httpx2 today, httpx
    before it): a connection dropped mid-answer comes through raw, as one of these."""
    found = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


def not_answered(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the hub did not answer; None if none does."""
    for err in chain_of(exc):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status in RETRIED_STATUS):
            return err
        if isinstance(err, (ConnectionError, TimeoutError, *transport_errors())):
            return err
    return None


def said(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 200 characters of it."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:200]}"
