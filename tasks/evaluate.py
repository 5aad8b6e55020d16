"""Evaluate stage: held-out accuracy and token counts under one fixed scorer.

Its key (declared below): the problems, the round's student and its engine, the evaluate config
and the seed (not the round: the same student evaluates once, whichever round it ends).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from data.configbase import StrictModel
from data.schemas import EVALS
from data.stage_writer import StageWriter
from data.tables import EVALS as EVALS_TABLE
from tasks.common import StageResult
from tasks.context import Context, Round
from tasks.engines import stage_engine
from tasks.generation import generate_stage, grader_of
from tasks.stage import Stage

log = logging.getLogger("mpd")


class EvaluateConfig(StrictModel):
    splits: list[Literal["test", "heldout", "dev"]] = Field(
        default_factory=lambda: ["test", "heldout"],
        description="Which splits to evaluate (dev: the development problems, problems.n_dev "
        "or problems.dev_fraction; `mpd bench --tune` evaluates only there).",
    )
    limit: int | None = Field(None, ge=1, description="At most this many problems per split.")
    n: int = Field(1, ge=1, description="Samples per problem.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default, reproducible).")
    max_tokens: int = Field(512, ge=1)
    shard_size: int = Field(64, ge=1)


def eval_problems(problems: list[dict], cfg: EvaluateConfig) -> list[dict]:
    """The fixed evaluation set: every split in ``cfg.splits``, at most ``cfg.limit`` each.

    Families are interleaved (round-robin, each in id order), so a limit keeps
    every family represented instead of the first families alphabetically.
    """
    out = []
    for split in cfg.splits:
        by_family: dict[str, list[dict]] = {}
        for p in sorted(
            (p for p in problems if p["split"] == split), key=lambda p: p["problem_id"]
        ):
            by_family.setdefault(p["family"], []).append(p)
        queues = [by_family[f] for f in sorted(by_family)]
        mixed = [
            q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)
        ]
        out += mixed[: cfg.limit] if cfg.limit else mixed
    return out


def evaluate_body(
    writer: StageWriter,
    cfg: EvaluateConfig,
    *,
    engine: Any,
    records: list[dict],
    round_: int,
    seed: int,
    model: str,
    grader: Callable[[str | None, str], bool],
    workers: int = 1,
) -> dict:
    """One fixed scorer for every round: greedy by default, same problems, same budget."""
    return generate_stage(
        writer,
        engine,
        records,
        EVALS,
        sampling={"n": cfg.n, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens},
        seed=seed,
        stage="eval",
        shard_size=cfg.shard_size,
        round_=round_,
        model=model,
        grader=grader,
        extra=lambda rec, row, s: {"split": rec["split"], "family": rec["family"]},
        workers=workers,
    )


def run(ctx: Context, rnd: Round) -> StageResult:
    """Evaluate the round's student: the one ``train`` made, or the starting one in round 0."""
    cfg, student = ctx.cfg.evaluate, rnd.student
    key = ctx.key(STAGE, rnd)
    records = eval_problems(list(ctx.problems.values()), cfg)
    return ctx.run(
        STAGE,
        rnd,
        key,
        lambda w: evaluate_body(
            w,
            cfg,
            engine=stage_engine(ctx, "student", student.path),
            records=records,
            round_=rnd.r,
            seed=ctx.cfg.seed,
            model=student.identity[:12],
            grader=grader_of(ctx.cfg),
            workers=ctx.workers("student"),
        ),
    )


STAGE = Stage(
    name="eval",
    summary="the round's student answers the fixed test and held-out problems (greedy)",
    run=run,
    tables=(EVALS_TABLE,),
    # the student it evaluates is train's (its identity is train's key): after train, if any
    reads=lambda recipe: ("problems",) if recipe.start else ("problems", "train"),
    config=("evaluate", "seed"),
    engines=("student",),
    runs="every_round",
    round0=True,
)
