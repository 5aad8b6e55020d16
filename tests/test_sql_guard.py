"""The read-only guard: every refused kind is refused by name and changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.catalog import connect, run_query
from data.errors import kind_of
from data.schemas import DECISIONS
from data.sql_guard import ReadOnlyError, SqlError, check_read_only
from tests.conftest import write_manifest

# (query, the statement kind the message must name). File names are relative, so
# they would land in the test's working directory if anything ran.
REFUSED = [
    ("COPY decisions TO 'out.csv'", "COPY"),
    ("COPY (SELECT 1) TO 'out.parquet' (FORMAT parquet)", "COPY"),
    ("COPY decisions FROM 'in.csv'", "COPY"),
    ("COPY FROM DATABASE memory TO other", "COPY FROM DATABASE"),
    ("EXPORT DATABASE 'exported'", "EXPORT DATABASE"),
    ("IMPORT DATABASE 'exported'", "IMPORT DATABASE"),
    ("ATTACH 'new.db' AS new", "ATTACH"),
    ("ATTACH DATABASE 'new.db'", "ATTACH"),
    ("DETACH memory", "DETACH"),
    ("USE memory", "USE"),
    ("INSTALL httpfs", "INSTALL"),
    ("FORCE INSTALL httpfs", "FORCE INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("UPDATE EXTENSIONS", "UPDATE EXTENSIONS"),
    ("SET threads = 1", "SET"),
    ("SET GLOBAL threads TO 1", "SET"),
    ("SET VARIABLE x = 1", "SET"),
    ("RESET threads", "RESET"),
    ("PRAGMA threads = 1", "PRAGMA"),
    ("PRAGMA version", "PRAGMA"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE OR REPLACE VIEW evals AS SELECT 1", "CREATE"),
    ("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')", "CREATE"),
    ("CREATE PERSISTENT SECRET s (TYPE s3)", "CREATE"),
    ("CREATE MACRO m(a) AS a + 1", "CREATE"),
    ("CREATE TEMP TABLE t (a INTEGER)", "CREATE"),
    ("INSERT INTO decisions SELECT * FROM decisions", "INSERT"),
    ("UPDATE decisions SET kept = true", "UPDATE"),
    ("DELETE FROM decisions", "DELETE"),
    ("TRUNCATE decisions", "TRUNCATE"),
    ("MERGE INTO decisions USING kept ON true WHEN MATCHED THEN DELETE", "MERGE"),
    ("DROP VIEW evals", "DROP"),
    ("ALTER VIEW evals RENAME TO e", "ALTER"),
    ("COMMENT ON VIEW evals IS 'x'", "COMMENT"),
    ("CALL pragma_version()", "CALL"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("COMMIT", "COMMIT"),
    ("ROLLBACK", "ROLLBACK"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("FORCE CHECKPOINT", "FORCE CHECKPOINT"),
    ("VACUUM", "VACUUM"),
    ("ANALYZE", "ANALYZE"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXECUTE p", "EXECUTE"),
    ("DEALLOCATE p", "DEALLOCATE"),
    ("PIVOT decisions ON reason USING count(*)", "PIVOT"),
    # EXPLAIN ANALYZE executes its statement; plain EXPLAIN is checked the same way.
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'out.csv'", "COPY"),
    ("EXPLAIN COPY decisions TO 'out.csv'", "COPY"),
    ("EXPLAIN (FORMAT json) INSERT INTO decisions SELECT * FROM decisions", "INSERT"),
    ("EXPLAIN ANALYZE DELETE FROM decisions", "DELETE"),
    ("EXPLAIN (ANALYZE) COPY (SELECT 1) TO 'out.csv'", "COPY"),
    ("EXPLAIN /* hidden */ ANALYZE COPY (SELECT 1) TO 'out.csv'", "EXPLAIN"),
    ("SUMMARIZE WITH x AS (COPY (SELECT 1) TO 'out.csv') SELECT 1", "COPY inside WITH"),
    # DuckDB 2.0 parses data-modifying CTEs as SELECT statements.
    ("WITH x AS (COPY (SELECT 1) TO 'out.csv') SELECT 1", "COPY inside WITH"),
    ("WITH x AS (COPY decisions TO 'out.csv') SELECT * FROM x", "COPY inside WITH"),
    ("SELECT * FROM (WITH x AS (COPY (SELECT 1) TO 'out.csv') SELECT 1)", "COPY inside WITH"),
    ("SELECT 1 UNION ALL (WITH x AS (COPY (SELECT 1) TO 'out.csv') SELECT 1)", "COPY inside"),
    ("EXPLAIN ANALYZE WITH x AS (COPY (SELECT 1) TO 'out.csv') SELECT 1", "COPY inside WITH"),
    ("WITH x AS (INSERT INTO decisions SELECT * FROM decisions RETURNING *) FROM x", "INSERT"),
    ("WITH x AS (UPDATE decisions SET kept = true RETURNING *) FROM x", "UPDATE"),
    ("WITH x AS (DELETE FROM decisions RETURNING *) FROM x", "DELETE"),
    # SELECT-level functions that change state or run unchecked SQL.
    ("SELECT * FROM checkpoint()", "checkpoint()"),
    ("FROM force_checkpoint()", "force_checkpoint()"),
    ("FROM system.main.checkpoint()", "checkpoint()"),
    ("FROM enable_logging()", "enable_logging()"),
    ("FROM disable_logging()", "disable_logging()"),
    ("FROM enable_profiling()", "enable_profiling()"),
    ("FROM truncate_duckdb_logs()", "truncate_duckdb_logs()"),
    ("SELECT write_log('hello')", "write_log()"),
    ("FROM query('COPY (SELECT 1) TO ''out.csv''')", "query()"),
    ("FROM query('WITH x AS (COPY (SELECT 1) TO ''out.csv'') SELECT 1')", "query()"),
    ("FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))", "json_execute"),
    (
        "SELECT count(*) FROM decisions WHERE (SELECT count(*) FROM checkpoint()) = 0",
        "checkpoint()",
    ),
]

ALLOWED = [
    "SELECT * FROM decisions",
    "select round, count(*) from decisions group by all order by all",
    "FROM decisions",
    "FROM decisions SELECT reason WHERE NOT kept",
    "WITH d AS (SELECT * FROM decisions) SELECT count(*) FROM d",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "DESCRIBE decisions",
    "DESCRIBE SELECT reason FROM decisions",
    "SHOW TABLES",
    "SHOW ALL TABLES",
    "SUMMARIZE decisions",
    "SUMMARIZE SELECT ratio FROM decisions",
    "EXPLAIN SELECT * FROM decisions",
    "EXPLAIN ANALYZE SELECT count(*) FROM kept",
    "EXPLAIN (FORMAT json) SELECT 1",
    "-- a comment first\nSELECT 1 AS one;",
    "SELECT 2 AS b;",
    "VALUES (1), (2)",
    "PIVOT decisions ON reason IN ('kept', 'wrong') USING count(*)",
    "UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v",
    "SELECT * FROM round_summary",
    "SELECT name, value FROM duckdb_settings() WHERE name = 'threads'",
    "SELECT current_setting('threads') AS t",
    "SELECT list_transform([1, 2], lambda x: x + 1) AS l",
    "SELECT reason, row_number() OVER (ORDER BY ratio) FROM decisions QUALIFY true",
    "FROM query_table('decisions')",
    "SELECT 'COPY t TO ''x.csv''; DROP TABLE t' AS text_not_sql",
    "SELECT 1 AS query, 2 AS checkpoint",
]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace with one committed decisions file; the cwd is tmp_path."""
    round_dir = tmp_path / "ws" / "filter" / "round=1"
    round_dir.mkdir(parents=True)
    rows = {
        "round": [1, 1],
        "problem_id": ["a", "b"],
        "sample_idx": [0, 0],
        "kept": [True, False],
        "reason": ["kept", "wrong"],
        "think_tokens": [5, 9],
        "orig_think_tokens": [10, 10],
        "ratio": [0.5, 0.9],
    }
    pq.write_table(pa.table(rows, schema=DECISIONS), round_dir / "decisions.parquet")
    write_manifest(round_dir, "filter", 1)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "ws"


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize(("query", "kind"), REFUSED, ids=[q for q, _ in REFUSED])
def test_refused_by_name(query: str, kind: str) -> None:
    with pytest.raises(ReadOnlyError) as err:
        check_read_only(query)
    message = str(err.value)
    assert message.startswith(f"refused: {kind}") or f" {kind}" in message, message
    assert "read-only" in message and "\n" not in message


@pytest.mark.parametrize(("query", "kind"), REFUSED, ids=[q for q, _ in REFUSED])
def test_refused_has_no_side_effect(ws: Path, tmp_path: Path, query: str, kind: str) -> None:
    before = _snapshot(tmp_path)
    with pytest.raises(ReadOnlyError):
        run_query(ws, query)
    assert _snapshot(tmp_path) == before
    assert run_query(ws, "SELECT count(*) AS n FROM decisions").to_pylist() == [{"n": 2}]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1; COPY decisions TO 'out.csv'",
        "SELECT 1; ATTACH 'new.db'",
        "SELECT 1 AS a; SELECT 2 AS b",
        "SELECT 1; SELECT 2; SELECT 3",
    ],
)
def test_exactly_one_statement(ws: Path, tmp_path: Path, query: str) -> None:
    """A second statement is where injected text hides: refused whatever it is, nothing run."""
    before = _snapshot(tmp_path)
    with pytest.raises(ReadOnlyError, match=r"refused: \d statements; mpd sql runs exactly one"):
        run_query(ws, query)
    assert _snapshot(tmp_path) == before


def test_copy_suggests_out(ws: Path) -> None:
    with pytest.raises(ReadOnlyError, match=r"use --out FILE\.parquet"):
        run_query(ws, "COPY decisions TO 'out.csv'")


def test_data_modifying_cte_writes_in_raw_duckdb(tmp_path: Path) -> None:
    """Why the syntax-tree walk exists: DuckDB 2.0 runs COPY inside WITH as a 'SELECT'.

    If this starts failing, DuckDB changed; the guard still refuses such queries.
    """
    target = tmp_path / "leak.csv"
    query = f"WITH x AS (COPY (SELECT 1 AS a) TO '{target}') SELECT 42"
    assert [s.type for s in duckdb.extract_statements(query)] == [duckdb.StatementType.SELECT]
    con = duckdb.connect()
    try:
        con.sql(query).fetchall()
    finally:
        con.close()
    assert target.exists()
    target.unlink()
    with pytest.raises(ReadOnlyError, match="COPY inside WITH"):
        check_read_only(query)


@pytest.mark.parametrize("query", ALLOWED)
def test_allowed_queries_run(ws: Path, tmp_path: Path, query: str) -> None:
    check_read_only(query)
    before = _snapshot(tmp_path)
    result = run_query(ws, query)
    assert isinstance(result, pa.Table) and result.num_columns >= 1
    assert _snapshot(tmp_path) == before


def test_set_cannot_change_a_setting(ws: Path) -> None:
    con = connect(ws)
    (threads,) = con.sql("SELECT current_setting('threads')").fetchall()[0]
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET threads = 1")
    with pytest.raises(ReadOnlyError, match="SET"):
        run_query(ws, "SET threads = 1")
    assert con.sql("SELECT current_setting('threads')").fetchall()[0] == (threads,)


def test_set_config_does_not_exist(ws: Path) -> None:
    """PostgreSQL's set_config() is no escape: DuckDB has no such function."""
    with pytest.raises(SqlError, match="set_config"):
        run_query(ws, "SELECT set_config('threads', '1', false)")


@pytest.mark.parametrize("query", ["", "   ", " ; ; ", "-- just a comment"])
def test_empty_query(query: str) -> None:
    with pytest.raises(SqlError, match="empty query") as err:
        check_read_only(query)
    assert not isinstance(err.value, ReadOnlyError)


@pytest.mark.parametrize("query", ["SELEC 1", "SELECT 1 FROM", "SELECT (1"])
def test_syntax_error_is_one_line(query: str) -> None:
    with pytest.raises(SqlError) as err:
        check_read_only(query)
    assert not isinstance(err.value, ReadOnlyError)
    assert "\n" not in str(err.value) and "syntax error" in str(err.value).lower()


def test_errors_are_user_mistakes() -> None:
    """A refused query is the user's to fix (exit 2), and nothing else: no ValueError base."""
    assert issubclass(ReadOnlyError, SqlError) and kind_of(SqlError("x")) == "user"
    assert not issubclass(SqlError, ValueError)


def test_guard_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_read_only only parses: even a refused COPY leaves no file behind."""
    monkeypatch.chdir(tmp_path)
    for query, _ in REFUSED:
        with pytest.raises(ReadOnlyError):
            check_read_only(query)
    assert os.listdir(tmp_path) == []
