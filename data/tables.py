"""The tables SQL users see: which stage directory and files each is, and its schema.

The one table registry. mpd's own tables are declared here (``BUILTIN``), so the catalog, the
schema checks and ``mpd sql`` work with ``data/`` alone, whatever was imported first; each
stage's declaration (``tasks/<stage>.py``'s ``STAGE``) names the tables it writes from here. A
stage added later declares its own table in its module, and registering the stage
(``tasks/registry.py``) registers its table: queryable without touching ``data/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from data import schemas


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


PROBLEMS = Table("problems", "problems", "*.parquet", schemas.PROBLEMS)
SAMPLES = Table("samples", "sample", "*.parquet", schemas.SAMPLES)
SOLUTIONS = Table("solutions", "solve", "*.parquet", schemas.SOLUTIONS)
REWRITES = Table("rewrites", "rewrite", "*.parquet", schemas.REWRITES)
TRUNCATIONS = Table("truncations", "truncate", "*.parquet", schemas.TRUNCATIONS)
SCORES = Table("scores", "score", "*.parquet", schemas.SCORES)
DECISIONS = Table("decisions", "filter", "decisions.parquet", schemas.DECISIONS)
TRAIN_LOG = Table("train_log", "train", "log.parquet", schemas.TRAIN_LOG)
EVALS = Table("evals", "eval", "*.parquet", schemas.EVALS)
BOOTSTRAP_EVALS = Table("bootstrap_evals", "bootstrap", "evals.parquet", schemas.BOOTSTRAP_EVALS)
# In the order the catalog lists them.
BUILTIN = (
    BOOTSTRAP_EVALS,
    PROBLEMS,
    SAMPLES,
    SOLUTIONS,
    REWRITES,
    SCORES,
    DECISIONS,
    TRUNCATIONS,
    TRAIN_LOG,
    EVALS,
)

_TABLES: dict[str, Table] = {t.name: t for t in BUILTIN}


def register(*tables: Table) -> None:
    """Add tables (in the order the catalog lists them); the same declaration twice is a no-op,
    a second declaration of a name is an error: two stages must not write one view."""
    for table in tables:
        old = _TABLES.get(table.name)
        if old is not None and old != table:
            raise ValueError(f"table {table.name!r} is declared twice ({old.stage}, {table.stage})")
        _TABLES[table.name] = table


def unregister(name: str) -> None:
    """Remove a table a stage added (a test's toy stage cleans up after itself)."""
    if name not in {t.name for t in BUILTIN}:
        _TABLES.pop(name, None)


def tables() -> dict[str, Table]:
    """Every table, by name: mpd's own, then those registered stages added."""
    return dict(_TABLES)
