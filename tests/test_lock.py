"""One writer per workspace: refusal names the holder; a killed holder's lock is recovered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data.lock import FileLease, WorkspaceBusyError, WorkspaceLock
from tests.fencing import check_same_host_name_never_taken_over

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


def test_check_free_refuses_a_held_workspace_and_leaves_the_record(
    tmp_path: Path, python: str
) -> None:
    """The pre-Prefect check takes nothing and writes nothing: a killed holder's record stays
    for the real run to report as a stale lock."""
    WorkspaceLock(tmp_path).check_free()  # no lock file yet: free
    held = _holder(tmp_path, python)
    try:
        with pytest.raises(WorkspaceBusyError, match=r"mpd run -c nightly\.yaml"):
            WorkspaceLock(tmp_path).check_free()
    finally:
        held.kill()  # dies without releasing: the record stays, its pid names no process
        held.wait()
    record = (tmp_path / ".lock").read_text()
    WorkspaceLock(tmp_path).check_free()
    assert (tmp_path / ".lock").read_text() == record
    with WorkspaceLock(tmp_path) as lock:
        assert lock.stale is not None and lock.stale["command"] == "mpd run -c nightly.yaml"


def test_fencing_same_host_name_never_takes_over_a_live_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workspace two machines mount (the lease file judged by expiry): holders with the same
    host name but other machine or boot ids never take over each other's live lease, even when
    the holder's pid names no process here (tests/fencing.py)."""
    lock = tmp_path / ".lock"
    check_same_host_name_never_taken_over(lambda rec, ttl: FileLease(lock, rec, ttl), monkeypatch)
