"""Filter stage: a DuckDB SQL rule keeps or drops each rewrite, with a reason."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from data.configbase import StrictModel
from data.errors import UserError
from data.schemas import DECISIONS, SAMPLES, SchemaError, conform
from data.store import StageWriter


class FilterConfig(StrictModel):
    ratio: float = Field(
        0.9, gt=0, le=10, description="Keep a rewrite whose think tokens <= ratio x the original's."
    )
    faithful: bool = Field(
        False,
        description="Drop a correct rewrite with an equation line the student never wrote "
        "(reason 'unfaithful'): the teacher computed a step anew, and a right answer can sit on "
        "a wrong step. Needs traces that state their steps as equations.",
    )
    sql: Path | None = Field(
        None, description="Your own filter SQL file; None uses the built-in data/sql/filter.sql."
    )


DEFAULT_SQL = Path(__file__).resolve().parents[1] / "data" / "sql" / "filter.sql"


class FilterError(UserError, ValueError):
    """The filter SQL failed, or produced rows that do not fit the decisions table."""


def filter_sql(cfg: FilterConfig) -> str:
    path = cfg.sql or DEFAULT_SQL
    if not Path(path).is_file():
        raise FilterError(f"filter SQL file not found: {path}")
    return Path(path).read_text()


def run_filter(
    rewrites: pa.Table,
    sql: str,
    *,
    ratio: float,
    round_: int,
    out: Path,
    samples: pa.Table | None = None,
    faithful: bool = False,
) -> pa.Table:
    """Run the filter SQL over one round's rewrites (and the samples they rewrite) with
    DuckDB, ``COPY`` its result to ``out`` (inside staging), and return it checked against
    the decisions schema."""
    con = duckdb.connect()
    try:
        con.register("rewrites_arrow", rewrites)
        con.execute("CREATE VIEW rewrites AS SELECT * FROM rewrites_arrow")
        con.register("samples_arrow", samples if samples is not None else SAMPLES.empty_table())
        con.execute("CREATE VIEW samples AS SELECT * FROM samples_arrow")
        con.execute(f"SET VARIABLE ratio = {float(ratio)!r}")
        con.execute(f"SET VARIABLE faithful = {bool(faithful)}")
        con.execute(f"SET VARIABLE round = {int(round_)}")
        body = sql.strip().rstrip(";")
        con.execute(f"COPY ({body}) TO '{out}' (FORMAT parquet)")
    except duckdb.Error as exc:
        raise FilterError(f"filter SQL failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
        # A FilterError's traceback keeps this frame alive (Prefect holds the failed
        # state until exit): without the del, nanobind reports the connection leaked.
        del con
    table = pq.read_table(out)
    out.unlink()
    try:
        return conform(table, DECISIONS, name="filter output")
    except SchemaError as exc:
        raise FilterError(str(exc)) from None


def filter_body(
    writer: StageWriter,
    cfg: FilterConfig,
    *,
    rewrites: pa.Table,
    samples: pa.Table | None,
    round_: int,
) -> dict:
    decisions = run_filter(
        rewrites,
        filter_sql(cfg),
        ratio=cfg.ratio,
        round_=round_,
        out=writer.path(".decisions.raw.parquet"),
        samples=samples,
        faithful=cfg.faithful,
    )
    writer.write_table("decisions.parquet", decisions, DECISIONS)
    reasons = pc.value_counts(decisions.column("reason")).to_pylist()
    return {
        "kept": int(pc.sum(decisions.column("kept")).as_py() or 0),
        "reasons": {r["values"]: r["counts"] for r in reasons},
    }
