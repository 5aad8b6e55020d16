"""What a catalog view is made of (:mod:`data.catalog` builds the views from these).

A stage table's view reads the committed files its declaration names (:func:`committed_files`:
the manifest's files that match the table's glob, on disk or as object-store URLs), or, before
any is committed, a typed empty SELECT (:func:`empty_select`) so that ``DESCRIBE`` and joins work
on a fresh workspace. ``stage_runs`` is the manifests as a VALUES list; the derived views'
queries are ``data/sql/<name>.sql`` (:func:`view_sql`).
"""

from __future__ import annotations

from fnmatch import fnmatch
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa

from data.manifest import MANIFEST, Manifest
from data.objstore import ObjectStore
from data.store import StageStore
from data.tables import tables

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


def empty_select(table: str) -> str:
    """A typed empty SELECT with a table's columns (a table nothing has committed yet)."""
    schema = tables()[table].schema
    typed_nulls = ", ".join(f'CAST(NULL AS {duckdb_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"SELECT {typed_nulls} WHERE false"


def view_sql(name: str) -> str:
    """A derived view's query, from ``data/sql/<name>.sql``."""
    text = resources.files("data").joinpath("sql", f"{name}.sql").read_text()
    return text.strip().rstrip(";")


def round_summary_sql() -> str:
    """The round_summary query, from ``data/sql/round_summary.sql``."""
    return view_sql("round_summary")


def stage_runs_table(workspace: Path | ObjectStore) -> pa.Table:
    """The stage_runs rows: the committed manifests, one row each (a snapshot, like the views)."""
    store = workspace if isinstance(workspace, ObjectStore) else StageStore(workspace)
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
        for m in store.committed()
    ]
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(STAGE_RUNS)
    return pa.table(
        {
            name: pa.array([_cell(v, kind) for v in values], _ARROW_OF[kind])
            for (name, kind), values in zip(STAGE_RUNS, columns, strict=True)
        }
    )


_ARROW_OF = {
    "VARCHAR": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
}


def _cell(value: Any, kind: str) -> Any:
    if value is None:
        return None
    return str(value) if kind == "VARCHAR" else float(value) if kind == "DOUBLE" else int(value)


def values_select(table: pa.Table) -> str:
    """An Arrow table as a typed VALUES query: the persisted catalog cannot hold a registered
    table, so stage_runs is stored as text there (values quoted, never bare; a bench root's
    rows carry their method and seed first)."""
    fields = list(table.schema)
    cast = ", ".join(f'CAST("{f.name}" AS {duckdb_type(f.type)}) AS "{f.name}"' for f in fields)
    names = ", ".join(f'"{f.name}"' for f in fields)
    rows = table.to_pylist() or [dict.fromkeys(table.column_names)]
    values = ", ".join(
        "(" + ", ".join("NULL" if v is None else _quote(str(v)) for v in row.values()) + ")"
        for row in rows
    )
    where = "" if table.num_rows else " WHERE false"
    return f"SELECT {cast} FROM (VALUES {values}) AS t({names}){where}"
