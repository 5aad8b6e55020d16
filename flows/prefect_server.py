"""The Prefect API server of one mpd command: Prefect's ephemeral server, started by mpd so that
it never outlives the run.

Prefect starts its ephemeral API lazily, from whichever thread first needs a client, and stops it
in an ``atexit`` hook. A run ended by ``kill -9``, or by the SIGTERM Prefect re-raises with the
default handler, runs no ``atexit`` hook: its server (uvicorn, ~200 MB, reparented to pid 1) was
found alive 15-35 minutes later. So when no API is configured, mpd starts the same server itself,
from the main thread, as a process the kernel kills when the run ends, however it ends
(flows/prefect_server_main.py), and points ``PREFECT_API_URL`` at it for the run and every
process the run starts. In its own process group: Ctrl-C in a terminal reaches the run, which
stops (flows/stopping.py), and not the server under a run that still reports to it.

An API that is configured (``PREFECT_API_URL`` in the environment, a Prefect profile or
prefect.toml) is used as before, untouched; with ephemeral mode off, Prefect's own error stands.

The server is started before the heavy imports (torch, the stages) and waited for just before
the flow starts, so its start-up overlaps with theirs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows import stopping
from flows.prefect_env import PrefectStartupError

log = logging.getLogger("mpd")

SERVER_MAIN = Path(__file__).with_name("prefect_server_main.py")
_SERVER: APIServer | None = None  # one per process, as Prefect's ephemeral server is
# No proxy for a server on 127.0.0.1, whatever HTTP_PROXY says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start_api() -> APIServer | None:
    """Start this process's own API server, unless Prefect is configured with one (None)."""
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    env = {
        **os.environ,
        # what Prefect's SubprocessASGIServer gives its server: no UI, ephemeral mode
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }
    _SERVER = APIServer(env, float(settings.server.ephemeral.startup_timeout_seconds))
    _SERVER.launch()
    stopping.on_stop(_SERVER.kill)
    atexit.register(_SERVER.stop)  # after Prefect's exit-time drain of logs and events
    return _SERVER


class APIServer:
    """One uvicorn process serving Prefect's API on 127.0.0.1, tied to this process's life."""

    def __init__(self, env: dict[str, str], timeout: float) -> None:
        self.env, self.timeout = env, timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def launch(self) -> None:
        import prefect

        self.port = _free_port()
        args = ["--app-dir", str(Path(prefect.__file__).resolve().parent.parent)]
        args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER_MAIN), str(os.getpid()), *args],
            env=self.env,
            process_group=0,
        )

    def wait(self) -> None:
        """Block until the server answers, then point Prefect at it; one retry on a new port,
        then :class:`PrefectStartupError` (one line)."""
        if self.ready:
            return
        for attempt in (1, 2):
            if self._healthy_within(self.timeout):
                break
            self.stop()
            if attempt == 2:
                raise PrefectStartupError(
                    f"the local Prefect API server did not start within {self.timeout:g} s, "
                    "twice (a busy machine?): run again, raise "
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL "
                    "at a running `prefect server`"
                )
            log.warning("the local Prefect API server did not start within %g s; retrying once",
                        self.timeout)  # fmt: skip
            self.launch()
        os.environ["PREFECT_API_URL"] = self.api_url  # for every process the run starts
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" dead link
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # Prefect read its settings at import, before this
        self.ready = True

    def kill(self) -> None:
        """At once (a stop signal's cleanup: nothing is waited on)."""
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()

    def stop(self) -> None:
        """At a normal exit: let it close its database, then make sure it is gone."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _healthy_within(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # it died (its port taken after all?)
                return False
            try:
                with _OPENER.open(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False


def _free_port() -> int:
    """A port nobody listens on now (a server that loses it to a race is started again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
