"""Rewrite stage: the teacher rewrites each student trace concisely (MPD).

Its key (declared below): the round's samples (their key), the rewriter and its engine, the
rewrite config and the seed. The student's tokenizer it re-tokenizes with is the samples'
student's, in the samples' key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from data.configbase import StrictModel
from data.prompts import DEFAULT_REWRITE_PROMPT
from data.schemas import REWRITES
from data.stage_writer import StageWriter
from data.tables import REWRITES as REWRITES_TABLE
from data.traces import split_counts, think_close_id
from engines.base import GenerationParams
from tasks.common import StageResult
from tasks.context import Context, Round
from tasks.engines import stage_engine
from tasks.generation import chat_prompt, generate_traces, grader_of, shard_seed
from tasks.stage import Stage
from tasks.stream import Rows

log = logging.getLogger("mpd")


class RewriteConfig(StrictModel):
    prompt: str = Field(
        DEFAULT_REWRITE_PROMPT,
        description="Template with {problem} and {trace}; the built-in teacher ignores the "
        "instruction wording and reads only the problem and trace.",
    )
    temperature: float = Field(0.0, ge=0, description="0 = greedy rewrite.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    shard_size: int = Field(64, ge=1)

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        for name in ("{problem}", "{trace}"):
            if name not in value:
                raise ValueError(f"the rewrite prompt must contain {name}")
        return value


# What rewriting reads of a sample: the trace and the counts its rewrite row carries along.
SAMPLE_COLUMNS = [
    "problem_id",
    "sample_idx",
    "completion",
    "think_tokens",
    "total_tokens",
    "correct",
    "truncated",
]


def rewrite_body(
    writer: StageWriter,
    cfg: RewriteConfig,
    *,
    engine: Any,
    samples: Rows,
    problems: dict[str, dict],
    round_: int,
    seed: int,
    model: str,
    workers: int = 1,
    grader: Callable[[str | None, str], bool],
    student_tokenizer: Any,
) -> dict:
    """The rewriter turns each student trace into a concise one (MPD's target).

    ``samples`` (:data:`SAMPLE_COLUMNS` of the round's samples) are read a shard at a time.
    When the rewriter tokenizes differently from the student (an instruction
    model behind an API), its text is tokenized once here with the student's
    tokenizer and those ids are stored: the teacher scores and the student
    trains on exactly these ids, never a re-tokenization.
    """
    # deferred: pulls in torch (mpd --help imports every stage module, via tasks.registry)
    from train.models import TokenizerMismatchError, check_same_tokenizer

    tok = engine.tokenizer
    try:
        check_same_tokenizer(student_tokenizer, tok, names=("student", "rewriter"))
        same = True
    except TokenizerMismatchError:
        same = False

    def load(i: int, part: range) -> list[dict]:
        return samples.take(np.arange(part.start, part.stop)).to_pylist()

    def make_rows(i: int, chosen: list[dict]) -> list[dict]:
        params = GenerationParams(
            n=1,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=shard_seed(seed, round_, i),
            stop_token_ids=(tok.eos_token_id,),
        )
        asks = [
            cfg.prompt.format(problem=problems[s["problem_id"]]["prompt"], trace=s["completion"])
            for s in chosen
        ]
        records = [{**problems[s["problem_id"]], "sample_idx": s["sample_idx"]} for s in chosen]
        prompts = [chat_prompt(tok, ask) for ask in asks]
        rows = generate_traces(
            engine, prompts, records, params=params, round_=round_, model=model, grader=grader
        )
        for row, s in zip(rows, chosen, strict=True):
            row["sample_idx"] = s["sample_idx"]
            if not same:
                _retokenize(row, student_tokenizer)
            row.update(_orig_columns(s))
        return rows

    # deferred: pulls in Prefect: imported when a stage runs, not by mpd --help or config
    from tasks.shards import run_shards

    n_shards = run_shards(
        writer,
        len(samples),
        cfg.shard_size,
        make_rows,
        REWRITES,
        stage="rewrite",
        round_=round_,
        workers=workers,
        load=load,
    )
    return {"shards": n_shards, "same_tokenizer": same, "rewriter": model}


def _orig_columns(sample: dict) -> dict:
    """What a target row carries of the sample it was made from (the ``orig_*`` columns)."""
    return {
        "orig_think_tokens": sample["think_tokens"],
        "orig_total_tokens": sample["total_tokens"],
        "orig_correct": sample["correct"],
        "orig_truncated": sample["truncated"],
    }


def _retokenize(row: dict, tokenizer: Any) -> None:
    ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if row["finish_reason"] == "stop":
        ids.append(tokenizer.eos_token_id)
    close = think_close_id(tokenizer)
    row["token_ids"] = ids
    row["think_tokens"], row["answer_tokens"], row["total_tokens"] = split_counts(ids, close)


def run(ctx: Context, rnd: Round) -> StageResult:
    cfg, name = ctx.cfg.rewrite, ctx.cfg.models.rewriter
    rewriter, r, student = ctx.role_model("rewriter", rnd), rnd.r, rnd.student
    key = ctx.key(STAGE, rnd)
    # deferred: pulls in torch (mpd --help imports every stage module, via tasks.registry)
    from train.models import load_tokenizer

    return ctx.run(
        STAGE,
        rnd,
        key,
        lambda w: rewrite_body(
            w,
            cfg,
            engine=stage_engine(ctx, "rewriter", rewriter.path),
            workers=ctx.workers("rewriter"),
            samples=Rows.of(ctx.store, "sample", r, SAMPLE_COLUMNS),
            problems=ctx.problems,
            round_=r,
            seed=ctx.cfg.seed,
            model=str(name or ctx.cfg.models.teacher),
            grader=grader_of(ctx.cfg),
            student_tokenizer=load_tokenizer(student.path),
        ),
    )


STAGE = Stage(
    name="rewrite",
    summary="the teacher rewrites each sample concisely, keeping the student's path",
    run=run,
    tables=(REWRITES_TABLE,),
    reads=("sample",),
    config=("rewrite", "seed"),
    engines=("rewriter",),
)
