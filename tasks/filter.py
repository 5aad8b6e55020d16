"""Filter stage: a DuckDB SQL rule keeps or drops each rewrite, with a reason.

Its key: the round's rewrites (their key), the filter config and the SQL text. A filter that
keeps nothing ends the round with one line: training on nothing is no round.
"""

from __future__ import annotations

import hashlib
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
from data.tables import Table
from tasks.common import StageResult, read_stage, stage_files
from tasks.context import Context, Round
from tasks.stage import Stage


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
    rewrites: pa.Table | list[Path],
    sql: str,
    *,
    ratio: float,
    round_: int,
    out: Path,
    samples: pa.Table | list[Path] | None = None,
    faithful: bool = False,
) -> pa.Table:
    """Run the filter SQL over one round's rewrites (and the samples they rewrite) with
    DuckDB, ``COPY`` its result to ``out`` (inside staging), and return it checked against
    the decisions schema.

    ``rewrites`` and ``samples`` are the committed Parquet files (what the stage passes: DuckDB
    reads them itself, only the columns the rule needs, and the table never exists in Python)
    or Arrow tables (tests, small inputs).
    """
    con = duckdb.connect()
    try:
        _view(con, "rewrites", rewrites)
        _view(con, "samples", samples if samples is not None else SAMPLES.empty_table())
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


def _view(con: duckdb.DuckDBPyConnection, name: str, source: pa.Table | list[Path]) -> None:
    if isinstance(source, pa.Table):
        con.register(f"{name}_arrow", source)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM {name}_arrow")
        return
    files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in source)
    con.execute(
        f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}], hive_partitioning = false)"
    )


def filter_body(
    writer: StageWriter,
    cfg: FilterConfig,
    *,
    rewrites: pa.Table | list[Path],
    samples: pa.Table | list[Path] | None,
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
    kept, reasons = kept_count(decisions)
    return {"kept": kept, "reasons": reasons}


def kept_count(decisions: pa.Table) -> tuple[int, dict[str, int]]:
    """How many rows the filter kept, and how many it dropped for each reason."""
    reasons = pc.value_counts(decisions.column("reason")).to_pylist()
    return int(pc.sum(decisions.column("kept")).as_py() or 0), {
        x["values"]: x["counts"] for x in reasons
    }


def check_kept(result: StageResult, decisions: pa.Table) -> None:
    """A filter that kept nothing: one line that says why, and how to look."""
    kept, reasons = kept_count(decisions)
    if kept == 0:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        r = result.round
        raise UserError(
            f"round {r}: the filter kept none of {result.rows} rewrites ({why}); nothing was "
            f'trained. Inspect them with: mpd sql "select * from decisions where round = {r}"'
        )


def run(ctx: Context, rnd: Round) -> StageResult:
    cfg, r = ctx.cfg.filter, rnd.r
    rewritten = rnd.result("rewrite", "filter")
    sql = filter_sql(cfg)
    key, code = ctx.key(
        "filter",
        __name__,
        config={"filter": cfg, "sql": hashlib.sha256(sql.encode()).hexdigest()},
        inputs={"rewrite": rewritten.key},
    )
    result = ctx.run(
        "filter",
        rnd,
        key,
        code,
        lambda w: filter_body(
            w,
            cfg,
            rewrites=stage_files(ctx.store, "rewrite", r),
            # what the rewrites were made from (an input of the rewrite's key already)
            samples=stage_files(ctx.store, "sample", r),
            round_=r,
        ),
    )
    check_kept(result, read_stage(ctx.store, "filter", r))
    return result


STAGE = Stage(
    name="filter",
    summary="a DuckDB SQL rule keeps or drops each rewrite, with a reason",
    run=run,
    tables=(Table("decisions", "filter", "decisions.parquet", DECISIONS),),
    reads=("rewrite", "sample"),
    config="filter",
)
