"""Where SQL a user wrote runs: a DuckDB connection that can read the files it is given, and
nothing else, with DuckDB's own sandbox.

``mpd sql`` queries and the filter file are hostile input: a run's ``overrides`` can be set by
anyone who can start a deployment, and a query runs with the worker's permissions. A denylist of
function names is never complete (``read_text``, ``read_blob``, ``glob``, replacement scans
``FROM '/etc/passwd'``, ``ATTACH``, extensions, ``http://``...), so the boundary is DuckDB's:

1. ``allowed_paths`` = exactly the committed files the views read (bound as a parameter, never
   pasted into SQL), plus a private scratch directory for spilling when the caller gives one;
2. ``enable_external_access = false``: every other file, URL, extension and secret store is a
   "Permission Error" inside DuckDB itself, whatever function or syntax asks for it;
3. the views are created (the only reads of files mpd itself asks for), then
   ``lock_configuration = true``: no statement can undo 1-2 or raise a limit.

The order matters: DuckDB refuses to change ``allowed_paths`` once external access is off, and
everything once the configuration is locked (measured, FACTS.md).

Allowed paths can also be *written* by DuckDB (``COPY ... TO`` an allowed file), so what runs
here is still checked by :mod:`data.sql_guard` first: exactly one statement, a query (no COPY,
no data-modifying CTE). The guard keeps writes out; the sandbox keeps reads in.

Example::

    con = open_sandbox(files, setup=lambda c: parquet_view(c, "t", files, ["a"]))
    run_query_on(con, "SELECT count(*) FROM t", timeout_s=60)   # -> pa.Table
    run_query_on(con, "SELECT * FROM read_text('/etc/passwd')")  # SqlError: Permission Error
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from data.memory import out_of_memory_error
from data.sql_guard import SqlError, one_line

# Set before external access is switched off; lock_configuration, set last, freezes them all.
_BEFORE = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET allow_unsigned_extensions = false",
    "SET python_enable_replacements = false",  # no Python variables as tables
)

# DuckDB out of memory (its own limit, 80% of the machine's by default) is the machine's, not a
# mistake in the query's text: a resource error, exit 1, as a GPU out of memory is.
DUCKDB_OUT_OF_MEMORY = "Out of Memory Error"
_QUERY = "running the query in DuckDB"
DUCKDB_HINT = "select fewer rows or columns, or run on a machine with more memory"

# Rows per record batch handed to a sink: a few hundred MB at most for full-width trace rows.
SINK_BATCH_ROWS = 65_536


class QueryTimeoutError(SqlError):
    """The query ran past its time limit and was interrupted (one line: how to allow more)."""


def allowed_forms(path: str) -> list[str]:
    """The spellings DuckDB may check a readable path under: a registered fsspec filesystem's
    URL ``memory://b/k`` is opened as ``memory:///b/k``."""
    forms = [path]
    scheme, sep, rest = path.partition("://")
    if sep and not rest.startswith("/"):
        forms.append(f"{scheme}:///{rest}")
    return forms


def open_sandbox(
    readable: Iterable[str | Path],
    *,
    setup: Callable[[duckdb.DuckDBPyConnection], None] = lambda con: None,
    filesystem: Any = None,
    scratch: Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory connection that can read ``readable`` and nothing else, configuration locked.

    ``setup`` runs after external access is off and before the lock: it creates the views
    (reading only ``readable``) and registers Arrow tables. ``filesystem``, an fsspec filesystem,
    is registered first so that object-storage URLs in ``readable`` can be read in place.
    ``scratch`` is where DuckDB may spill; None turns spilling off (nothing of DuckDB's on disk).
    """
    con = duckdb.connect(":memory:")
    try:
        if filesystem is not None:
            con.register_filesystem(filesystem)
        for statement in _BEFORE:
            con.execute(statement)
        con.execute("SET temp_directory = ?", [str(scratch) if scratch is not None else ""])
        paths = [form for p in readable for form in allowed_forms(str(p))]
        if paths:
            con.execute("SET allowed_paths = ?", [paths])
        con.execute("SET enable_external_access = false")
        setup(con)
        con.execute("SET lock_configuration = true")
    except BaseException:  # boundary: no half-configured connection left open, re-raised
        con.close()
        raise
    return con


def parquet_view(
    con: duckdb.DuckDBPyConnection,
    name: str,
    files: Sequence[str | Path],
    columns: Sequence[str] | None = None,
) -> None:
    """View ``name`` over Parquet ``files`` (``columns`` in that order, default all), built
    through DuckDB's relation API: file names travel as values, never as SQL text (a workspace
    path holding a quote is just a path). Every file carries ``round`` as a column: the path
    never overrides it.
    """
    relation = con.read_parquet(
        [str(f) for f in files], hive_partitioning=False, union_by_name=True
    )
    if columns is not None:
        relation = relation.select(*(_ident(c) for c in columns))
    relation.create_view(name, replace=True)


def arrow_view(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    """View ``name`` over an Arrow table held in memory (no file involved)."""
    con.register(name, table)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def run_query_on(
    con: duckdb.DuckDBPyConnection,
    query: str,
    *,
    timeout_s: float | None = None,
    sink: Callable[[pa.RecordBatchReader], Any] | None = None,
    timeout_hint: str = "raise --timeout, or --timeout 0 for no limit",
    readable: str = "the workspace's committed tables",
) -> Any:
    """Run one (already checked) query on ``con`` in a worker thread; return its Arrow table,
    or what ``sink`` returns when given DuckDB's record batches as they are produced.

    The worker thread keeps the caller responsive: Ctrl-C (``KeyboardInterrupt``), SIGTERM turned
    into an exception, and ``timeout_s`` interrupt DuckDB itself (``interrupt()``), which DuckDB
    otherwise lets run to the end with the signal pending. DuckDB errors become one-line
    :class:`SqlError`; a refusal of the sandbox says what may be read (``readable``).
    """
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
        except BaseException as exc:  # boundary: a thread hands its failure to the caller's
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
                    f"the query ran past {timeout_s:g} s and was stopped ({timeout_hint})"
                )
    except BaseException:  # boundary: Ctrl-C or a stop signal stops the query, re-raised
        _stop(con, done)
        raise
    if "error" in outcome:
        exc = outcome["error"]
        if isinstance(exc, duckdb.OutOfMemoryException):  # the machine's, not the query's text
            raise out_of_memory_error(_QUERY, "this machine", exc, DUCKDB_HINT) from None
        if isinstance(exc, duckdb.PermissionException):
            raise SqlError(f"{one_line(exc)} (this query may read {readable} only)") from None
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
            if DUCKDB_OUT_OF_MEMORY in str(exc):  # DuckDB's own words, through Arrow
                raise out_of_memory_error(_QUERY, "this machine", exc, DUCKDB_HINT) from None
            raise SqlError(one_line(exc)) from None
        yield batch


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Interrupt the worker's query until it ends: an interrupt that lands before DuckDB starts
    executing (while it parses or binds) is forgotten, so it is repeated."""
    while not done.is_set():
        con.interrupt()
        done.wait(0.1)
