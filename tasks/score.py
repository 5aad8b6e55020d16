"""Score stage: the teacher's top-k logprobs for every target token.

It scores the round's targets (``Round.targets``: rewrites, samples, solutions or truncations),
whichever the method trains on. Its key (declared below): the targets' key, the teacher and its
engine, and the score config (with the rewrite template when it scores in the rewrite's
context, and self_distill's instruction when the teacher is the frozen student).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from data.configbase import StrictModel
from data.prompts import CONCISE_CUE
from data.schemas import SCORES, encode_topk
from data.stage_writer import StageWriter
from data.tables import SCORES as SCORES_TABLE
from tasks.common import StageResult, computing
from tasks.context import Context, Recipe, Round
from tasks.engines import stage_engine
from tasks.generation import chat_prompt
from tasks.stage import Stage
from tasks.stream import Rows, aligned

log = logging.getLogger("mpd")


class ScoreConfig(StrictModel):
    top_k: int = Field(32, ge=1, le=1024, description="Teacher candidates kept per token.")
    context: Literal["problem", "rewrite"] = Field(
        "problem",
        description="problem: score the target under the plain problem prompt (MPD, same "
        "context as the student); rewrite: under the teacher's rewrite prompt.",
    )
    mass: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Keep, per token, only the leading candidates whose probability reaches "
        "this (the rest join the loss's tail bucket; table column topk_counts). 1.0 keeps all "
        "top_k. 0.999 on a real vocabulary: about a fifth fewer bytes, the loss moved no more "
        "than int16 quantisation moves it (docs/floors.md).",
    )
    shard_size: int = Field(
        64,
        ge=1,
        description="Targets per resumable shard. In the stage key: scoring draws nothing at "
        "random, but a shard is what an engine batches, and another batch changes the padding "
        "and the kernels (hf on CPU: logprobs moved by up to 6e-6 between shards of 7 and 64).",
    )


class SelfDistillConfig(StrictModel):
    """Method self_distill (OPSDC): the teacher is a frozen copy of the student told to be concise."""

    instruction: str = Field(
        CONCISE_CUE,
        description="The teacher's context: a template with {problem}. The student itself "
        "reads the plain problem; only the frozen teacher copy reads this. The default is the "
        "cue the built-in student was trained to answer concisely under (data/prompts.py).",
    )
    refresh_every: int = Field(
        1,
        ge=1,
        description="Rounds between teacher refreshes: round r's teacher is the student that "
        "started round 1 + M*floor((r-1)/M). OPSDC refreshes every ~50 steps; every step "
        "collapses.",
    )

    @field_validator("instruction")
    @classmethod
    def _placeholder(cls, value: str) -> str:
        if "{problem}" not in value:
            raise ValueError("the self-distillation instruction must contain {problem}")
        return value


# What scoring reads: of each target, its ids and tokens; of its sample, the trace (context
# ``rewrite`` only: the teacher then reads the rewrite request made from it).
TARGET_COLUMNS = ["problem_id", "sample_idx", "token_ids"]
SAMPLE_COLUMNS = ["completion"]


def score_body(
    writer: StageWriter,
    cfg: ScoreConfig,
    *,
    engine: Any,
    targets: Rows,
    samples: Rows | None,
    problems: dict[str, dict],
    rewrite_template: str,
    round_: int,
    model: str,
    workers: int = 1,
    instruction: str | None = None,
) -> dict:
    """The teacher's top-k next-token distribution at every token of every target trace.

    ``targets`` are the method's targets (rewrites for MPD, the student's samples
    for on-policy, ...), each tied to its student sample by (problem_id, sample_idx);
    both are read a shard at a time (:mod:`tasks.stream`), ``samples`` only when the
    context needs the student's trace.
    ``context=problem`` conditions on the plain problem prompt, the student's own
    context (MPD); ``context=rewrite`` on the rewrite request (problem + the
    student's trace), sharper when the teacher rewrites better than it solves.
    ``instruction`` (self-distillation) replaces both: the teacher reads the
    problem inside that "be concise" template, and rows say ``context=concise``.
    """
    tok = engine.tokenizer
    context = "concise" if instruction is not None else cfg.context
    where, of_sample = np.arange(len(targets)), None
    if context == "rewrite":
        if samples is None:
            raise RuntimeError("score context rewrite reads the samples' traces: none given")
        where, of_sample = aligned(targets, samples)

    def load(i: int, part: range) -> list[dict]:
        chosen = targets.take(where[part.start : part.stop]).to_pylist()
        if samples is not None and of_sample is not None:
            found = samples.take(of_sample[part.start : part.stop]).column("completion")
            for r, trace in zip(chosen, found.to_pylist(), strict=True):
                r["trace"] = trace
        return chosen

    def make_rows(i: int, chosen: list[dict]) -> list[dict]:
        prompts = []
        for r in chosen:
            question = problems[r["problem_id"]]["prompt"]
            if instruction is not None:
                question = instruction.format(problem=question)
            elif cfg.context == "rewrite":
                question = rewrite_template.format(problem=question, trace=r["trace"])
            prompts.append(chat_prompt(tok, question))
        with computing():
            scored = engine.score(prompts, [r["token_ids"] for r in chosen], cfg.top_k)
        return [
            _score_row(r, s, cfg.mass, round_, context, model)
            for r, s in zip(chosen, scored, strict=True)
        ]

    # deferred: pulls in Prefect: imported when a stage runs, not by mpd --help or config
    from tasks.shards import run_shards

    n_shards = run_shards(
        writer,
        len(where),
        cfg.shard_size,
        make_rows,
        SCORES,
        stage="score",
        round_=round_,
        workers=workers,
        load=load,
    )
    return {"shards": n_shards, "context": context, "top_k": cfg.top_k}


def _score_row(
    target: dict, scored: Any, mass: float, round_: int, context: str, model: str
) -> dict:
    """One row of ``scores``: a target's top-k, encoded for storage (``data.schemas``)."""
    ids, gaps, counts = encode_topk(scored.topk_ids, scored.topk_logprobs, mass)
    return {
        "round": round_,
        "problem_id": target["problem_id"],
        "sample_idx": target["sample_idx"],
        "k": int(scored.topk_ids.shape[1]),
        "num_tokens": int(scored.topk_ids.shape[0]),
        "topk_ids": ids.tolist(),
        "topk_logprob_gaps": gaps.tolist(),
        "topk_counts": None if counts is None else counts.tolist(),
        "context": context,
        "model": model,
    }


def run(ctx: Context, rnd: Round) -> StageResult:
    """The teacher's top-k for every row of the round's targets (any stage holding traces).

    With a frozen self-distillation teacher (``rnd.teacher``), that copy of the student reads
    the problem inside the "be concise" template (``rnd.instruction``). The teacher's own
    solutions are scored under the plain problem, the context they were generated in.
    """
    cfg, r = score_config(ctx.cfg, rnd.recipe), rnd.r
    targets = rnd.result(rnd.targets, "score")
    name, instruction = ctx.cfg.models.teacher, rnd.instruction
    teacher, role = ctx.role_model("teacher", rnd), ctx.engine_role("teacher", rnd)
    label = name if rnd.teacher is None else f"self:{teacher.identity[:12]}"
    # the frozen self-distillation teacher has its own slot: it must not evict the student's
    slot = "teacher" if rnd.teacher is None else "self_teacher"
    key = ctx.key(STAGE, rnd)

    def body(w: Any) -> dict:
        samples = (
            None if targets.stage == "solve" else Rows.of(ctx.store, "sample", r, SAMPLE_COLUMNS)
        )
        return score_body(
            w,
            cfg,
            engine=stage_engine(ctx, role, teacher.path, slot=slot),
            workers=ctx.workers(role),
            targets=Rows.of(ctx.store, targets.stage, r, TARGET_COLUMNS),
            samples=samples,
            problems=ctx.problems,
            rewrite_template=ctx.cfg.rewrite.prompt,
            round_=r,
            model=label,
            instruction=instruction,
        )

    return ctx.run(STAGE, rnd, key, body)


def score_config(cfg: Any, recipe: Recipe) -> ScoreConfig:
    """The score config as it runs: the teacher's own solutions are scored under the plain
    problem, the context they were generated in."""
    if recipe.targets == "solve":
        return cfg.score.model_copy(update={"context": "problem"})
    return cfg.score


def score_reads(recipe: Recipe) -> tuple[str, ...]:
    """The method's targets, and the samples they were made from (a rewrite's original trace)."""
    if recipe.targets in ("sample", "solve"):
        return (recipe.targets,)
    return (recipe.targets, "sample")


def reads_config(cfg: Any, rnd: Round) -> dict[str, Any]:
    """What scoring reads of the config: the rewrite prompt only in the rewrite's context, the
    "be concise" instruction only for self_distill's frozen teacher."""
    score = score_config(cfg, rnd.recipe)
    config: dict[str, Any] = {"score": score}
    if score.context == "rewrite" and not rnd.recipe.self_teacher:
        config["rewrite.prompt"] = cfg.rewrite.prompt
    if rnd.recipe.self_teacher:
        config["self_distill.instruction"] = cfg.self_distill.instruction
    return config


STAGE = Stage(
    name="score",
    summary="the teacher's top-k logprobs for every target token (offline KL)",
    run=run,
    tables=(SCORES_TABLE,),
    reads=score_reads,
    config=reads_config,
    engines=("teacher",),
)
