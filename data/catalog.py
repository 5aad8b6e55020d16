"""DuckDB views over a workspace's committed Parquet, and the ``mpd sql`` plumbing.

Every stage table is one view over all its rounds::

    problems  samples  solutions  rewrites  truncations  scores  decisions  kept
    train_log  evals  stage_runs  round_summary  family_summary

``stage_runs`` is one row per committed stage run, from the manifests (stage,
round, key, rows, duration_s, finished_at, shared_from: the workspace a shared
stage was adopted from, NULL when computed here; peak_rss_mb: the process's peak resident
memory while the stage computed, wherever it computed, NULL where /proc could not say;
compute_s: its seconds inside engine calls and optimizer steps).

A *bench root* (``mpd bench``'s output directory, marked by ``bench.json``)
holds one workspace per (method, seed). Its tables are the members' tables
stacked, with ``method`` and ``seed`` columns first, and its ``bench`` view
(``data/sql/bench.sql``) is the comparison table, with ``bench_family`` (the same per problem
family) and ``bench_paired`` (each method against mpd on the same problems, seed by seed);
``round_summary`` and ``family_summary`` are per workspace and are not defined there.

A view reads only *committed* files: those matching the table's glob in
the table's declaration (:mod:`data.tables`, made by the stage that writes it), inside a ``<stage>/round=<r>/`` directory that holds the
store's ``_manifest.json`` (the commit marker; a round directory without one is
a commit that did not finish). Names starting with ``.`` or ``_`` are skipped,
so ``.staging/``, ``.trash/``, temporaries and the manifest are never read, and
neither is anything outside the glob (``train/round=1/model/``).

Files are read with ``hive_partitioning=false``: every file carries ``round`` as
a real column, and the path must never override it. A table with no committed
file yet is still a view, built from a typed empty SELECT, so ``DESCRIBE`` and
joins work on a fresh workspace.

Two ways in:

- :func:`connect` builds the views in an in-memory connection with *absolute*
  paths of the workspace where it is now (so a moved or copied workspace just
  works), sandboxed by DuckDB itself (:mod:`data.sandbox`: it can read exactly
  the committed files, nothing else, configuration locked). :func:`run_query`
  checks a query with :mod:`data.sql_guard` and runs it there.
- :func:`write_catalog` persists the same views to ``<ws>/catalog.duckdb`` with
  paths *relative* to the workspace, for the duckdb CLI::

      cd runs/tiny && duckdb catalog.duckdb
      duckdb -cmd "SET file_search_path='runs/tiny'" runs/tiny/catalog.duckdb

  A persisted view names the files and rounds that were committed when it was
  written (and an empty table's view is a typed empty SELECT), so the file goes
  stale when a stage commits. It is rebuilt by every mpd command that commits
  and by :func:`write_catalog`; anything users add to it is lost on rebuild.

A ``round_summary`` row (SQL in ``data/sql/round_summary.sql``)::

    {"round": 1, "eval_n": 200, "accuracy": 0.91, "heldout_n": 50,
     "heldout_accuracy": 0.84, "mean_think_tokens": 61.2, ..., "samples_n": 512,
     "kept": 301, "dropped": 211, "dropped_wrong": 40, ...,
     "dropped_by_reason": {"not_shorter": 150, "wrong": 40, ...}}
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from data.objstore import ObjectStore
from data.sandbox import SINK_BATCH_ROWS, QueryTimeoutError, open_sandbox, run_query_on
from data.sql_guard import ReadOnlyError, SqlError, check_read_only, one_line
from data.tables import tables
from data.view_sources import (
    committed_files,
    empty_select,
    stage_runs_table,
    values_select,
    view_sql,
)

log = logging.getLogger("mpd.catalog")

__all__ = [
    "CATALOG_FILE",
    "SINK_BATCH_ROWS",
    "QueryTimeoutError",
    "ReadOnlyError",
    "SqlError",
    "bench_views",
    "check_read_only",
    "committed_files",
    "connect",
    "run_query",
    "views",
    "write_catalog",
]

# The views beside the stage tables: kept rows, the manifests, and the per-workspace summary
# (a plain workspace) or the method comparison (a bench root).
DERIVED_VIEWS: tuple[str, ...] = ("kept", "stage_runs", "round_summary", "family_summary")
BENCH_DERIVED_VIEWS: tuple[str, ...] = (
    "kept",
    "stage_runs",
    "bench",
    "bench_family",
    "bench_paired",
)


def views() -> tuple[str, ...]:
    """Every view of a plain workspace: the registered stage tables, then the derived ones."""
    return (*tables(), *DERIVED_VIEWS)


def bench_views() -> tuple[str, ...]:
    """Every view of a bench root."""
    return (*tables(), *BENCH_DERIVED_VIEWS)


CATALOG_FILE = "catalog.duckdb"
BENCH_FILE = "bench.json"  # marks a bench root: {"members": [{"method", "seed", "path"}]}


def bench_members(root: Path) -> list[dict[str, Any]]:
    """The (method, seed, path) members of a bench root; [] for a plain workspace."""
    try:
        return list(json.loads((Path(root) / BENCH_FILE).read_text())["members"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


@dataclass(frozen=True)
class _Part:
    """One workspace's share of a view: the workspace itself, or a bench member (with the
    method and seed its rows are tagged with)."""

    source: Path | ObjectStore
    method: str | None = None
    seed: int | None = None


@dataclass
class _Plan:
    """Every view of a workspace, worked out before a connection exists: the files each table
    reads (so that the sandbox can allow exactly those), the manifests' rows, the SQL views."""

    files: dict[str, list[list[str]]] = field(default_factory=dict)  # table -> per-part paths
    parts: list[_Part] = field(default_factory=list)
    stage_runs: pa.Table | None = None
    derived: list[tuple[str, str]] = field(default_factory=list)  # (view, SQL) in order
    left_out: list[str] = field(default_factory=list)

    def readable(self) -> list[str]:
        return [p for per_part in self.files.values() for paths in per_part for p in paths]


def _plan(workspace: Path | ObjectStore, *, root: Path | None) -> _Plan:
    """The views of ``workspace``; with ``root``, paths relative to it (the persisted catalog).

    A stage run that does not validate is left out, with one warning line each."""
    plan = _Plan()
    members = [] if isinstance(workspace, ObjectStore) else bench_members(workspace)
    if members:
        plan.parts = [
            _Part(Path(workspace) / m["path"], str(m["method"]), int(m["seed"])) for m in members
        ]
    else:
        plan.parts = [_Part(workspace)]
    for table in tables():
        plan.files[table] = [_paths(part.source, table, root, plan.left_out) for part in plan.parts]
    runs = [stage_runs_table(part.source) for part in plan.parts]
    plan.stage_runs = pa.concat_tables(
        [_tagged(t, p) for t, p in zip(runs, plan.parts, strict=True)]
    )
    plan.derived = [("kept", "SELECT * FROM decisions WHERE kept")]
    views = BENCH_DERIVED_VIEWS if members else DERIVED_VIEWS
    plan.derived += [(name, view_sql(name)) for name in views if name not in ("kept", "stage_runs")]
    return plan


def _paths(
    source: Path | ObjectStore, table: str, root: Path | None, left_out: list[str]
) -> list[str]:
    files = committed_files(source, table, left_out)
    if root is None:  # absolute paths, or an object store's URLs
        return [str(f) for f in files]
    return [Path(f).relative_to(root).as_posix() for f in files]


def _tagged(table: pa.Table, part: _Part) -> pa.Table:
    """A bench member's rows with its method and seed as the first columns."""
    if part.method is None:
        return table
    n = table.num_rows
    return pa.table(
        {
            "method": pa.array([part.method] * n, pa.string()),
            "seed": pa.array([part.seed] * n, pa.int32()),
            **{name: table.column(name) for name in table.column_names},
        }
    )


def _relation(
    con: duckdb.DuckDBPyConnection, table: str, paths: list[str], part: _Part
) -> duckdb.DuckDBPyRelation:
    """One part's rows of ``table``: its committed files (names passed as values, never as SQL
    text), or a typed empty SELECT when there are none; tagged with method and seed in a bench."""
    columns = [f'"{f.name}"' for f in tables()[table].schema]
    if paths:
        relation = con.read_parquet(paths, hive_partitioning=False, union_by_name=True)
        relation = relation.select(*columns)
    else:
        relation = con.sql(empty_select(table))
    if part.method is None:
        return relation
    return relation.select(
        duckdb.ConstantExpression(part.method).alias("method"),
        duckdb.ConstantExpression(part.seed).cast(duckdb.sqltypes.INTEGER).alias("seed"),
        duckdb.StarExpression(),
    )


def _create_views(con: duckdb.DuckDBPyConnection, plan: _Plan, *, persisted: bool) -> None:
    """Every view of ``plan`` on ``con``.

    A table whose files DuckDB cannot read (a shard damaged at its recorded size) becomes an
    empty view with a warning, so the other tables keep working.
    """
    for table, per_part in plan.files.items():
        try:
            relations = [
                _relation(con, table, paths, part)
                for paths, part in zip(per_part, plan.parts, strict=True)
            ]
        except duckdb.Error as exc:  # e.g. a committed file that is not valid Parquet
            plan.left_out.append(
                f"mpd: warning: table {table} is empty here: {one_line(exc)}; "
                "`mpd status --verify` names the damaged stage and `mpd run` recomputes it"
            )
            relations = [_relation(con, table, [], part) for part in plan.parts]
        reduce(lambda a, b: a.union(b), relations).create_view(table, replace=True)
    if persisted:
        con.execute(f"CREATE OR REPLACE VIEW stage_runs AS {values_select(plan.stage_runs)}")
    else:
        con.register("stage_runs", plan.stage_runs)
    for name, select in plan.derived:
        try:
            con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {select}')
        except duckdb.Error as exc:
            raise SqlError(f"cannot build view {name}: {one_line(exc)}") from None
    for line in dict.fromkeys(plan.left_out):
        log.warning("%s", line)


def _workspace(workspace: Path | str) -> Path:
    path = Path(workspace).resolve()
    if not path.is_dir():
        raise SqlError(f"workspace {path} does not exist (nothing has run there yet?)")
    return path


def connect(
    workspace: Path | str | ObjectStore, *, scratch: Path | None = None
) -> duckdb.DuckDBPyConnection:
    """A sandboxed in-memory connection with every view over the workspace as it is now.

    The views name absolute paths of the committed files found now: a connection does not see
    later commits (open a new one; it takes milliseconds). The connection can read exactly those
    files and nothing else, with its configuration locked (:mod:`data.sandbox`): the SQL run on
    it may be a user's.

    An :class:`ObjectStore` workspace is read in place: its fsspec filesystem is registered
    with DuckDB (no extension is downloaded) and the views name the committed objects' URLs.
    """
    ws = workspace if isinstance(workspace, ObjectStore) else _workspace(workspace)
    plan = _plan(ws, root=None)
    return open_sandbox(
        plan.readable(),
        setup=lambda con: _create_views(con, plan, persisted=False),
        filesystem=ws.fs if isinstance(ws, ObjectStore) else None,
        scratch=scratch,
    )


def write_catalog(workspace: Path | str) -> Path:
    """(Re)write ``<ws>/catalog.duckdb``, views with workspace-relative paths; return its path.

    Relative paths resolve against the duckdb CLI's working directory or its
    ``file_search_path``, so the file works wherever the workspace is moved::

        cd ws && duckdb catalog.duckdb
        duckdb -cmd "SET file_search_path='ws'" ws/catalog.duckdb

    The views name the rounds and files committed *now*, and a table with no
    files yet is a typed empty SELECT, so the file goes stale at the next
    commit: it is rebuilt by every mpd command that commits, and by calling
    this. It is written to a temporary file and renamed, so a reader never
    sees a half-written catalog. (DuckDB splits ``file_search_path`` on
    commas: a workspace path containing a comma cannot be written here.)
    """
    ws = _workspace(workspace)
    target = ws / CATALOG_FILE
    tmp = ws / f".{CATALOG_FILE}.tmp-{os.getpid()}"
    leftovers = (tmp, tmp.with_name(tmp.name + ".wal"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            # Views are bound when created, so relative paths must resolve now.
            con.execute("SET file_search_path = ?", [str(ws)])
            _create_views(con, _plan(ws, root=ws), persisted=True)
        finally:
            con.close()
        # A WAL left beside an older catalog must not be replayed onto this one.
        target.with_name(target.name + ".wal").unlink(missing_ok=True)
        os.replace(tmp, target)
    finally:
        for path in leftovers:
            path.unlink(missing_ok=True)
    return target


def run_query(
    workspace: Path | str | ObjectStore,
    query: str,
    *,
    timeout_s: float | None = None,
    sink: Callable[[pa.RecordBatchReader], Any] | None = None,
) -> Any:
    """Check ``query`` with the read-only guard, run it in the sandbox over the views, return
    the result (an Arrow table, or what ``sink`` returns when given the record batches).

    The guard comes first (one statement, a query: nothing that writes); the sandbox then keeps
    the reads to the workspace's committed files. DuckDB errors become one-line
    :class:`SqlError`; ``timeout_s`` and Ctrl-C interrupt DuckDB itself. DuckDB may spill to a
    private directory that is removed afterwards.

    With ``sink``, the result is never collected: ``mpd sql --out`` streams into a Parquet
    writer, so a million full-width traces never sit whole in memory.
    """
    check_read_only(query)
    with tempfile.TemporaryDirectory(prefix="mpd-sql-") as scratch:
        con = connect(workspace, scratch=Path(scratch))
        try:
            return run_query_on(con, query, timeout_s=timeout_s, sink=sink)
        finally:
            con.close()


def internal_queries(workspace: Path | str, *queries: str) -> list[pa.Table]:
    """mpd's own read-only SQL (summaries, artifacts) over one connection, without the guard.

    Never pass user text here: :func:`run_query` is the guarded entry point.
    One connection for several queries matters on a fully cached re-run, where
    building views and parsing the guard's syntax trees was most of the time.
    """
    con = connect(workspace)
    try:
        return [con.sql(q).to_arrow_table() for q in queries]
    finally:
        con.close()
