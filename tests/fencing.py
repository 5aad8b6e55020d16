"""Helpers of the fencing tests (``pytest -k fencing``): pausing a writer, and two hosts that
share a host name.

The fencing tests themselves sit beside the campaigns they reuse: tests/test_campaign.py (a
local workspace), tests/test_objstore.py (``s3://`` on the moto server), tests/test_lock.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from data.hostid import FAKE_HOST_ENV, identity
from data.lease import Lease, WorkspaceBusyError

LEASE_S = 3.0  # the paused writer's lease ($MPD_LEASE_S): renewed every second


def pause_outside_lease_steps(proc: subprocess.Popen, lock_file: Path) -> None:
    """SIGSTOP the run's process group at a moment it is not inside one of its lease file's
    short ``flock`` steps (a takeover would wait for that step). Real writers can be stopped
    anywhere; a writer stopped inside a step holds the workspace until it resumes, which is
    the lease's documented limit, not the case under test."""
    for _ in range(200):
        os.killpg(proc.pid, signal.SIGSTOP)
        fd = os.open(lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.01)
        finally:
            os.close(fd)
    pytest.fail("the writer was always inside a lease step")


def resume_and_wait(proc: subprocess.Popen, timeout: float = 180) -> None:
    os.killpg(proc.pid, signal.SIGCONT)
    proc.wait(timeout=timeout)


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def fenced_out(log: str) -> list[str]:
    """The paused writer's error lines (there must be exactly one, saying the lease was lost)."""
    assert "Traceback" not in log and "NoneType: None" not in log, log[-4000:]
    return [line for line in log.splitlines() if line.startswith("mpd: error:")]


def dead_pid() -> int:
    """A pid that names no process here (a process that has just exited)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def other_machine(command: str) -> dict[str, Any]:
    """A lease record of a live holder on *another* machine that has this one's host name;
    its pid names no process here (it is another machine's pid)."""
    return {
        "pid": dead_pid(),
        "host": socket.gethostname(),
        "machine_id": "b" * 32,
        "boot_id": "other-boot",
        "pid_ns": identity()["pid_ns"],
        "command": command,
        "started": "02:00",
    }


def check_same_host_name_never_taken_over(
    make: Callable[[dict[str, Any], float | None], Lease], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways: a live holder on machine B is never taken over from machine A (same host
    name, B's pid dead here), nor A's from B; a holder with this very machine's ids and a dead
    pid is (the one case in which a pid can be looked up)."""
    b_record = other_machine("mpd run (machine B)")
    holder = make(b_record, LEASE_S)
    holder.acquire()  # type: ignore[attr-defined]
    try:
        time.sleep(LEASE_S + 0.5)  # past its first expiry: the heartbeat keeps it live
        mine = {"pid": os.getpid(), **identity(), "command": "mpd run (machine A)"}
        with pytest.raises(WorkspaceBusyError, match=r"machine B.*") as err:
            make(mine, None).acquire()  # type: ignore[attr-defined]
        assert "machine bbbbbbbb" in str(err.value), "the holder is named by its machine id"
    finally:
        holder.release()  # type: ignore[attr-defined]

    # The other way: A (this process) holds; B, same host name, finds A's pid dead *there*.
    a_record = {**other_machine("mpd run (machine A)"), **identity()}
    a_record["pid"] = dead_pid()  # on B, A's pid names no process either
    a_record.update(machine_id="a" * 32, boot_id="boot-a")
    monkeypatch.setenv(FAKE_HOST_ENV, f"{'a' * 32}/boot-a")
    holder = make(a_record, LEASE_S)
    holder.acquire()  # type: ignore[attr-defined]
    try:
        monkeypatch.setenv(FAKE_HOST_ENV, f"{'b' * 32}/other-boot")  # now we are machine B
        with pytest.raises(WorkspaceBusyError, match="machine A"):
            make({**b_record, "pid": os.getpid()}, None).acquire()  # type: ignore[attr-defined]
        monkeypatch.setenv(FAKE_HOST_ENV, f"{'a' * 32}/boot-a")  # machine A again: its pid
        taker = make({"pid": os.getpid(), **identity(), "command": "A again"}, None)
        taker.acquire()  # type: ignore[attr-defined]  # the dead pid of this host: taken over
        assert taker.stale is not None and taker.stale["command"] == "mpd run (machine A)"
        assert taker.token == holder.token + 1, "the fencing token counts on"
        taker.release()  # type: ignore[attr-defined]
    finally:
        holder.stop_heartbeat()
