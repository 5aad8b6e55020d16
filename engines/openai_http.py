"""The openai engine's HTTP side: concurrent POSTs, retried with backoff, failures by meaning.

Requests are sent concurrently (``max_concurrency`` in flight, one pooled connection each)
and retried with exponential backoff on 429, 5xx and connection errors; ``Retry-After`` is
honoured. A request that fails is one line of one of two kinds: refused (401, 403, 404,
400…: the user's configuration) or given up after every retry (transient).

The API key goes only into the ``Authorization`` header: it is never logged, and masked if a
server echoes it in an error; URLs in messages carry no user:password part.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from data.errors import TransientError
from engines.base import EngineUnavailableError

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
MAX_DELAY_S = 60.0


# A request that failed is one line, of one of two kinds: refused (the user's to fix) or
# failing after every retry (transient). Each is caught by its meaning, never together.
class EngineRefusedError(EngineUnavailableError):
    """The server refused the request (401, 403, 404, 400…): its configuration, not luck."""


class EngineGaveUpError(TransientError):
    """The request kept failing (429, 5xx, connection) after the engine's own retries."""


@dataclass
class Poster:
    """One call's requests to ``endpoint``: sent concurrently, each retried on its own."""

    endpoint: str
    url: str  # the endpoint as messages show it (display_url)
    key: str | None = field(repr=False)
    max_concurrency: int
    timeout_s: float
    max_retries: int
    retry_backoff_s: float

    def post_all(
        self,
        bodies: list[dict],
        todo: list[int],
        parse: Callable[[int, dict], dict],
        finished: Callable[[int, dict], None],
    ) -> None:
        """POST ``bodies[i]`` for each ``i`` in ``todo``; ``finished(i, parse(i, reply))`` as
        each reply arrives. The first failure cancels the rest and is raised."""
        run_coroutine(lambda: self._send(bodies, todo, parse, finished))

    async def _send(
        self,
        bodies: list[dict],
        todo: list[int],
        parse: Callable[[int, dict], dict],
        finished: Callable[[int, dict], None],
    ) -> None:
        if not todo:
            return
        limit = asyncio.Semaphore(self.max_concurrency)
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 30.0))
        pool = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=pool) as client:

            async def one(i: int) -> None:
                async with limit:
                    reply = await self._post(client, bodies[i])
                finished(i, parse(i, reply))

            tasks = [asyncio.create_task(one(i)) for i in todo]
            try:
                await asyncio.gather(*tasks)
            finally:  # the first failure ends the call: stop everything still in flight
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _post(self, client: httpx.AsyncClient, body: dict) -> dict:
        """One request, retried on 429/5xx/connection errors with exponential backoff."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = await client.post(self.endpoint, json=body)
            except httpx.TransportError as exc:
                problem = describe_transport(exc)
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        problem = "HTTP 200 with a body that is not JSON"
                else:
                    problem = f"HTTP {resp.status_code}: {self.mask(server_message(resp))}"
                    if resp.status_code not in RETRY_STATUS and resp.status_code < 500:
                        raise EngineRefusedError(f"{self.url}: {problem}")
                    retry_after = retry_after_s(resp)
            if attempt < self.max_retries:
                delay = min(self.retry_backoff_s * 2**attempt, MAX_DELAY_S)
                await asyncio.sleep(max(delay, retry_after or 0.0))
        raise EngineGaveUpError(
            f"{self.url}: {problem} (gave up after {self.max_retries + 1} attempt(s))"
        )

    def mask(self, text: str) -> str:
        """``text`` with the API key masked, for a server that echoes it in an error."""
        return text.replace(self.key, "***") if self.key else text


def read_key(env: str | None) -> str | None:
    """The API key from the environment variable ``env`` names; None when no variable is named."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise EngineUnavailableError(
            f"the openai engine's api_key_env names {env}, but that environment variable is not set"
        )
    return key


def server_message(resp: httpx.Response) -> str:
    """The server's own error message, first line, at most 300 characters."""
    try:
        raw = resp.json()
        err = raw.get("error", raw) if isinstance(raw, dict) else raw
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = str(msg)
    except ValueError:
        text = resp.text
    lines = text.strip().splitlines()
    return (lines[0] if lines else resp.reason_phrase)[:300]


def retry_after_s(resp: httpx.Response) -> float | None:
    try:
        return min(float(resp.headers.get("retry-after", "")), MAX_DELAY_S)
    except ValueError:
        return None


def describe_transport(exc: httpx.TransportError) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({detail or 'connection refused'})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def display_url(url: str) -> str:
    """``url`` without any user:password part, fit for logs and errors."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else url


def run_coroutine(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to completion from sync code, even under a running event loop."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:  # the usual case; outside the except block, so errors carry no context
        asyncio.run(make())
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:  # boundary: a thread hands its failure to the caller's
            errors.append(exc)

    thread = threading.Thread(target=target, name="mpd-openai")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
