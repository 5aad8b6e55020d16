"""What an object store's failure means: the store did not answer (transient), or it answered
no (the user's to fix). One job: tell them apart, and say each in one line.

- :class:`StorageUnreachableError` (a :class:`~data.errors.TransientError`): connection refused
  or reset, a timeout, a 5xx. The store may answer later: retried, then one line naming the
  endpoint, exit 1. A tester's unreachable endpoint used to exit 2, as if mistyped, after
  10-20 s of botocore's own retries that nobody was told about.
- :class:`StorageError` (a :class:`~data.errors.UserError`): no such bucket, no access, a
  refused request. One line, exit 2, never retried.

botocore and aiohttp are optional (not every fsspec store uses them): their error bases are
caught where installed (:func:`client_errors`), and told apart by class name, not imported.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from typing import Any
from urllib.parse import urlsplit

from data.errors import TransientError, UserError

STORAGE_WAIT_S = 15.0  # how long a store that does not answer is retried ($MPD_STORAGE_WAIT_S)
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp")
# Connection-level failures of the S3 client stack: the store did not answer, or not whole.
_UNREACHABLE_NAMES = {
    "EndpointConnectionError",  # botocore: refused, DNS, no route
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "HTTPClientError",
    "ClientConnectionError",  # aiohttp
    "ServerTimeoutError",
    "FSTimeoutError",  # fsspec
}


class StorageError(UserError):
    """Object storage refused a request: no such bucket, no access (one line: which URL, why)."""


class StorageUnreachableError(TransientError):
    """The object store did not answer: retried, then one line naming the endpoint, exit 1."""


# The error bases of the client libraries under fsspec's S3 and HTTP stores, where installed.
_CLIENT_BASES = (
    ("botocore.exceptions", ("BotoCoreError", "ClientError")),
    ("aiohttp", ("ClientError",)),
)


@functools.cache
def client_errors() -> tuple[type[BaseException], ...]:
    """What a store call can raise that means the store failed: ``OSError`` (what fsspec and
    s3fs turn most failures into, a refused connection and a timeout included) and the error
    bases of the installed clients (botocore, aiohttp). Anything else from a store call is a
    bug. Imported on the first failure only: a local workspace never pays for botocore."""
    found: list[type[BaseException]] = [OSError]
    for module, names in _CLIENT_BASES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return tuple(found)


def storage_wait_s() -> float:
    """How long a store that does not answer is retried before the run gives up."""
    return float(os.environ.get("MPD_STORAGE_WAIT_S") or STORAGE_WAIT_S)


def classify(exc: Exception, url: str, options: dict[str, Any]) -> Exception | None:
    """The one-line error ``exc`` means for workspace ``url``; None: not the store's (re-raise)."""
    if unreachable(exc):
        return StorageUnreachableError(
            f"object store {endpoint(exc, url, options)} (workspace {url}) did not answer: "
            f"{_without_urls(one_line(exc))}"
        )
    if isinstance(exc, OSError) or type(exc).__module__.startswith(_CLIENT_MODULES):
        return StorageError(f"workspace {url}: {one_line(exc)}")
    return None


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the store did not answer, or answered 5xx."""
    for err in (exc, exc.__cause__, exc.__context__):
        if err is None:
            continue
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _UNREACHABLE_NAMES for cls in type(err).__mro__):
            return True
        meta = (getattr(err, "response", None) or {}).get("ResponseMetadata") or {}
        if isinstance(meta, dict) and int(meta.get("HTTPStatusCode") or 0) >= 500:
            return True
    return False


def endpoint(exc: BaseException, url: str, options: dict[str, Any]) -> str:
    """Where the store was asked: scheme://host:port of the request, else of the options."""
    where = (getattr(exc, "kwargs", None) or {}).get("endpoint_url")
    where = where or (options.get("client_kwargs") or {}).get("endpoint_url")
    where = where or options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if not where:
        return url.split("/", 3)[2] if url.count("/") >= 2 else url
    parts = urlsplit(str(where))
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(where)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _without_urls(text: str) -> str:
    """botocore names the whole request URL (query and all); the endpoint is said once."""
    return re.sub(r':?\s*"?https?://[^\s"]*"?', "", text).strip() or text
