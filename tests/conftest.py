"""Test-session setup: offline, single-threaded, Prefect kept in a temp home.

These variables are set at import time, before any test module imports torch,
transformers or Prefect, because those read them once on import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="mpd-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", str(_HOME / "hf-datasets"))  # not ~/.cache
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_HOME / "prefect" / "storage")

REPO = Path(__file__).resolve().parents[1]
# GSM8K for the tests: 150 train and 50 test problems committed under tests/fixtures/gsm8k
# (MIT, with its LICENSE and NOTICE), so a bare clone runs every test that reads GSM8K. The
# full set (7,473 / 1,319) is read only from a directory the user names in MPD_GSM8K; the few
# tests about the full set itself skip, with one line, without it.
GSM8K_FIXTURE = REPO / "tests" / "fixtures" / "gsm8k"
FULL_GSM8K = Path(os.environ["MPD_GSM8K"]) if os.environ.get("MPD_GSM8K") else None
needs_full_gsm8k = pytest.mark.skipif(
    FULL_GSM8K is None or not (FULL_GSM8K / "test.jsonl").is_file(),
    reason="needs the full GSM8K: set MPD_GSM8K to a directory with train.jsonl and test.jsonl",
)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    """One thread: the CI machine has two shared cores and tests run beside other work."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _interruptible() -> None:
    """Ctrl-C as in a terminal. A pytest-xdist worker starts with SIGINT ignored, which every
    process a test starts would inherit (an ignored signal stays ignored across exec): the
    tests that stop a run with SIGINT need it delivered."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for subprocess-based tests."""
    return sys.executable


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; racy only in theory)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process_tree(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop ``proc``, its process group and every descendant: SIGTERM, then SIGKILL.

    The group catches uvicorn and the services under ``prefect server start``; the
    descendants catch what a worker starts in sessions of its own (each flow run
    is a subprocess with ``start_new_session``), so a failed test leaves nothing
    running.
    """
    if proc.poll() is not None:
        return
    others = _descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        for kill, target in ((os.killpg, proc.pid), *((os.kill, p) for p in others)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM and any(_alive(p) for p in others):
            time.sleep(1)
            continue  # a child ignored SIGTERM: SIGKILL what is left
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One ``prefect server start`` for the whole session; yields its API URL.

    Without it every ``mpd run`` subprocess starts (~6 s) and stops (~1 s) its own
    ephemeral API; with PREFECT_API_URL set here, every subprocess a test launches,
    and every flow a test runs in-process, talks to this one server instead (a cached
    ``mpd run`` takes 7.5 s instead of 15.8 s). Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("prefect_api")``. The database lives in
    the session's temporary PREFECT_HOME. The scheduler service is off: nothing in
    the tests waits for a cron, and a deployed 02:00 schedule must not start a
    campaign on its own if the suite happens to run at 02:00.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = _HOME / "prefect-server.log"
    env = {
        **os.environ,
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)  # the server must not try to reach another one
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [*cmd, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, stopped as one
        )
    previous = os.environ.get("PREFECT_API_URL")
    try:
        _wait_healthy(url, server, log_path)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = url  # for subprocesses (mpd run, prefect, workers)
        # Prefect reads its settings once, at import: in-process flows need the context too.
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            _drain_prefect_workers()
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        stop_process_tree(server)


def _drain_prefect_workers() -> None:
    """Send this process's queued run logs and events while the server still listens.

    Otherwise the exit-time flush of an in-process flow's logs prints "Error logging
    to API" after the server is gone (what ``prefect_test_harness`` drains too).
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # never started: nothing queued
        APILogWorker.instance().drain()
    EventsWorker.drain_all()


def _wait_healthy(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    """Poll GET /health until it answers 200; fail with the server's log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    stop_process_tree(server)
    pytest.fail(f"prefect server at {url} not healthy after {timeout:.0f}s:\n{tail}")


def write_manifest(round_dir: Path, stage: str, round_: int) -> None:
    """A real manifest (data.manifest.Manifest) committing the round directory's Parquet files,
    for tests that lay out a workspace by hand: SQL views read the files a manifest lists."""
    import json

    from data.fsutil import sha256_file
    from data.manifest import MANIFEST, FileEntry, Manifest

    files = [
        FileEntry(f.name, f.stat().st_size, sha256_file(f))
        for f in sorted(round_dir.glob("*.parquet"))
        if not f.name.startswith((".", "_"))
    ]
    man = Manifest(stage, round_, "k" * 64, files, 0, 0.0, 0.0, 0.0, "test")
    (round_dir / MANIFEST).write_text(json.dumps(man.to_dict()))
