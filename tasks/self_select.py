"""Self-select stage (method ``self_train``): the student's own shortest correct sample per problem.

Self-training with rejection sampling is the standard way to shorten reasoning without a
teacher: sample n traces per problem, keep the shortest one that is right, fine-tune on it with
cross-entropy. As a baseline it isolates what MPD's teacher adds: both methods start from the
same student samples and keep only correct targets; here the target is the student's own best
trace, there the teacher's rewrite of it.

The rule is SQL (``data/sql/self_train.sql``, mpd's own query over the round's committed sample
files): one row per problem that has a correct, untruncated sample, the one with the fewest
think tokens. A record (table ``selected``, the columns of ``samples``)::

    {"round": 1, "problem_id": "arith-train-000017", "sample_idx": 2, "think_tokens": 41,
     "correct": True, "truncated": False, "completion": "<think>\\n347 + 258 = 605\\n...", ...}

Its key (declared below): the round's samples (their key) and the rule's code.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from data.errors import UserError
from data.schemas import SAMPLES
from data.store import StageWriter
from data.tables import SAMPLES as SAMPLES_TABLE
from data.tables import Table
from tasks.common import StageResult, stage_files
from tasks.context import Context, Round
from tasks.stage import Stage

RULE = Path(__file__).resolve().parents[1] / "data" / "sql" / "self_train.sql"
SELECTED = Table("selected", "self_select", "*.parquet", SAMPLES_TABLE.schema)


def select_shortest(samples: pa.Table | list[Path]) -> pa.Table:
    """The rule over one round's samples (an Arrow table, or the committed Parquet files):
    per problem, the correct untruncated sample with the fewest think tokens."""
    con = duckdb.connect(":memory:")  # mpd's own query over the stage's own inputs
    try:
        if isinstance(samples, pa.Table):
            con.register("samples", samples)
        elif samples:
            rel = con.read_parquet([str(p) for p in samples], hive_partitioning=False)
            rel.create_view("samples")
        else:
            con.register("samples", SAMPLES.empty_table())
        return con.sql(RULE.read_text()).to_arrow_table()
    finally:
        con.close()


def select_body(writer: StageWriter, *, samples: list[Path], round_: int) -> dict:
    selected = select_shortest(samples)
    writer.write_table("selected.parquet", selected, SAMPLES)
    return {"selected": selected.num_rows}


def check_selected(result: StageResult, candidates: int) -> None:
    """A round where no sample is correct trains on nothing: one line that says so."""
    if result.rows == 0:
        r = result.round
        raise UserError(
            f"round {r}: none of the student's {candidates} samples is correct and untruncated; "
            f'self_train has nothing to train on. Look with: mpd sql "select correct, '
            f'truncated, count(*) from samples where round = {r} group by all"'
        )


def run(ctx: Context, rnd: Round) -> StageResult:
    r = rnd.r
    samples = rnd.result("sample", STAGE.name)
    result = ctx.run(
        STAGE,
        rnd,
        ctx.key(STAGE, rnd),
        lambda w: select_body(w, samples=stage_files(ctx.store, "sample", r), round_=r),
    )
    check_selected(result, samples.rows)
    return result


STAGE = Stage(
    name="self_select",
    summary="the student's own shortest correct sample per problem (self_train's targets)",
    run=run,
    tables=(SELECTED,),
    reads=("sample",),
    files=lambda cfg: {"self_train.sql": RULE},
)
