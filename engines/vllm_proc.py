"""One vLLM worker process seen from the parent: start, exchange frames, stop.

The frame format and the protocol are described in ``engines/vllm_worker.py``.
Every failure is one line that names the cause and the worker's log file, which
holds vLLM's own output; its kind is the one the worker judged: the user's
(:class:`WorkerRefusedError`: no vLLM in the interpreter, a model or a setting vLLM
refuses), memory (:class:`data.memory.MemoryExhaustedError`), or transient
(:class:`WorkerError`: the worker died, was killed, or failed a request; retried).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from data.errors import TransientError, UserError
from data.memory import HINT, MemoryExhaustedError

# The module this one runs as a subprocess, by file path: no import names it, so it is declared
# here, and every stage key that reaches this module covers it too (data/keys.py follows STARTS).
STARTS = ("engines.vllm_worker",)
WORKER = Path(__file__).with_name("vllm_worker.py")
HEADER = struct.Struct(">Q")


class WorkerError(TransientError):
    """The vLLM worker could not start, failed a request, or died (one line; retried)."""


class WorkerRefusedError(UserError):
    """vLLM is missing from the interpreter, or refused the model or a setting (one line)."""


class Worker:
    """A vLLM worker subprocess in its own session (so it and vLLM's children stop as one)."""

    def __init__(self, python: str, *, env: dict[str, str], log_path: Path) -> None:
        self.python, self.env, self.log_path = python, env, log_path
        self.proc: subprocess.Popen | None = None

    def launch(self, llm_args: dict[str, Any]) -> None:
        """Start the process and send it the model settings (it loads them in the background)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        self.send({"op": "init", "llm": llm_args})

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        """The worker's "ready" frame (vocab size, vLLM version) once the model is loaded."""
        return self.receive("start-up", deadline=deadline)

    def send(self, frame: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        data = pickle.dumps(frame, protocol=4)
        try:
            self.proc.stdin.write(HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died("sending a request") from None

    def receive(self, what: str, deadline: float | None = None) -> Any:
        """The worker's reply: ``result`` (or the ready frame), or a :class:`WorkerError`."""
        head = self._read(HEADER.size, what, deadline)
        (size,) = HEADER.unpack(head)
        reply = pickle.loads(self._read(size, what, None))
        if "error" in reply:
            said = f"vllm engine, {what}: {reply['error']} (log: {self.log_path})"
            kind = reply.get("kind")
            if kind == "user":
                raise WorkerRefusedError(said)
            if kind == "resource":
                raise MemoryExhaustedError(f"{said}; {HINT}")
            raise WorkerError(said)
        return reply.get("result", reply)

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask the worker to exit; after ``grace_s``, terminate, then kill its whole group."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError, ValueError):
            data = pickle.dumps({"op": "close"}, protocol=4)
            proc.stdin.write(HEADER.pack(len(data)) + data)  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        for sig, wait in ((None, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything vLLM left behind in the group

    # -- internals ---------------------------------------------------------------------
    def _read(self, n: int, what: str, deadline: float | None) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([fd], [], [], max(left, 0.0))
                if not ready:
                    self.stop(grace_s=0.0)
                    raise WorkerError(
                        f"vllm engine: no answer within the start-up timeout while {what} "
                        f"(log: {self.log_path})"
                    )
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise self._died(what)
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _died(self, what: str) -> WorkerError:
        code = self.proc.wait(timeout=30) if self.proc is not None else None
        return WorkerError(
            f"vllm engine: the worker exited (code {code}) during {what}: "
            f"{last_error(self.log_path)} (log: {self.log_path})"
        )


def last_error(log_path: Path) -> str:
    """The most telling line of a worker log: its last error line, else its last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if re.search(r"Error|error:|Killed|out of memory", ln)]
    pick = (errors or lines or ["empty log"])[-1]
    return pick[:300]
