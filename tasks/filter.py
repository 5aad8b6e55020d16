"""Filter stage: a DuckDB SQL rule keeps or drops each rewrite, with a reason.

Its key (declared below): the round's rewrites and samples (their keys), the filter config and
the SQL file's content. A filter that
keeps nothing ends the round with one line: training on nothing is no round.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from data.configbase import NOT_IN_KEY, StrictModel
from data.errors import UserError
from data.sandbox import QueryTimeoutError, arrow_view, open_sandbox, parquet_view, run_query_on
from data.schemas import DECISIONS, REWRITES, SAMPLES, SchemaError, conform
from data.sql_guard import SqlError, check_read_only, one_line
from data.stage_writer import StageWriter
from data.tables import DECISIONS as DECISIONS_TABLE
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
        None,
        description="Your own filter SQL file; None uses the built-in data/sql/filter.sql. The "
        "stage key holds the file's content, not its path: edit it in place and the filter "
        "recomputes; move it and nothing does.",
        json_schema_extra=NOT_IN_KEY,
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Stop the filter query after this many seconds (one line, exit 2): a "
        "runaway query (an unbounded recursive CTE, a cross join) must not hold a nightly run. "
        "Not part of the stage key: it does not change the rows.",
        json_schema_extra=NOT_IN_KEY,
    )


DEFAULT_SQL = Path(__file__).resolve().parents[1] / "data" / "sql" / "filter.sql"
# A query that takes longer than this on *empty* tables will not finish on real ones either.
DRY_RUN_TIMEOUT_S = 10.0


class FilterError(UserError):
    """The filter SQL failed, or produced rows that do not fit the decisions table."""


def sql_path(cfg: FilterConfig) -> Path:
    """The filter's SQL file: the user's, or the built-in one."""
    return Path(cfg.sql).expanduser() if cfg.sql is not None else DEFAULT_SQL


def filter_sql(cfg: FilterConfig) -> str:
    """The filter's SQL text: the user's file (read as UTF-8) or the built-in one."""
    path = sql_path(cfg)
    if not path.is_file():
        raise FilterError(f"filter.sql: file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FilterError(f"filter.sql: cannot read {path}: {exc}") from None


def check_filter_sql(cfg: FilterConfig) -> None:
    """The filter file, checked before anything runs (``mpd run``'s preflight, well under a
    second): one SELECT that the guard accepts, that binds against the round's tables and
    returns the decisions columns. It runs on empty tables, in the sandbox, with a time limit,
    so a typo in a column name or a missing column ends the run before Prefect starts."""
    run_filter(
        REWRITES.empty_table(),
        filter_sql(cfg),
        ratio=cfg.ratio,
        round_=1,
        samples=SAMPLES.empty_table(),
        faithful=cfg.faithful,
        timeout_s=min(cfg.timeout_s, DRY_RUN_TIMEOUT_S),
    )


def run_filter(
    rewrites: pa.Table | list[Path],
    sql: str,
    *,
    ratio: float,
    round_: int,
    samples: pa.Table | list[Path] | None = None,
    faithful: bool = False,
    timeout_s: float | None = None,
    scratch: Path | None = None,
) -> pa.Table:
    """Run the filter SQL over one round's rewrites (and the samples they rewrite) and return
    its rows, checked: the decisions schema, and one row per candidate of the round.

    The SQL is hostile input (a deployment's overrides can name any file): it must be one
    SELECT (:func:`data.sql_guard.check_read_only`), and it runs in DuckDB's sandbox
    (:mod:`data.sandbox`), which can read the round's rewrite and sample files and nothing
    else; its result comes back as Arrow and mpd writes it. Nothing of the user's text is ever
    pasted into a statement of mpd's, and the knobs are bound variables.

    ``rewrites`` and ``samples`` are the committed Parquet files (what the stage passes: DuckDB
    reads them itself, only the columns the rule needs) or Arrow tables (tests, the dry run).
    """
    try:
        query = check_read_only(sql, who="filter.sql")
    except SqlError as exc:
        raise FilterError(str(exc)) from None
    sources = {
        "rewrites": (rewrites, REWRITES),
        "samples": (samples if samples is not None else [], SAMPLES),
    }

    def setup(con: duckdb.DuckDBPyConnection) -> None:
        for name, (source, schema) in sources.items():
            if isinstance(source, pa.Table):
                arrow_view(con, name, source)
            elif source:
                parquet_view(con, name, source)
            else:  # no committed file: a typed empty table
                arrow_view(con, name, schema.empty_table())
        con.execute("SET VARIABLE ratio = ?", [float(ratio)])
        con.execute("SET VARIABLE faithful = ?", [bool(faithful)])
        con.execute("SET VARIABLE round = ?", [int(round_)])

    readable = [p for s, _ in sources.values() if isinstance(s, list) for p in s]
    try:
        con = open_sandbox(readable, setup=setup, scratch=scratch)
    except duckdb.Error as exc:
        raise FilterError(f"filter inputs cannot be read: {one_line(exc)}") from None
    try:
        table = run_query_on(con, query, timeout_s=timeout_s, timeout_hint="raise filter.timeout_s")
        candidates = con.sql("SELECT problem_id, sample_idx FROM rewrites").to_arrow_table()
    except QueryTimeoutError as exc:
        raise FilterError(f"filter.sql: {exc}") from None
    except SqlError as exc:
        raise FilterError(f"filter SQL failed: {exc}") from None
    finally:
        con.close()
        # A FilterError's traceback keeps this frame alive (Prefect holds the failed
        # state until exit): without the del, nanobind reports the connection leaked.
        del con
    try:
        decisions = conform(table, DECISIONS, name="filter output")
    except SchemaError as exc:
        raise FilterError(str(exc)) from None
    check_decisions(decisions, candidates, round_)
    return decisions


def check_decisions(decisions: pa.Table, candidates: pa.Table, round_: int) -> None:
    """One row per candidate of the round, and only those: else one line naming the first
    offending key (sorted), as :class:`FilterError`. The rule is ``data/sql/decisions_check.sql``.

    Why: a filter that returns a candidate twice silently doubles its weight in training; one
    that makes up a key surfaces much later as "no example fits"; one that forgets a candidate
    loses its reason. None of that may be committed.
    """
    con = duckdb.connect(":memory:")  # mpd's own query over two Arrow tables: no file at all
    try:
        con.register("decisions", decisions)
        con.register("candidates", candidates)
        found = con.execute(CHECK_SQL, {"round": round_}).fetchone()
    finally:
        con.close()
    assert found is not None
    other, repeated, first_repeated, unknown, first_unknown, missing, first_missing, n = found
    if other is not None:
        raise FilterError(
            f"filter.sql returned rows of round {other}; every row must have round = "
            f"{round_} (the round being filtered: getvariable('round'))"
        )
    if repeated:
        raise FilterError(
            f"filter.sql returned {first_repeated['n']} rows for candidate "
            f"{_name(first_repeated)} ({repeated} candidate(s) repeated): one row per candidate"
        )
    if unknown:
        raise FilterError(
            f"filter.sql returned a row for {_name(first_unknown)}, which is not a rewrite of "
            f"round {round_} ({unknown} such key(s))"
        )
    if missing:
        raise FilterError(
            f"filter.sql returned no row for candidate {_name(first_missing)} of round "
            f"{round_} ({missing} of {n} missing): every candidate needs a row, kept or dropped "
            "with a reason"
        )


CHECK_SQL = (DEFAULT_SQL.parent / "decisions_check.sql").read_text()


def _name(key: dict[str, Any]) -> str:
    return f"(problem_id={key['problem_id']!r}, sample_idx={key['sample_idx']})"


def filter_body(
    writer: StageWriter,
    cfg: FilterConfig,
    *,
    rewrites: pa.Table | list[Path],
    samples: pa.Table | list[Path] | None,
    round_: int,
) -> dict:
    # DuckDB may spill inside staging (the workspace's disk, removed before the commit).
    with tempfile.TemporaryDirectory(prefix=".duckdb-", dir=writer.path(".")) as scratch:
        decisions = run_filter(
            rewrites,
            filter_sql(cfg),
            ratio=cfg.ratio,
            round_=round_,
            samples=samples,
            faithful=cfg.faithful,
            timeout_s=cfg.timeout_s,
            scratch=Path(scratch),
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
    result = ctx.run(
        STAGE,
        rnd,
        ctx.key(STAGE, rnd),
        lambda w: filter_body(
            w,
            cfg,
            rewrites=stage_files(ctx.store, "rewrite", r),
            # what the rewrites were made from
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
    tables=(DECISIONS_TABLE,),
    reads=("rewrite", "sample"),
    config=("filter",),
    files=lambda cfg: {"filter.sql": sql_path(cfg.filter)},
)
