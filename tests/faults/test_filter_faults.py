"""A filter's mistakes, found before they are committed: one line each, exit 2, nothing written.

Two tables. ``STAGE_CASES`` run the filter stage as the flow does (``run_stage`` +
``filter_body``) over a round's real committed rewrites: a filter whose output does not have
exactly one row per candidate of the round (found: duplicate rows silently doubled the training
data; made-up keys surfaced later as "no example fits") or that runs past its time limit (found:
a recursive CTE ran for minutes without a word). ``PREFLIGHT_CASES`` are mistakes the preflight
catches on empty tables before Prefect starts (found: an empty filter.sql blamed a ``)`` the user
never wrote, after Prefect had started), and ``SQL_CASES`` those of ``mpd sql``'s own limits
(found: a RecursionError traceback; advice to run a ``SET`` that mpd sql refuses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from data.errors import UserError
from data.schemas import REWRITES, SAMPLES, conform
from data.store import StageStore
from tasks.common import StageResult, run_stage, stage_files
from tasks.filter import FilterConfig, filter_body
from tests.conftest import REPO
from tests.test_filter import rewrite_rows, sample_rows

COLUMNS = "round, problem_id, sample_idx, kept, reason, think_tokens, orig_think_tokens, ratio"
DECIDE = (
    "SELECT round, problem_id, sample_idx, true AS kept, 'kept' AS reason, think_tokens, "
    "orig_think_tokens, 1.0 AS ratio FROM rewrites"
)

# (case id, filter SQL, what the one line must say). Each one binds on empty tables (so the
# preflight lets it through) and goes wrong only on the round's rows.
STAGE_CASES: list[tuple[str, str, str]] = [
    ("duplicate rows", f"{DECIDE} UNION ALL {DECIDE}", "returned 2 rows for candidate"),
    ("a duplicate of one candidate",
     f"{DECIDE} UNION ALL ({DECIDE} ORDER BY problem_id, sample_idx LIMIT 1)",
     "returned 2 rows for candidate"),
    ("made-up problem id",
     f"SELECT round, 'p-made-up' AS problem_id, {COLUMNS.split(', ', 2)[2]} FROM ({DECIDE})",
     "not a rewrite of round 1"),
    ("made-up sample index",
     f"SELECT round, problem_id, sample_idx + 1000 AS sample_idx, kept, reason, think_tokens, "
     f"orig_think_tokens, ratio FROM ({DECIDE})", "not a rewrite of round 1"),
    ("candidates left out", f"{DECIDE} WHERE sample_idx % 2 = 0", "returned no row for candidate"),
    ("another round", f"SELECT 7 AS round, * EXCLUDE (round) FROM ({DECIDE})",
     "rows of round 7"),
    ("no time limit",
     "WITH RECURSIVE r(n) AS (SELECT count(*) FROM rewrites UNION ALL SELECT n + 1 FROM r "
     f"WHERE n > 0) SELECT {COLUMNS} FROM ({DECIDE}) WHERE (SELECT max(n) FROM r) > 0",
     "ran past 2 s"),
    ("a cast that fails on the rows",
     f"SELECT round, problem_id, sample_idx, kept, reason, CAST(problem_id AS INTEGER) AS "
     f"think_tokens, orig_think_tokens, ratio FROM ({DECIDE})", "Conversion Error"),
]  # fmt: skip


def commit_round(ws: Path) -> Path:
    """Commit round 1's rewrites and samples (12 candidates) into ``ws``; return the rewrites'
    committed file."""
    store = StageStore(ws)
    rows = [{**row, "round": 1} for row in rewrite_rows(12, 3)]
    for stage, table, schema in (
        ("rewrite", pa.Table.from_pylist(rows), REWRITES),
        ("sample", pa.Table.from_pylist(sample_rows(rows, 3)), SAMPLES),
    ):
        writer = store.writer(stage, 1, "k" * 64)
        writer.write_table("part-00000.parquet", conform(table, schema), schema)
        writer.commit()
    return store.stage_dir("rewrite", 1) / "part-00000.parquet"


def run_filter_stage(store: StageStore, cfg: FilterConfig, key: str = "f" * 64) -> StageResult:
    """The filter stage of round 1 as the flow runs it: cached or computed, then committed."""
    return run_stage(
        store,
        "filter",
        1,
        key,
        lambda w: filter_body(
            w,
            cfg,
            rewrites=stage_files(store, "rewrite", 1),
            samples=stage_files(store, "sample", 1),
            round_=1,
        ),
    )


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    commit_round(tmp_path / "ws")
    return tmp_path / "ws"


@pytest.mark.parametrize(
    ("sql", "expected"), [c[1:] for c in STAGE_CASES], ids=[c[0] for c in STAGE_CASES]
)
def test_filter_output_is_checked_before_commit(
    ws: Path, tmp_path: Path, sql: str, expected: str
) -> None:
    store = StageStore(ws)
    path = tmp_path / "filter.sql"
    path.write_text(sql)
    cfg = FilterConfig.model_validate({"sql": path, "timeout_s": 2})
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        run_filter_stage(store, cfg)
    message = str(err.value)
    assert expected in message and "\n" not in message and len(message) < 300, message
    assert time.monotonic() - started < 20, "a time limit of 2 s must stop the query soon after"
    assert store.manifest("filter", 1) is None, "nothing may be committed"


def test_filter_output_check_names_the_first_duplicate(ws: Path, tmp_path: Path) -> None:
    """The line names the first repeated key (sorted), so the user can look it up in SQL."""
    store = StageStore(ws)
    rows = conform(
        pa.Table.from_pylist([{**r, "round": 1} for r in rewrite_rows(12, 3)]), REWRITES
    ).to_pylist()
    first = min((r["problem_id"], r["sample_idx"]) for r in rows)
    path = tmp_path / "filter.sql"
    path.write_text(f"{DECIDE} UNION ALL {DECIDE} UNION ALL {DECIDE}")
    with pytest.raises(UserError, match="returned 3 rows for candidate") as err:
        filter_body(
            store.writer("filter", 1, "f" * 64),
            FilterConfig(sql=path),
            rewrites=stage_files(store, "rewrite", 1),
            samples=stage_files(store, "sample", 1),
            round_=1,
        )
    assert f"(problem_id={first[0]!r}, sample_idx={first[1]})" in str(err.value)
    assert "12 candidate(s) repeated" in str(err.value)


# (case id, mpd argv after the workspace, the file's text or None, what the line must say)
PREFLIGHT_CASES: list[tuple[str, list[str], str | None, str]] = [
    ("filter.sql empty", ["run"], "", "filter.sql: empty query"),
    ("filter.sql only a comment", ["run"], "-- keep everything\n", "filter.sql: empty query"),
    ("filter.sql missing a column", ["run"],
     "SELECT round, problem_id, sample_idx, true AS kept FROM rewrites", "missing column(s)"),
    ("filter.sql unknown table", ["run"], "SELECT * FROM rewritez", "rewritez"),
    ("filter.sql not a query", ["run"], "DELETE FROM rewrites", "refused: DELETE"),
    ("filter.sql loops on no rows", ["run", "--set", "filter.timeout_s=1"],
     "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) "
     f"SELECT {COLUMNS} FROM ({DECIDE}) WHERE (SELECT max(n) FROM r) > 0", "ran past 1 s"),
    ("filter.sql not UTF-8", ["run"], None, "cannot read"),
    ("mpd sql 400 nested subqueries", ["sql", "SELECT * FROM (" * 400 + "SELECT 1" + ")" * 400],
     None, "nests deeper than can be checked"),
    ("mpd sql 60,000 terms", ["sql", "SELECT " + "+".join(["1"] * 60_000)], None,
     "the limit is fixed here"),
    ("filter.timeout_s zero", ["run", "--set", "filter.timeout_s=0"], DECIDE, "filter.timeout_s"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "text", "expected"),
    [c[1:] for c in PREFLIGHT_CASES],
    ids=[c[0] for c in PREFLIGHT_CASES],
)
def test_filter_and_sql_mistakes_are_one_line_before_prefect(
    tmp_path: Path, argv: list[str], text: str | None, expected: str
) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    sql = tmp_path / "filter.sql"
    sql.write_bytes(b"SELECT '\xe9t\xe9'" if text is None else text.encode())
    command, *rest = argv
    extra = ["--set", f"filter.sql={sql}"] if command == "run" else []
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", command, "-w", str(ws), *extra, *rest],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "prefect" not in out.stderr.lower(), out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert expected in line and len(line) < 300, line
    assert "SET max_expression_depth" not in line
    assert sorted(p.name for p in ws.iterdir()) == [], "a refused run writes nothing"
