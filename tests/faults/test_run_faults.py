"""Commands whose cost or effect must follow what a workspace holds, not what a config says:
one table of (case, command, exit code, text), each run as the real ``mpd`` on a workspace that
holds one computed round (written by the real store: ``sample`` round 1, ``eval`` round 0).
None of them starts Prefect, so a row costs about a second.

- ``mpd rerun --round N`` past the computed rounds used to print "invalidated: nothing" and
  start a campaign up to round N; past the rounds the run reaches, it invalidated rounds it
  would never recompute. Both are one line, exit 2, and change nothing.
- ``mpd status`` with ``rounds: 1000000`` built six million rows and never finished: it now
  lists the rounds the workspace has, and one line for the rest.

A lock file that is not a holder record (a damaged ``.lock``) is below the table: it named no
live holder, yet crashed the lock with an AttributeError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.lock import WorkspaceLock
from data.store import StageStore
from tests.conftest import REPO
from tests.faults.test_storage_faults import _workspace

# (case id, argv, exit code, text the output's last line must contain)
CASES: list[tuple[str, list[str], int, str]] = [
    ("rerun a round never computed", ["rerun", "-w", "ws", "--round", "99", "--from", "filter"],
     2, "has rounds 0-1 computed"),
    ("rerun the next configured round", ["rerun", "-w", "ws", "--round", "2", "--from", "sample",
                                         "--rounds", "3"], 2, "has rounds 0-1 computed"),
    ("rerun past the rounds the run reaches", ["rerun", "-w", "ws", "--round", "1", "--from",
                                               "sample", "--rounds", "0"], 2,
     "past the rounds this run reaches (0)"),
    ("status of a million configured rounds", ["status", "-w", "ws", "--set", "rounds=1000000"],
     0, "rounds 3-1000000: not computed yet"),
]  # fmt: skip


def mpd(cwd: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        timeout=timeout,
    )


def committed(ws: Path) -> list[tuple[int, str, str]]:
    return [(m.round, m.stage, m.key) for m in StageStore(ws).committed()]


@pytest.mark.parametrize(
    ("argv", "code", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cost_and_effect_follow_the_workspace(
    tmp_path: Path, argv: list[str], code: int, expected: str
) -> None:
    ws = _workspace(tmp_path / "ws")
    before = committed(ws)
    out = mpd(tmp_path, *argv)
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "prefect" not in out.stderr.lower(), out.stderr
    last = (out.stderr if code else out.stdout).strip().splitlines()[-1]
    assert expected in last, out.stdout[-2000:] + out.stderr[-2000:]
    if code:
        assert last.startswith("mpd: error:") and len(out.stderr.strip().splitlines()) == 1
    assert committed(ws) == before, "nothing was invalidated"


def test_status_costs_the_same_for_a_million_configured_rounds(tmp_path: Path) -> None:
    """As fast as ``rounds: 3`` on the same workspace: the cost follows computed rounds."""
    _workspace(tmp_path / "ws")
    seconds = {}
    for rounds in (3, 1_000_000):
        started = time.monotonic()
        out = mpd(tmp_path, "status", "-w", "ws", "--set", f"rounds={rounds}")
        seconds[rounds] = time.monotonic() - started
        assert out.returncode == 0, out.stderr[-2000:]
        assert len(out.stdout.splitlines()) < 40, "rows for the rounds computed, one line more"
    assert seconds[1_000_000] < 2 * seconds[3] + 1.0, seconds


@pytest.mark.parametrize("body", ["[1, 2]", '"mpd"'], ids=["a JSON list", "a JSON string"])
def test_a_damaged_lock_file_names_no_holder(tmp_path: Path, body: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".lock").write_text(body)
    WorkspaceLock(ws).check_free()
    with WorkspaceLock(ws, command="mpd run") as lock:
        assert not lock.stale  # nobody to name as the previous holder
        assert '"command": "mpd run"' in (ws / ".lock").read_text()
