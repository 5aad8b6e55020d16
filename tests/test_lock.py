"""One writer per workspace: refusal names the holder; a killed holder's lock is recovered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data.lock import WorkspaceBusyError, WorkspaceLock

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from data.lock import WorkspaceLock
lock = WorkspaceLock({ws!r}, command="mpd run -c nightly.yaml").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(ws: Path, python: str) -> subprocess.Popen[str]:
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen(
        [python, "-c", HOLD.format(repo=repo, ws=str(ws))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_with_the_holders_name(tmp_path: Path, python: str) -> None:
    proc = _holder(tmp_path, python)
    try:
        with pytest.raises(WorkspaceBusyError) as err:
            WorkspaceLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {proc.pid}" in msg and "mpd run -c nightly.yaml" in msg
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_is_recovered(tmp_path: Path, python: str) -> None:
    proc = _holder(tmp_path, python)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid
    start = time.time()
    with WorkspaceLock(tmp_path) as lock:
        assert lock.stale is not None and lock.stale["pid"] == proc.pid
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert time.time() - start < 5


def test_clean_release_is_not_reported_stale(tmp_path: Path) -> None:
    with WorkspaceLock(tmp_path):
        pass
    with WorkspaceLock(tmp_path) as lock:
        assert lock.stale is None


def test_check_free_refuses_a_held_workspace_and_leaves_the_record(tmp_path: Path) -> None:
    """The pre-Prefect check takes nothing and writes nothing: a killed holder's record stays
    for the real run to report as a stale lock."""
    WorkspaceLock(tmp_path).check_free()  # no lock file yet: free
    held = WorkspaceLock(tmp_path, command="mpd run (nightly)").acquire()
    try:
        with pytest.raises(WorkspaceBusyError, match="mpd run \\(nightly\\)"):
            WorkspaceLock(tmp_path).check_free()
    finally:
        record = (tmp_path / ".lock").read_text()
        os.close(held._fd)  # dies without releasing: the record stays, the lock goes
    WorkspaceLock(tmp_path).check_free()
    assert (tmp_path / ".lock").read_text() == record
    with WorkspaceLock(tmp_path) as lock:
        assert lock.stale is not None and lock.stale["command"] == "mpd run (nightly)"
