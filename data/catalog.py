"""DuckDB views over a workspace's committed Parquet, and the ``mpd sql`` plumbing.

Every stage table is one view over all its rounds::

    problems  samples  solutions  rewrites  truncations  scores  decisions  kept
    train_log  evals  stage_runs  round_summary

``stage_runs`` is one row per committed stage run, from the manifests (stage,
round, key, rows, duration_s, finished_at, shared_from: the workspace a shared
stage was adopted from, NULL when computed here; peak_rss_mb: the process's peak resident
memory while the stage computed, wherever it computed, NULL where /proc could not say;
compute_s: its seconds inside engine calls and optimizer steps).

A *bench root* (``mpd bench``'s output directory, marked by ``bench.json``)
holds one workspace per (method, seed). Its tables are the members' tables
stacked, with ``method`` and ``seed`` columns first, and its ``bench`` view
(``data/sql/bench.sql``) is the comparison table; ``round_summary`` is per
workspace and is not defined there.

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
  works), then hardens it (no extension install/autoload, configuration
  locked). :func:`run_query` checks a query with :mod:`data.sql_guard` and runs
  it there.
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
import threading
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from data.manifest import MANIFEST, Manifest
from data.objstore import ObjectStore
from data.sql_guard import ReadOnlyError, SqlError, check_read_only, one_line
from data.tables import tables

log = logging.getLogger("mpd.catalog")

__all__ = [
    "CATALOG_FILE",
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
DERIVED_VIEWS: tuple[str, ...] = ("kept", "stage_runs", "round_summary")
BENCH_DERIVED_VIEWS: tuple[str, ...] = ("kept", "stage_runs", "bench")


def views() -> tuple[str, ...]:
    """Every view of a plain workspace: the registered stage tables, then the derived ones."""
    return (*tables(), *DERIVED_VIEWS)


def bench_views() -> tuple[str, ...]:
    """Every view of a bench root."""
    return (*tables(), *BENCH_DERIVED_VIEWS)


CATALOG_FILE = "catalog.duckdb"
BENCH_FILE = "bench.json"  # marks a bench root: {"members": [{"method", "seed", "path"}]}
STAGE_RUNS: tuple[tuple[str, str], ...] = (
    ("stage", "VARCHAR"),
    ("round", "INTEGER"),
    ("key", "VARCHAR"),
    ("rows", "BIGINT"),
    ("duration_s", "DOUBLE"),
    ("finished_at", "DOUBLE"),
    ("shared_from", "VARCHAR"),
    ("peak_rss_mb", "DOUBLE"),
    ("compute_s", "DOUBLE"),
)

# Applied after the views exist; lock_configuration last, so that nothing run on
# the connection afterwards can undo the others. External access stays on: the
# views read Parquet through it.
_HARDENING = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET python_enable_replacements = false",  # no Python variables as tables
    "SET lock_configuration = true",
)

_SCALAR_TYPES: dict[pa.DataType, str] = {
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.uint8(): "UTINYINT",
    pa.uint16(): "USMALLINT",
    pa.uint32(): "UINTEGER",
    pa.uint64(): "UBIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.binary(): "BLOB",
    pa.date32(): "DATE",
}


def duckdb_type(arrow_type: pa.DataType) -> str:
    """DuckDB's name for an Arrow type, e.g. ``list<int16>`` -> ``SMALLINT[]``."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"{duckdb_type(arrow_type.value_type)}[]"
    if arrow_type in _SCALAR_TYPES:
        return _SCALAR_TYPES[arrow_type]
    raise TypeError(f"no DuckDB type for Arrow type {arrow_type}")


def committed_files(
    workspace: Path | ObjectStore, table: str, left_out: list[str] | None = None
) -> list[Path] | list[str]:
    """Absolute paths of ``table``'s committed files, sorted by round then name.

    The files are those the round's manifest lists (never whatever happens to lie in the
    directory), and only for a stage run whose files are all there at their recorded sizes: a
    deleted or truncated shard leaves the whole stage run out, so a query never counts 24 of
    32 rows as if they were all. ``mpd status`` checks the contents too (sha256); sizes are what
    a query can afford. Each run left out is one line appended to ``left_out``.

    On object storage the same rule gives the objects' URLs, from the committed manifests.
    """
    from data.store import StageStore

    if isinstance(workspace, ObjectStore):
        return _committed_objects(workspace, table, left_out)
    spec = tables()[table]
    stage, file_glob = spec.stage, spec.files
    store = StageStore(workspace)
    found: list[tuple[int, str, Path]] = []
    for round_dir in Path(workspace).joinpath(stage).glob("round=*"):
        round_text = round_dir.name.removeprefix("round=")
        if not (round_text.isdigit() and (round_dir / MANIFEST).is_file()):
            continue  # a commit that did not finish: not a stage run yet
        r = int(round_text)
        man = store.manifest(stage, r)
        problems = store.validate(stage, r, deep=False, man=man) if man else ["unreadable"]
        if man is None or problems:
            if left_out is not None:
                left_out.append(left_out_line(stage, r, problems[0]))
            continue
        found += [(r, name, round_dir / name) for name in _table_files(man, file_glob)]
    return [path for _, _, path in sorted(found)]


def _table_files(man: Manifest, file_glob: str) -> list[str]:
    """The files of a committed run that belong to a table: top-level, matching its glob, not
    hidden (``.``) or internal (``_``)."""
    return [
        e.path
        for e in man.files
        if "/" not in e.path and fnmatch(e.path, file_glob) and not e.path.startswith((".", "_"))
    ]


def _committed_objects(store: ObjectStore, table: str, left_out: list[str] | None) -> list[str]:
    spec = tables()[table]
    found: list[tuple[int, str, str]] = []
    for man in store.committed():
        if man.stage != spec.stage:
            continue
        if problems := store.validate(man.stage, man.round, deep=False, man=man):
            if left_out is not None:
                left_out.append(left_out_line(man.stage, man.round, problems[0]))
            continue
        found += [(man.round, n, store.object_url(man, n)) for n in _table_files(man, spec.files)]
    return [url for _, _, url in sorted(found)]


def left_out_line(stage: str, round_: int, problem: str) -> str:
    """The one line that says a stage run is missing from SQL, and how to get it back."""
    problem = problem.removeprefix(f"{stage} round {round_}: ")
    return (
        f"mpd: warning: {stage} round {round_} is left out of SQL ({problem}); "
        f"`mpd run` recomputes it (or `mpd rerun --round {round_} --from {stage}`)"
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_select(table: str, paths: list[str]) -> str:
    """The SELECT behind a table view: its schema's columns, in schema order."""
    schema = tables()[table].schema
    if not paths:
        typed_nulls = ", ".join(
            f"CAST(NULL AS {duckdb_type(f.type)}) AS {_ident(f.name)}" for f in schema
        )
        return f"SELECT {typed_nulls} WHERE false"
    columns = ", ".join(_ident(f.name) for f in schema)
    files = ", ".join(_quote(p) for p in paths)
    return (
        f"SELECT {columns} FROM read_parquet([{files}], "
        "hive_partitioning = false, union_by_name = true)"
    )


def round_summary_sql() -> str:
    """The round_summary query, from ``data/sql/round_summary.sql``."""
    text = resources.files("data").joinpath("sql", "round_summary.sql").read_text()
    return text.strip().rstrip(";")


def _stage_runs_select(workspace: Path | ObjectStore) -> str:
    """The stage_runs view: the manifests as an inline table (a snapshot, like the views).

    Values go in as text and are cast to the column types, so an empty workspace
    and a full one describe the same columns.
    """
    from data.store import StageStore

    names = ", ".join(n for n, _ in STAGE_RUNS)
    cast = ", ".join(f"CAST({name} AS {kind}) AS {name}" for name, kind in STAGE_RUNS)
    rows = [
        (
            m.stage,
            m.round,
            m.key,
            m.rows,
            m.duration_s,
            m.finished_at,
            m.extra.get("shared_from"),
            m.extra.get("peak_rss_mb"),
            m.extra.get("compute_s"),
        )
        for m in (
            workspace if isinstance(workspace, ObjectStore) else StageStore(workspace)
        ).committed()
    ]
    if not rows:
        rows, where = [(None,) * len(STAGE_RUNS)], " WHERE false"
    else:
        where = ""
    values = ", ".join(
        "(" + ", ".join("NULL" if v is None else _quote(str(v)) for v in row) + ")" for row in rows
    )
    return f"SELECT {cast} FROM (VALUES {values}) AS t({names}){where}"


def _table_paths(
    workspace: Path | ObjectStore, table: str, root: Path, relative: bool, left_out: list[str]
) -> list[str]:
    files = committed_files(workspace, table, left_out)
    if not relative:  # absolute paths, or an object store's URLs
        return [str(f) for f in files]
    return [Path(f).relative_to(root).as_posix() for f in files]


def bench_members(root: Path) -> list[dict[str, Any]]:
    """The (method, seed, path) members of a bench root; [] for a plain workspace."""
    try:
        return list(json.loads((Path(root) / BENCH_FILE).read_text())["members"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _view_definitions(
    workspace: Path | ObjectStore, *, relative: bool, left_out: list[str]
) -> Iterator[tuple[str, str]]:
    """(view name, SELECT) in dependency order; paths absolute or workspace-relative (URLs
    on object storage)."""
    if not isinstance(workspace, ObjectStore) and (members := bench_members(workspace)):
        yield from _bench_view_definitions(workspace, members, relative=relative, left_out=left_out)
        return
    for table in tables():
        root = Path() if isinstance(workspace, ObjectStore) else workspace
        paths = _table_paths(workspace, table, root, relative, left_out)
        yield table, _table_select(table, paths)
    yield "kept", "SELECT * FROM decisions WHERE kept"
    yield "stage_runs", _stage_runs_select(workspace)
    yield "round_summary", round_summary_sql()


def _bench_view_definitions(
    root: Path, members: list[dict[str, Any]], *, relative: bool, left_out: list[str]
) -> Iterator[tuple[str, str]]:
    """A bench root: each member's table with its method and seed, stacked; then ``bench``."""

    def stacked(select_of: Any) -> str:
        parts = [
            f"SELECT {_quote(str(m['method']))} AS method, CAST({int(m['seed'])} AS INTEGER) "
            f"AS seed, * FROM ({select_of(root / m['path'])})"
            for m in members
        ]
        return " UNION ALL ".join(parts)

    for table in tables():
        yield (
            table,
            stacked(
                lambda ws, t=table: _table_select(t, _table_paths(ws, t, root, relative, left_out))
            ),
        )
    yield "kept", "SELECT * FROM decisions WHERE kept"
    yield "stage_runs", stacked(_stage_runs_select)
    text = resources.files("data").joinpath("sql", "bench.sql").read_text()
    yield "bench", text.strip().rstrip(";")


def _create_views(
    con: duckdb.DuckDBPyConnection, workspace: Path | ObjectStore, *, relative: bool
) -> None:
    """Every view; a stage run that does not validate is left out, with one warning line each.

    A table whose files DuckDB cannot read (a shard damaged at its recorded size) becomes an
    empty view with a warning, so the other tables keep working.
    """
    left_out: list[str] = []
    for name, select in _view_definitions(workspace, relative=relative, left_out=left_out):
        try:
            con.execute(f"CREATE OR REPLACE VIEW {_ident(name)} AS {select}")
        except duckdb.Error as exc:  # e.g. a committed file that is not valid Parquet
            if name not in tables():
                raise SqlError(f"cannot build view {name}: {one_line(exc)}") from None
            left_out.append(
                f"mpd: warning: table {name} is empty here: {one_line(exc)}; "
                "`mpd status --verify` names the damaged stage and `mpd run` recomputes it"
            )
            con.execute(f"CREATE OR REPLACE VIEW {_ident(name)} AS {_table_select(name, [])}")
    for line in dict.fromkeys(left_out):
        log.warning("%s", line)


def _workspace(workspace: Path | str) -> Path:
    path = Path(workspace).resolve()
    if not path.is_dir():
        raise SqlError(f"workspace {path} does not exist (nothing has run there yet?)")
    return path


def connect(workspace: Path | str | ObjectStore) -> duckdb.DuckDBPyConnection:
    """An in-memory, hardened connection with every view over the workspace as it is now.

    The views name absolute paths of the committed files found now: a
    connection does not see later commits (open a new one; it takes
    milliseconds). After the views are made, extension install/autoload are
    off and ``lock_configuration`` is on, so no later statement can change a
    setting; reading files stays possible because the views need it.

    An :class:`ObjectStore` workspace is read in place: its fsspec filesystem is registered
    with DuckDB (no extension is downloaded) and the views name the committed objects' URLs.
    """
    ws = workspace if isinstance(workspace, ObjectStore) else _workspace(workspace)
    con = duckdb.connect(":memory:")
    try:
        if isinstance(ws, ObjectStore):
            con.register_filesystem(ws.fs)
        _create_views(con, ws, relative=False)
        for statement in _HARDENING:
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


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
            con.execute(f"SET file_search_path = {_quote(str(ws))}")
            _create_views(con, ws, relative=True)
        finally:
            con.close()
        # A WAL left beside an older catalog must not be replayed onto this one.
        target.with_name(target.name + ".wal").unlink(missing_ok=True)
        os.replace(tmp, target)
    finally:
        for path in leftovers:
            path.unlink(missing_ok=True)
    return target


class QueryTimeoutError(SqlError):
    """The query ran past its time limit and was interrupted (one line: how to allow more)."""


# Rows per record batch handed to a sink: a few hundred MB at most for full-width trace rows.
SINK_BATCH_ROWS = 65_536


def run_query(
    workspace: Path | str | ObjectStore,
    query: str,
    *,
    timeout_s: float | None = None,
    sink: Callable[[pa.RecordBatchReader], Any] | None = None,
) -> Any:
    """Check ``query`` with the read-only guard, run it over the views, return the result.

    With several statements (all read-only), the last one's result is returned. DuckDB errors
    become :class:`SqlError` with DuckDB's first message line. The query runs in a worker
    thread so that the caller stays responsive: Ctrl-C (``KeyboardInterrupt``) and
    ``timeout_s`` interrupt DuckDB itself (``interrupt()``), which DuckDB otherwise lets run
    to the end with the signal pending.

    With ``sink``, the result is never collected: the sink gets DuckDB's record batches as they
    are produced (in the worker thread, so an interrupt stops both) and its return value is
    returned. ``mpd sql --out`` streams into a Parquet writer this way: a result of a million
    full-width traces never sits whole in memory, and DuckDB's scan runs while the writer
    compresses.
    """
    check_read_only(query)
    con = connect(workspace)
    try:
        return _run_interruptible(con, query, timeout_s, sink)
    finally:
        con.close()


def _run_interruptible(
    con: duckdb.DuckDBPyConnection,
    query: str,
    timeout_s: float | None,
    sink: Callable[[pa.RecordBatchReader], Any] | None = None,
) -> Any:
    outcome: dict[str, Any] = {}
    # The worker's end is an Event, not Thread.join: a KeyboardInterrupt landing inside join()
    # can leave the thread marked stopped while it still runs, and close() then finds the
    # connection busy.
    done = threading.Event()

    def work() -> None:
        try:
            relation = con.sql(query)
            if sink is None:
                outcome["table"] = (
                    relation.to_arrow_table() if relation is not None else pa.table({})
                )
            elif relation is None:
                outcome["table"] = sink(pa.table({}).to_reader())
            else:
                stream = relation.to_arrow_reader(SINK_BATCH_ROWS)
                outcome["table"] = sink(
                    pa.RecordBatchReader.from_batches(stream.schema, _batches(stream))
                )
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="mpd-sql", daemon=True).start()
    deadline = None if not timeout_s else time.monotonic() + timeout_s
    try:
        while not done.wait(0.05):
            if deadline is not None and time.monotonic() > deadline:
                _stop(con, done)
                raise QueryTimeoutError(
                    f"the query ran past {timeout_s:g} s and was stopped "
                    "(raise --timeout, or --timeout 0 for no limit)"
                )
    except KeyboardInterrupt:
        _stop(con, done)
        raise
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, duckdb.Error):
            raise SqlError(one_line(exc)) from None
        raise exc
    return outcome["table"]


def _batches(stream: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """A DuckDB result stream's batches; an error DuckDB meets half-way (a failed cast in row
    300,000) arrives through Arrow as a bare OSError: it becomes the query's SqlError, so that
    no sink takes it for its own write failing."""
    while True:
        try:
            batch = stream.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            raise SqlError(one_line(exc)) from None
        yield batch


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Interrupt the worker's query until it ends: an interrupt that lands before DuckDB starts
    executing (while it parses or binds) is forgotten, so it is repeated."""
    while not done.is_set():
        con.interrupt()
        done.wait(0.1)


def internal_queries(workspace: Path | str, *queries: str) -> list[pa.Table]:
    """mpd's own read-only SQL (summaries, artifacts) over one connection, unguarded.

    Never pass user text here: :func:`run_query` is the guarded entry point.
    One connection for several queries matters on a fully cached re-run, where
    building views and parsing the guard's syntax trees was most of the time.
    """
    con = connect(workspace)
    try:
        return [con.sql(q).to_arrow_table() for q in queries]
    finally:
        con.close()
