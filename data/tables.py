"""The tables SQL users see: which stage directory and files each is, and its schema.

A table is declared by the stage that writes it (``tasks/<stage>.py``'s ``STAGE``), and
``tasks/registry.py`` registers every stage's tables here when it is imported (every
``flows`` module imports it first). The catalog builds one view per registered table,
so a new stage's table is queryable without touching ``data/``: ``data/`` stays a plain
library that knows no stage module, and the declaration stays in the stage's module.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    """One SQL view: the files ``<stage>/round=<r>/<files>`` of committed stage runs."""

    name: str  # the view's name, e.g. "samples"
    stage: str  # the stage directory under the workspace, e.g. "sample"
    files: str  # a file glob inside a round directory, e.g. "*.parquet"
    schema: pa.Schema

    @property
    def glob(self) -> str:
        """Where the table's files lie, relative to the workspace."""
        return f"{self.stage}/round=*/{self.files}"


_TABLES: dict[str, Table] = {}


def register(*tables: Table) -> None:
    """Add tables (in the order the catalog lists them); the same declaration twice is a no-op,
    a second declaration of a name is an error: two stages must not write one view."""
    for table in tables:
        old = _TABLES.get(table.name)
        if old is not None and old != table:
            raise ValueError(f"table {table.name!r} is declared twice ({old.stage}, {table.stage})")
        _TABLES[table.name] = table


def unregister(name: str) -> None:
    """Remove a table (a test's toy stage cleans up after itself)."""
    _TABLES.pop(name, None)


def tables() -> dict[str, Table]:
    """Every registered table, by name, in registration order."""
    if not _TABLES:
        raise RuntimeError(
            "no tables are registered: import tasks.registry before using the catalog"
        )
    return dict(_TABLES)
