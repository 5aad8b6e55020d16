"""The mpd command as a user runs it: real subprocesses, real workspace, real SQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every mpd subprocess talks to the session's one Prefect server (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("prefect_api")
# Round 0 only (install the world, commit problems, evaluate 2 problems briefly): fast.
SMALL = [
    "--set",
    "problems.n_train=40",
    "--set",
    "problems.n_test=10",
    "--set",
    "problems.n_heldout=5",
    "--set",
    "rounds=0",
    "--set",
    "evaluate.limit=2",
    "--set",
    "evaluate.max_tokens=8",
]


def mpd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_help_explains_every_command() -> None:
    out = mpd("--help")
    assert out.returncode == 0
    for word in ("run", "status", "sql", "config", "examples:"):
        assert word in out.stdout


def test_run_then_cached_then_sql(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    first = mpd("run", "-w", str(ws), *SMALL)
    assert first.returncode == 0, first.stderr
    assert "problems: wrote 55 rows" in first.stderr
    assert (ws / "run.yaml").is_file() and (ws / "catalog.duckdb").is_file()
    second = mpd("run", "-w", str(ws), *SMALL)
    assert "problems: cached (55 rows" in second.stderr
    out = mpd(
        "sql",
        "-w",
        str(ws),
        "--format",
        "json",
        "select split, count(*) as n from problems group by split order by split",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        {"split": "heldout", "n": 5},
        {"split": "test", "n": 10},
        {"split": "train", "n": 40},
    ]
    saved = tmp_path / "train.parquet"
    out = mpd(
        "sql", "-w", str(ws), "--out", str(saved), "select * from problems where split='train'"
    )
    assert out.returncode == 0 and "wrote 40 rows" in out.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(saved).num_rows == 40
    status = mpd("status", "-w", str(ws), "--set", "rounds=1")
    assert status.returncode == 0 and "problems" in status.stdout and "done" in status.stdout


def test_changed_config_recomputes(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert mpd("run", "-w", str(ws), *SMALL).returncode == 0
    again = mpd("run", "-w", str(ws), *SMALL, "--set", "problems.n_train=30")
    assert "problems: wrote 45 rows" in again.stderr


@pytest.mark.parametrize(
    "query",
    ["copy problems to 'out.csv'", "attach 'x.duckdb' as x", "install httpfs", "set threads=1"],
)
def test_sql_refusals_are_one_line_exit_2(tmp_path: Path, query: str) -> None:
    ws = tmp_path / "ws"
    assert mpd("run", "-w", str(ws), *SMALL).returncode == 0
    out = mpd("sql", "-w", str(ws), query, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("mpd: error: refused") and out.stderr.count("\n") == 1
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_sql_syntax_error_is_one_line(tmp_path: Path) -> None:
    out = mpd("sql", "-w", str(tmp_path), "selec 1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1


def test_sql_out_failing_half_way_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """--out streams the result into the file: a query DuckDB fails in its 300,000th row, after
    batches were written, is the query's error in one line, and no file or temporary remains."""
    query = "select case when i > 300000 then cast('x' as int) else i end from range(1000000) t(i)"
    out_file = tmp_path / "out" / "result.parquet"
    out = mpd("sql", "-w", str(tmp_path), "--out", str(out_file), query)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "Conversion Error" in out.stderr, out.stderr
    assert not out_file.exists() and not list(out_file.parent.glob("*"))


SLOW_QUERY = "select sum(a.range * b.range) from range(1000000) a, range(1000000) b"


def test_sql_timeout_stops_a_slow_query(tmp_path: Path) -> None:
    """A query past --timeout is interrupted inside DuckDB: one line, exit 2, in seconds."""
    (tmp_path / "ws").mkdir()
    started = time.monotonic()
    out = mpd("sql", "-w", str(tmp_path / "ws"), "--timeout", "1", SLOW_QUERY)
    assert out.returncode == 2 and time.monotonic() - started < 60
    assert out.stderr.strip().splitlines() == [
        "mpd: error: the query ran past 1 s and was stopped "
        "(raise --timeout, or --timeout 0 for no limit)"
    ]


def test_sql_ctrl_c_interrupts_a_running_query(tmp_path: Path) -> None:
    """SIGINT during a query (DuckDB used to run on, ignoring it): exit 130 at once, one line,
    and --out writes nothing."""
    (tmp_path / "ws").mkdir()
    out_file = tmp_path / "result.parquet"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "sql",
            "-w",
            str(tmp_path / "ws"),
            "--timeout",
            "0",
            "--out",
            str(out_file),
            SLOW_QUERY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # A suite started in the background inherits SIGINT ignored, and Python then keeps it
        # ignored: give the command the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(6)  # start-up, then well into the query
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("mpd: ") and "Traceback" not in err
    assert not out_file.exists() and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_sql_bad_timeout_is_a_usage_error(tmp_path: Path, value: str) -> None:
    out = mpd("sql", "-w", str(tmp_path), "--timeout", value, "select 1")
    assert out.returncode == 2 and "--timeout" in out.stderr and "Traceback" not in out.stderr


def test_second_run_on_a_busy_workspace_is_refused(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from data.lock import WorkspaceLock; "
            f"WorkspaceLock({str(ws)!r}, command='mpd run (nightly)').acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        out = mpd("run", "-w", str(ws), *SMALL)
        assert out.returncode == 2
        assert f"in use by pid {holder.pid}" in out.stderr and "mpd run (nightly)" in out.stderr
        assert not (ws / "problems").exists(), "the refused run wrote nothing"
        # refused before Prefect is imported or started (that took ~56 s under load)
        assert "prefect" not in out.stderr.lower() and time.monotonic() - started < 20
    finally:
        holder.kill()
        holder.wait()
    assert mpd("run", "-w", str(ws), *SMALL).returncode == 0, "a killed holder does not block"


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("file", "is a file: give a directory"),
        ("under-file", "is under"),
        ("unwritable", "cannot create workspace"),
    ],
)
def test_unusable_workspace_is_one_line_before_prefect(
    tmp_path: Path, where: str, expected: str
) -> None:
    """A workspace that is a file, under a file, or where nothing can be created (/proc, as
    a read-only filesystem would): one line, exit 2, no traceback (it used to print an OSError
    traceback twice, after Prefect's start-up)."""
    (tmp_path / "afile").write_text("x")
    ws = {
        "file": tmp_path / "afile",
        "under-file": tmp_path / "afile" / "ws",
        "unwritable": Path("/proc/1/mpd-ws"),
    }[where]
    started = time.monotonic()
    out = mpd("run", "-w", str(ws), *SMALL)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and expected in out.stderr
    assert "prefect" not in out.stderr.lower() and time.monotonic() - started < 20


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--rounds", "-1"],
        ["rerun", "--round", "-1", "--from", "filter"],
        ["run", "--set", "models.student=/no/such/model"],
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    """`mpd run --rounds -1` was a pydantic traceback, exit 1."""
    out = mpd(*args, "-w", str(tmp_path / "ws"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()[-1]) < 200


def test_server_refusing_the_api_key_is_one_line_without_prefect_tracebacks(
    tmp_path: Path,
) -> None:
    """An HTTP 401 inside a shard task: the right one line used to come after ~47 lines of
    Prefect's task tracebacks. A user mistake now fails the shard and stage tasks as Failed
    states (one log line each), and the run ends with exit 2."""
    import os

    from engines.hf import load_hf_engine
    from tests.standin_server import StandInServer

    server = StandInServer(load_hf_engine(REPO / "world/assets/student", device="cpu")).start()
    try:
        server.reset(api_key="sk-right")
        engine = [
            "--set", "engines.student.kind=openai",
            "--set", f"engines.student.base_url={server.base_url}",
            "--set", "engines.student.served_model_name=tiny",
            "--set", "engines.student.api_key_env=MPD_TEST_WRONG_KEY",
        ]  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "-w", str(tmp_path / "ws"), *SMALL, *engine],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "MPD_TEST_WRONG_KEY": "sk-wrong"},
            timeout=600,
        )
    finally:
        server.stop()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("mpd: error:")]
    assert len(errors) == 1 and "HTTP 401" in errors[0] and "sk-wrong" not in out.stderr


def test_prompt_longer_than_the_context_is_one_line(tmp_path: Path) -> None:
    """A user's problem longer than the model's context (2048 tokens for the tiny student) is
    refused before any generation, naming it, instead of running on a context out of range."""
    problems = tmp_path / "p.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?", "answer": str(2 * i), "split": "test"} for i in range(6)
    ]
    rows[3]["prompt"] = "What is " + " + ".join(["1"] * 3000) + "?"
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = mpd(
        "run", "-w", str(tmp_path / "ws"), "--set", "problems.source=file",
        "--set", f"problems.file.path={problems}", "--set", "problems.file.split_column=split",
        "--set", "rounds=0", "--set", "evaluate.max_tokens=8",
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("mpd: error:")]
    assert len(errors) == 1 and "do not fit the model's context of 2048 tokens" in errors[0]


def test_bad_problems_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    out = mpd(
        "run",
        "-w",
        str(tmp_path / "ws"),
        "--set",
        "problems.source=file",
        "--set",
        f"problems.file.path={bad}",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # Prefect's own run log lines may precede it; the error itself is one line.
    errors = [line for line in out.stderr.splitlines() if line.startswith("mpd: error:")]
    assert len(errors) == 1 and "prompt" in errors[0]
