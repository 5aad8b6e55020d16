"""Library versions asked of another interpreter (data/interpreters.py): real interpreters and
real scripts standing in for broken ones, each started as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import interpreters
from data.errors import kind_of
from data.interpreters import InterpreterError, InterpreterTimeoutError, interpreter_versions

DISTS = ("pyarrow", "no-such-distribution-mpd")


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_versions_are_the_interpreters_own_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow

    got = interpreter_versions(sys.executable, DISTS, cache=tmp_path)
    assert got == {"pyarrow": pyarrow.__version__, "no-such-distribution-mpd": "absent"}
    (entry,) = (tmp_path / "interpreters").glob("*.json")
    assert json.loads(entry.read_text())["versions"] == got

    def never(*_: object) -> dict:
        raise AssertionError("asked again although nothing changed")

    monkeypatch.setattr(interpreters, "_ask", never)
    assert interpreter_versions(sys.executable, DISTS, cache=tmp_path) == got
    with pytest.raises(AssertionError, match="asked again"):  # other questions are asked
        interpreter_versions(sys.executable, ("pyarrow",), cache=tmp_path)


def test_an_upgrade_in_a_site_directory_is_asked_again(tmp_path: Path) -> None:
    """``pip install -U`` leaves ``bin/python`` untouched but renames a ``*.dist-info`` in the
    site directory: its mtime moves, and the cached answer is not trusted any more."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    (site,) = env.glob("lib/python*/site-packages")
    cache = tmp_path / "cache"
    assert interpreter_versions(python, ("mpd-fake-dist",), cache=cache) == {
        "mpd-fake-dist": "absent"
    }
    info = site / "mpd_fake_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpd-fake-dist\nVersion: 1.0\n")
    later = time.time_ns() + 10**9  # a coarse file system clock must still see a change
    os.utime(site, ns=(later, later))
    assert interpreter_versions(python, ("mpd-fake-dist",), cache=cache) == {"mpd-fake-dist": "1.0"}


def test_a_path_that_is_no_interpreter_is_the_users_mistake(tmp_path: Path) -> None:
    with pytest.raises(InterpreterError, match="no Python interpreter at"):
        interpreter_versions(tmp_path / "missing", DISTS)
    not_a_program = tmp_path / "python"
    not_a_program.write_text("not a program")
    with pytest.raises(InterpreterError, match="cannot run"):
        interpreter_versions(not_a_program, DISTS)
    broken = script(tmp_path, "python3", "echo 'Traceback: vllm env broken' >&2; exit 1")
    with pytest.raises(InterpreterError, match=r"exit 1: Traceback: vllm env broken") as err:
        interpreter_versions(broken, DISTS)
    assert kind_of(err.value) == "user"


def test_an_interpreter_that_hangs_is_transient_and_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded machine or a cold network disk: the question times out, the error is
    transient (retried, exit 1), and the hung process does not outlive it."""
    pidfile = tmp_path / "pid"
    hung = script(tmp_path, "python", f"echo $$ > {pidfile}; exec sleep 60")
    monkeypatch.setattr(interpreters, "ASK_TIMEOUT_S", 1)
    started = time.monotonic()
    with pytest.raises(InterpreterTimeoutError, match="within 1 s") as err:
        interpreter_versions(hung, DISTS)
    assert time.monotonic() - started < 30
    assert kind_of(err.value) == "transient"
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
