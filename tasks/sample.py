"""Sample stage: the current student answers the round's training problems.

Its key (declared below): the problems, the student and its engine, the sample config, the
seed and the round (each round draws anew).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import Field

from data.configbase import StrictModel
from data.schemas import SAMPLES
from data.stage_writer import StageWriter
from data.tables import SAMPLES as SAMPLES_TABLE
from tasks.common import StageResult
from tasks.context import Context, Round
from tasks.engines import stage_engine
from tasks.generation import generate_stage, grader_of
from tasks.stage import Stage

log = logging.getLogger("mpd")


class SampleConfig(StrictModel):
    problems_per_round: int = Field(256, ge=1, description="Training problems drawn each round.")
    n: int = Field(1, ge=1, description="Samples per problem.")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="Completion budget; longer traces truncate.")
    shard_size: int = Field(
        64,
        ge=1,
        description="Prompts per resumable shard. Each shard draws with its own seed, so it "
        "shapes the samples (it is in the stage key).",
    )


def round_problems(problems: list[dict], n: int, seed: int, round_: int) -> list[dict]:
    """The training problems of one round: a seeded draw, different every round."""
    import random

    train = sorted((p for p in problems if p["split"] == "train"), key=lambda p: p["problem_id"])
    return random.Random(f"{seed}-round-{round_}").sample(train, min(n, len(train)))


def sample_body(
    writer: StageWriter,
    cfg: SampleConfig,
    *,
    engine: Any,
    records: list[dict],
    round_: int,
    seed: int,
    model: str,
    grader: Callable[[str | None, str], bool],
    workers: int = 1,
    stage: str = "sample",
) -> dict:
    """Sample ``cfg.n`` traces per problem, one resumable shard per ``cfg.shard_size`` prompts."""
    sampling = {"n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p}
    return generate_stage(
        writer,
        engine,
        records,
        SAMPLES,
        sampling={**sampling, "max_tokens": cfg.max_tokens},
        seed=seed,
        stage=stage,
        shard_size=cfg.shard_size,
        round_=round_,
        model=model,
        grader=grader,
        workers=workers,
    )


def generate_answers(ctx: Context, rnd: Round, stage: Stage, role: str, label: str) -> StageResult:
    """``cfg.sample`` traces of round r's problems by the model of ``role``: the student's
    ``sample`` stage, and off_policy's ``solve`` (the teacher answering as a student would)."""
    cfg, r = ctx.cfg.sample, rnd.r
    key, model = ctx.key(stage, rnd), ctx.role_model(role, rnd)
    records = round_problems(list(ctx.problems.values()), cfg.problems_per_round, ctx.cfg.seed, r)
    return ctx.run(
        stage,
        rnd,
        key,
        lambda w: sample_body(
            w,
            cfg,
            engine=stage_engine(ctx, role, model.path),
            records=records,
            round_=r,
            seed=ctx.cfg.seed,
            model=label,
            grader=grader_of(ctx.cfg),
            workers=ctx.workers(role),
            stage=stage.name,
        ),
    )


def run(ctx: Context, rnd: Round) -> StageResult:
    return generate_answers(ctx, rnd, STAGE, "student", rnd.student.identity[:12])


def answers_config(cfg: Any, rnd: Round) -> dict[str, Any]:
    """What sample and solve read of the config: each round draws anew."""
    return {"sample": cfg.sample, "seed": cfg.seed, "round": rnd.r}


STAGE = Stage(
    name="sample",
    summary="the student answers the round's training problems",
    run=run,
    tables=(SAMPLES_TABLE,),
    reads=("problems",),
    config=answers_config,
    engines=("student",),
)
