"""Truncate stage (method ``truncation``): the student's raw trace cut to the compressed length.

The compress-then-SFT study's ablation asks whether a compressed trace teaches more than
the raw trace merely cut to the same length. For every rewrite the filter kept, the target
here is built from token ids (never re-tokenized text)::

    sample reasoning[: n]  +  </think>  +  the kept rewrite's answer tokens (EOS included)
    n = the rewrite's think tokens − 1 (its own </think>)

so it has the kept rewrite's length and its answer, and the two methods' targets differ
only in the reasoning: compressed there, cut here. A cut trace with no answer would teach
nothing about answering (the study cuts the reasoning and keeps the answer); the rewrite's
answer rather than the sample's is used because a sample cut off by max_tokens has none.

A record (table ``truncations``, the columns of ``rewrites``; ``orig_*`` = the sample)::

    {"round": 1, "problem_id": "arith-train-000017", "sample_idx": 0,
     "completion": "<think>\\nWe need 347 + 258. Let me\\n</think>\\n\\nAnswer: 605",
     "think_tokens": 14, "answer_tokens": 5, "total_tokens": 19, "correct": True,
     "orig_think_tokens": 120, ...}

Its key (declared below): the round's samples, rewrites and filter decisions (their keys).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.schemas import TRUNCATIONS
from data.stage_writer import StageWriter
from data.tables import TRUNCATIONS as TRUNCATIONS_TABLE
from data.traces import split_counts, think_close_id, trace_row
from tasks.common import StageResult, stage_files
from tasks.context import Context, Round
from tasks.generation import grader_of
from tasks.stage import Stage
from tasks.stream import Rows, aligned

# Kept rewrites per shard. No model runs here: a shard is cheap, and this bounds the stage's
# memory. Not in the key: the rows are the same whatever the shards.
SHARD_ROWS = 512
# What a truncation target is made of: the kept rewrite's ids and answer, its sample's ids and
# the sample's counts it carries along as orig_*.
REWRITE_COLUMNS = ["round", "problem_id", "sample_idx", "token_ids"]
SAMPLE_COLUMNS = [
    "token_ids",
    "prompt_tokens",
    "model",
    "think_tokens",
    "total_tokens",
    "correct",
    "truncated",
]


def truncated_ids(sample_ids: list[int], rewrite_ids: list[int], close_id: int) -> list[int]:
    """The sample's reasoning cut to the rewrite's think length, then the rewrite's answer.

    Without ``</think>`` in the rewrite (a user filter may keep one), the whole
    rewrite counts as thinking and the cut sample has no answer either.
    """
    r_think, _, _ = split_counts(rewrite_ids, close_id)
    s_think, _, _ = split_counts(sample_ids, close_id)
    reasoning = sample_ids[: s_think - 1] if close_id in sample_ids else sample_ids
    if close_id not in rewrite_ids:
        return list(reasoning[:r_think])
    return [*reasoning[: r_think - 1], close_id, *rewrite_ids[r_think:]]


def truncate_rows(
    rewrites: list[dict],
    samples: list[dict],
    *,
    tokenizer: Any,
    problems: dict[str, dict],
    grader: Callable[[str | None, str], bool],
) -> list[dict]:
    """One truncation target per kept rewrite; ``samples[i]`` is ``rewrites[i]``'s sample."""
    close = think_close_id(tokenizer)
    rows = []
    for rw, s in zip(rewrites, samples, strict=True):
        ids = truncated_ids(list(s["token_ids"]), list(rw["token_ids"]), close)
        ends = bool(ids) and ids[-1] == tokenizer.eos_token_id
        row = trace_row(
            round_=rw["round"],
            problem_id=rw["problem_id"],
            sample_idx=rw["sample_idx"],
            text=tokenizer.decode(ids[:-1] if ends else ids, skip_special_tokens=False),
            token_ids=ids,
            finish_reason="stop" if ends else "length",
            prompt_tokens=s["prompt_tokens"],
            gold=problems[rw["problem_id"]]["answer"],
            think_close_id=close,
            model=s["model"],
            grader=grader,
        )
        rows.append(
            {
                **row,
                "orig_think_tokens": s["think_tokens"],
                "orig_total_tokens": s["total_tokens"],
                "orig_correct": s["correct"],
                "orig_truncated": s["truncated"],
            }
        )
    return rows


def truncate_body(
    writer: StageWriter,
    *,
    rewrites: Rows,
    samples: Rows,
    decisions: list[Path],
    round_: int,
    tokenizer: Any,
    problems: dict[str, dict],
    grader: Callable[[str | None, str], bool],
    shard_rows: int = SHARD_ROWS,
) -> dict:
    """The round's truncation targets, in the rewrites' order, one resumable shard per
    ``shard_rows`` kept rewrites (each shard's rewrites and samples read when it runs)."""
    # deferred: pulls in Prefect: imported when a stage runs, not by mpd --help or config
    from tasks.shards import run_shards

    where, of_sample = aligned(rewrites, samples, kept=decisions)

    def load(i: int, part: range) -> tuple[list[dict], list[dict]]:
        cut = slice(part.start, part.stop)
        return rewrites.take(where[cut]).to_pylist(), samples.take(of_sample[cut]).to_pylist()

    def make_rows(i: int, pair: tuple[list[dict], list[dict]]) -> list[dict]:
        return truncate_rows(*pair, tokenizer=tokenizer, problems=problems, grader=grader)

    n_shards = run_shards(
        writer, len(where), shard_rows, make_rows, TRUNCATIONS, stage="truncate", round_=round_,
        load=load,
    )  # fmt: skip
    tokens = _staged_total(writer, n_shards, "total_tokens")
    return {"shards": n_shards, "targets": len(where), "target_tokens": tokens}


def _staged_total(writer: StageWriter, n_shards: int, column: str) -> int:
    """A column's sum over the stage's shards in staging, resumed ones included, read one
    shard and one column at a time."""
    total = 0
    for i in range(n_shards):
        values = pq.read_table(writer.dir / writer.shard_name(i), columns=[column]).column(0)
        total += pc.sum(values).as_py() or 0
    return total


def run(ctx: Context, rnd: Round) -> StageResult:
    r, student = rnd.r, rnd.student

    def body(w: Any) -> dict:
        # deferred: pulls in torch (mpd --help imports every stage module, via tasks.registry)
        from train.models import load_tokenizer

        return truncate_body(
            w,
            rewrites=Rows.of(ctx.store, "rewrite", r, REWRITE_COLUMNS),
            samples=Rows.of(ctx.store, "sample", r, SAMPLE_COLUMNS),
            decisions=stage_files(ctx.store, "filter", r),
            round_=r,
            tokenizer=load_tokenizer(student.path),
            problems=ctx.problems,
            grader=grader_of(ctx.cfg),
            shard_rows=SHARD_ROWS,
        )

    return ctx.run(STAGE, rnd, ctx.key(STAGE, rnd), body)


STAGE = Stage(
    name="truncate",
    summary="each kept rewrite's sample, cut to the rewrite's length (truncation's targets)",
    run=run,
    tables=(TRUNCATIONS_TABLE,),
    reads=("sample", "rewrite", "filter"),
)
