"""A run stops when told, and its Prefect server never outlives it (issue 26, "Stopping").

One table of (case, signal, whom it is sent to, the stage it lands in, exit code, resumed?): each
row starts a real ``mpd run`` with its own Prefect API server (no PREFECT_API_URL, so not the
session's ``prefect_api`` server: the run's own server is what is under test), waits until the
stage is under way, sends the signal and checks that

- the process ends within 10 s of the signal, with the exit code, no traceback, and one last line
  saying it stopped and that finished shards are kept;
- no process the run started is left, its API server included (kill -9 too);
- the workspace lock is released (its holder record emptied);
- resumed rows: the next ``mpd run`` reuses the finished work and commits rows identical to an
  uninterrupted run's, stage by stage.

On the commit under review (4c4a540) SIGTERM ended the run with the default handler (no exit
code, the API server left running under pid 1), kill -9 left the server too, and Ctrl-C (SIGINT
to the process group, the server included) hung for minutes in Prefect's exit-time drain.
Selected by ``pytest -k signal``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.store import StageStore
from tests.conftest import REPO, _descendants

# Whole `mpd run`s (about 2 minutes a file): `make test` runs them, `make test-fast` does not.
pytestmark = pytest.mark.slow

KEEP_FIRST = REPO / "tests" / "fixtures" / "keep_first_filter.sql"
STAGES = ["sample", "rewrite", "score", "filter", "train", "eval"]
# The smallest round that reaches train: 4 sample shards, 60 train steps checkpointed every 10,
# so a signal has a stage under way to land in.
SMALL: dict[str, object] = {
    "problems.n_train": 40,
    "problems.n_test": 10,
    "problems.n_heldout": 5,
    "sample.problems_per_round": 8,
    "sample.n": 1,
    "sample.shard_size": 2,
    "sample.max_tokens": 160,
    "rewrite.max_tokens": 48,
    "score.context": "rewrite",
    "filter.ratio": 10,
    "filter.sql": KEEP_FIRST,
    "train.steps": 60,
    "train.batch_size": 2,
    "train.checkpoint_every": 10,
    "evaluate.limit": 2,
    "evaluate.max_tokens": 16,
}
# What appears in the workspace once the stage is under way, with some of its work finished.
UNDER_WAY = {
    "sample": ".staging/sample/round=1/*/_shards/part-*.json",
    "train": ".staging/train/round=1/*/checkpoints/step-*",
}
STOPPED = "mpd: stopped by {}; finished shards are kept and reused by the next run"
SERVER = "prefect.server.api.server:create_app"  # in the command line of a Prefect API server
EXIT_WITHIN_S = 10.0

# (case id, signal, to the whole process group (a terminal's Ctrl-C), stage, exit code, resume)
CASES = [
    ("sigterm mid-sample", signal.SIGTERM, False, "sample", 143, True),
    ("sigterm mid-train", signal.SIGTERM, False, "train", 143, True),
    ("sigint ctrl-c mid-sample", signal.SIGINT, True, "sample", 130, False),
    ("sigkill mid-sample", signal.SIGKILL, False, "sample", -signal.SIGKILL, False),
]  # fmt: skip


def env() -> dict[str, str]:
    """The test session's environment without PREFECT_API_URL: each run starts its own API."""
    out = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**out, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_args(ws: Path) -> list[str]:
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "flows.cli", "run", "-w", str(ws), "--rounds", "1", *sets]


def mpd_run(ws: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        run_args(ws), capture_output=True, text=True, cwd=REPO, env=env(), timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return out


def rows(ws: Path, stage: str) -> list[str]:
    """A committed round-1 table, as the next stage reads it: sorted rows, timings left out."""
    from tasks.common import read_stage

    table = read_stage(StageStore(ws), stage, 1)
    table = table.drop_columns([c for c in table.column_names if c == "elapsed_s"])
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())


def manifest(ws: Path, stage: str) -> dict:
    return json.loads((ws / stage / "round=1" / "_manifest.json").read_text())


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for whoever inherited it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed row is compared with."""
    ws = tmp_path_factory.mktemp("signals") / "base"
    mpd_run(ws)
    return ws


def start_until(ws: Path, stage: str, log: Path) -> tuple[subprocess.Popen, dict[int, str]]:
    """``mpd run`` until ``stage`` is under way; the run and the processes it started."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            run_args(ws), stdout=fh, stderr=fh, cwd=REPO, env=env(), start_new_session=True
        )
    deadline = time.monotonic() + 300
    while not list(ws.glob(UNDER_WAY[stage])):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"the run never reached {stage}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    return proc, {p: cmdline(p) for p in _descendants(proc.pid)}


def stop(proc: subprocess.Popen, children: dict[int, str] | None = None) -> None:
    """What a test leaves, failed or not: nothing (the run, its group, what it started; a pid
    only while it still runs the command it ran then, never one reused since)."""
    children = {**(children or {}), **{p: cmdline(p) for p in _descendants(proc.pid)}}
    for pid, command in children.items():
        if not gone(pid) and cmdline(pid) == command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def ended(
    proc: subprocess.Popen,
    children: dict[int, str],
    sig: signal.Signals,
    linger_s: float,
    sent: float,
) -> tuple[dict[int, str], float]:
    """Wait for ``proc`` to end within EXIT_WITHIN_S of ``sig`` (sent at ``sent``; else the test
    fails), then up to ``linger_s`` for what it started: what is still running then, and the
    seconds ``proc`` took to end."""
    try:
        proc.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{sig.name}: still running {EXIT_WITHIN_S:g} s after the signal")
    took = time.monotonic() - sent
    deadline = time.monotonic() + linger_s
    while not all(gone(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {p: cmdline(p) for p in children if not gone(p)}, took


@pytest.mark.parametrize(
    ("sig", "group", "stage", "code", "resume"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_signal_stops_the_run_in_seconds_and_leaves_no_server(
    base: Path,
    tmp_path: Path,
    sig: signal.Signals,
    group: bool,
    stage: str,
    code: int,
    resume: bool,
) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    shutil.rmtree(ws / stage / "round=1")  # the run computes this stage again
    log = tmp_path / "run.log"
    proc, children = start_until(ws, stage, log)
    try:
        servers = [p for p, command in children.items() if SERVER in command]
        assert servers, f"the run started no API server of its own: {children}"
        sent = time.monotonic()
        (os.killpg if group else os.kill)(proc.pid, sig)
        left, took = ended(proc, children, sig, linger_s=5, sent=sent)
    finally:
        stop(proc, children)
    err = log.read_text()
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert left == {}, f"left running after the run ended: {left}"
    assert "Traceback" not in err, err[-3000:]
    print(f"{sig.name} mid-{stage}: ended {took:.2f} s after the signal")
    if sig == signal.SIGKILL:
        return
    assert err.strip().splitlines()[-1] == STOPPED.format(sig.name), err[-2000:]
    # Released: the record names no holder (it keeps the lease's fencing token, data/lease.py).
    assert "pid" not in json.loads((ws / ".lock").read_text()), "the holder record was left"
    if not resume:
        return
    mpd_run(ws)
    if stage == "sample":
        assert manifest(ws, "sample")["resumed_shards"] >= 1, "no finished shard was kept"
    else:
        assert manifest(ws, "train")["extra"]["resumed_from"] >= 10, "no checkpoint was kept"
    for name in STAGES:
        assert rows(ws, name) == rows(base, name), f"{name}: rows differ from an uninterrupted run"


def test_signal_stop_closing_the_engine_mid_decode_finishes_the_call() -> None:
    """A stopping run closes its engines while a shard thread may still be decoding: that call
    finishes with the model it started with (it raised ``TypeError: 'NoneType' object is not
    callable`` from engines/hf.py), and a call after close says the engine is closed."""
    from engines.base import GenerationParams
    from engines.hf import load_hf_engine

    engine = load_hf_engine(REPO / "world" / "assets" / "student", device="cpu")
    model, calls = engine.model, []

    def forward(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            engine.close()  # what close_engines() does from the flow's thread
        return model(*args, **kwargs)

    engine.model = forward  # type: ignore[assignment]
    prompt = [engine.tokenizer.encode("What is 2 + 3?")]
    params = GenerationParams(temperature=0, max_tokens=8)
    (out,) = engine.generate(prompt, params)
    assert len(calls) == 8 and len(out[0].token_ids) == 8
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(prompt, params)


def test_signal_handlers_are_restored_after_an_in_process_command() -> None:
    """``stoppable`` (which ``mpd run`` runs in) puts the caller's handlers back on leaving: a
    test or notebook that calls ``flows.cli.main`` keeps its own Ctrl-C."""
    from flows.stopping import stoppable

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    with stoppable():
        assert all(signal.getsignal(s) is not h for s, h in before.items())
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(wakeup) == wakeup


def test_signal_safe_server_is_not_started_when_an_api_is_configured() -> None:
    """With PREFECT_API_URL set (a real `prefect server`), mpd starts no server of its own and
    leaves the setting as it was: such runs work as before."""
    code = "from flows.prefect_server import start_api; import os; print(start_api())"
    url = "http://127.0.0.1:9/api"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; print(os.environ['PREFECT_API_URL'])"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env(), "PREFECT_API_URL": url},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["None", url]


def test_signal_other_than_term_or_int_does_not_stop_the_run() -> None:
    """Every signal with a Python handler (a library's SIGALRM) wakes the watchdog; only SIGTERM
    and SIGINT stop: SIGUSR1 reaches its own handler and the command goes on, then SIGTERM ends it
    with 143 and the one line."""
    code = """
import os, signal, time
from flows.stopping import stoppable
hits = []
with stoppable():
    signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.5)
    print("alive", hits, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
print("not stopped")
"""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 143, (out.returncode, out.stderr)
    assert out.stdout.split("\n")[0] == "alive [1]" and "not stopped" not in out.stdout
    assert out.stderr.strip() == STOPPED.format("SIGTERM")
    assert time.monotonic() - started < 20


def test_signal_stops_a_bench_and_every_campaign_it_runs_side_by_side(tmp_path: Path) -> None:
    """``mpd bench --jobs 2`` runs its campaigns as processes of their own (flows/bench_pool.py),
    each in a session of its own: SIGTERM to the bench alone ends the bench within 10 s with its
    one line, every campaign stops too (told at once; they stop as ``mpd run`` does), no process
    is left, and every campaign's workspace lock is released."""
    root = tmp_path / "bench"
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    argv = [sys.executable, "-m", "flows.cli", "bench", "-w", str(root), "--rounds", "1"]
    argv += ["--methods", "mpd,on_policy", "--seeds", "0,1", "--jobs", "2", *sets]
    log = tmp_path / "bench.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            argv, stdout=fh, stderr=fh, cwd=REPO, env=env(), start_new_session=True
        )
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        # both seeds' first campaigns (mpd) running side by side, one of them sampling
        sampling = "mpd/seed=*/.staging/sample/round=1/*/_shards/part-*.json"
        while True:
            children = {p: cmdline(p) for p in _descendants(proc.pid)}
            running = sum("flows.cli run" in c for c in children.values())
            if running >= 2 and list(root.glob(sampling)):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the bench never ran two campaigns:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        campaigns = [p for p, c in children.items() if "flows.cli run" in c]
        assert len(campaigns) == 2, children
        proc.send_signal(signal.SIGTERM)
        left, _ = ended(proc, children, signal.SIGTERM, EXIT_WITHIN_S + 5, time.monotonic())
    finally:
        stop(proc, children)
    err = log.read_text()
    assert proc.returncode == 143, (proc.returncode, err[-3000:])
    assert left == {}, f"left running after the bench ended: {left}"
    assert err.strip().splitlines()[-1] == STOPPED.format("SIGTERM"), err[-2000:]
    for ws in (p for p in root.glob("mpd/seed=*") if p.is_dir()):
        record = (ws / ".lock").read_text()  # empty: stopped before its lease was written
        logs = ws.with_name(ws.name + ".log").read_text()[-2000:]
        assert not record.strip() or "pid" not in json.loads(record), f"{ws}: held\n{logs}"
        assert logs.strip().splitlines()[-1] == STOPPED.format("SIGTERM"), logs
