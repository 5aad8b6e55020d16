"""Score stage: the teacher's top-k logprobs for every target token.

It scores the round's targets (``Round.targets``: rewrites, samples, solutions or truncations),
whichever the method trains on. Its key: the targets' key, the teacher and the score config (with
the rewrite template, and self_distill's instruction when the teacher is the frozen student).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from data.configbase import StrictModel
from data.prompts import CONCISE_CUE
from data.schemas import SCORES, encode_topk
from data.store import StageWriter
from data.tables import Table
from tasks.common import StageResult, computing, read_stage
from tasks.context import Context, Round
from tasks.engines import stage_engine
from tasks.generation import chat_prompt
from tasks.stage import Stage

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
    shard_size: int = Field(64, ge=1)


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


def score_body(
    writer: StageWriter,
    cfg: ScoreConfig,
    *,
    engine: Any,
    rewrites: list[dict],
    samples: dict[tuple[str, int], dict],
    problems: dict[str, dict],
    rewrite_template: str,
    round_: int,
    model: str,
    workers: int = 1,
    instruction: str | None = None,
) -> dict:
    """The teacher's top-k next-token distribution at every token of every target trace.

    ``rewrites`` are the method's targets (rewrites for MPD, the student's samples
    for on-policy, ...), each tied to its student sample by (problem_id, sample_idx).
    ``context=problem`` conditions on the plain problem prompt, the student's own
    context (MPD); ``context=rewrite`` on the rewrite request (problem + the
    student's trace), sharper when the teacher rewrites better than it solves.
    ``instruction`` (self-distillation) replaces both: the teacher reads the
    problem inside that "be concise" template, and rows say ``context=concise``.
    """
    tok = engine.tokenizer
    context = "concise" if instruction is not None else cfg.context

    def make_rows(i: int, part: range) -> list[dict]:
        chosen = [rewrites[j] for j in part]
        prompts = []
        for r in chosen:
            question = problems[r["problem_id"]]["prompt"]
            if instruction is not None:
                question = instruction.format(problem=question)
            elif cfg.context == "rewrite":
                trace = samples[(r["problem_id"], r["sample_idx"])]["completion"]
                question = rewrite_template.format(problem=question, trace=trace)
            prompts.append(chat_prompt(tok, question))
        with computing():
            scored = engine.score(prompts, [r["token_ids"] for r in chosen], cfg.top_k)
        rows = []
        for r, s in zip(chosen, scored, strict=True):
            ids, gaps, counts = encode_topk(s.topk_ids, s.topk_logprobs, cfg.mass)
            rows.append(
                {
                    "round": round_,
                    "problem_id": r["problem_id"],
                    "sample_idx": r["sample_idx"],
                    "k": int(s.topk_ids.shape[1]),
                    "num_tokens": int(s.topk_ids.shape[0]),
                    "topk_ids": ids.tolist(),
                    "topk_logprob_gaps": gaps.tolist(),
                    "topk_counts": None if counts is None else counts.tolist(),
                    "context": context,
                    "model": model,
                }
            )
        return rows

    from tasks.shards import run_shards  # Prefect: imported when a stage runs, not by config

    n_shards = run_shards(
        writer,
        len(rewrites),
        cfg.shard_size,
        make_rows,
        SCORES,
        stage="score",
        round_=round_,
        workers=workers,
    )
    return {"shards": n_shards, "context": context, "top_k": cfg.top_k}


def run(ctx: Context, rnd: Round) -> StageResult:
    """The teacher's top-k for every row of the round's targets (any stage holding traces).

    With a frozen self-distillation teacher (``rnd.teacher``), that copy of the student reads
    the problem inside the "be concise" template (``rnd.instruction``). The teacher's own
    solutions are scored under the plain problem, the context they were generated in.
    """
    cfg, r = ctx.cfg.score, rnd.r
    targets = rnd.result(rnd.targets, "score")
    if targets.stage == "solve":
        cfg = cfg.model_copy(update={"context": "problem"})
    name, instruction = ctx.cfg.models.teacher, rnd.instruction
    if rnd.teacher is None:
        role, teacher, label = "teacher", ctx.model(name), name
    else:
        role, teacher = "student", rnd.teacher
        label = f"self:{teacher.identity[:12]}"
    # the frozen self-distillation teacher has its own slot: it must not evict the student's
    slot = "teacher" if rnd.teacher is None else "self_teacher"
    config: dict[str, Any] = {"score": cfg, "template": ctx.cfg.rewrite.prompt}
    if instruction is not None:
        config["instruction"] = instruction
    key, code = ctx.key(
        "score",
        __name__,
        config=config,
        inputs={targets.stage: targets.key},
        models={"teacher": teacher.identity},
    )

    def body(w: Any) -> dict:
        samples = [] if targets.stage == "solve" else read_stage(ctx.store, "sample", r).to_pylist()
        return score_body(
            w,
            cfg,
            engine=stage_engine(ctx, role, teacher.path, slot=slot),
            workers=ctx.workers(role),
            rewrites=read_stage(ctx.store, targets.stage, r).to_pylist(),
            samples={(s["problem_id"], s["sample_idx"]): s for s in samples},
            problems=ctx.problems,
            rewrite_template=ctx.cfg.rewrite.prompt,
            round_=r,
            model=label,
            instruction=instruction,
        )

    return ctx.run("score", rnd, key, code, body)


STAGE = Stage(
    name="score",
    summary="the teacher's top-k logprobs for every target token (offline KL)",
    run=run,
    tables=(Table("scores", "score", "*.parquet", SCORES),),
    reads=("sample", "solve", "rewrite", "truncate"),
    config="score",
)
