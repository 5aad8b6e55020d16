"""A toy stage, written as a user adding a stage would: one module, registered in one line.

``lengths``: for every sample of the round, its think tokens and the words of its completion.
It reads the ``sample`` stage and writes table ``lengths``; it runs ``beside`` the plan, in every
method whose round samples. tests/test_new_stage.py registers it and checks that the plan picks
it up, and that ``mpd status``, ``mpd sql`` and ``mpd rerun`` see it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data.tables import Table
from tasks.common import StageResult, read_stage
from tasks.context import Context, Round
from tasks.stage import Stage

LENGTHS = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("think_tokens", pa.int32(), nullable=False),
        pa.field("words", pa.int32(), nullable=False),
    ]
)


def run(ctx: Context, rnd: Round) -> StageResult:
    key = ctx.key(STAGE, rnd)  # from the declaration below: the samples' key, this code

    def body(writer: Any) -> dict:
        samples = read_stage(ctx.store, "sample", rnd.r)
        words = pc.list_value_length(pc.utf8_split_whitespace(samples.column("completion")))
        out = samples.select(["round", "problem_id", "sample_idx", "think_tokens"]).append_column(
            "words", words
        )
        writer.write_table("lengths.parquet", out, LENGTHS)
        return {"rows": out.num_rows}

    return ctx.run(STAGE, rnd, key, body)


STAGE = Stage(
    name="lengths",
    summary="think tokens and words of every sample (a toy stage)",
    run=run,
    tables=(Table("lengths", "lengths", "lengths.parquet", LENGTHS),),
    reads=("sample",),
    runs="beside",  # whenever a round samples: no method has to name it
)
