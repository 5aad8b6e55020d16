"""Solve stage (method off_policy): the teacher answers the round's problems as a student would.

The same generation as ``sample`` (same problems, same sampling config), by the teacher; its
rows are the targets that off_policy trains on.
"""

from __future__ import annotations

from data.tables import SOLUTIONS
from tasks.common import StageResult
from tasks.context import Context, Round
from tasks.sample import answers_config, generate_answers
from tasks.stage import Stage


def run(ctx: Context, rnd: Round) -> StageResult:
    return generate_answers(ctx, rnd, STAGE, "teacher", ctx.cfg.models.teacher)


STAGE = Stage(
    name="solve",
    summary="the teacher answers the round's problems (off_policy's targets)",
    run=run,
    tables=(SOLUTIONS,),
    reads=("problems",),
    config=answers_config,
    engines=("teacher",),
)
