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

Its key: the round's samples, rewrites and filter decisions (their keys).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from data.schemas import TRUNCATIONS
from data.store import StageWriter
from data.tables import Table
from tasks.common import StageResult, read_stage
from tasks.context import Context, Round
from tasks.generation import grader_of
from tasks.stage import Stage


def truncated_ids(sample_ids: list[int], rewrite_ids: list[int], close_id: int) -> list[int]:
    """The sample's reasoning cut to the rewrite's think length, then the rewrite's answer.

    Without ``</think>`` in the rewrite (a user filter may keep one), the whole
    rewrite counts as thinking and the cut sample has no answer either.
    """
    from data.traces import split_counts

    r_think, _, _ = split_counts(rewrite_ids, close_id)
    s_think, _, _ = split_counts(sample_ids, close_id)
    reasoning = sample_ids[: s_think - 1] if close_id in sample_ids else sample_ids
    if close_id not in rewrite_ids:
        return list(reasoning[:r_think])
    return [*reasoning[: r_think - 1], close_id, *rewrite_ids[r_think:]]


def truncate_rows(
    samples: list[dict],
    rewrites: list[dict],
    kept: set[tuple[str, int]],
    *,
    tokenizer: Any,
    problems: dict[str, dict],
    grader: Callable[[str | None, str], bool],
) -> list[dict]:
    """One truncation target per kept rewrite (in the rewrites' order)."""
    from data.traces import think_close_id, trace_row

    close = think_close_id(tokenizer)
    by_sample = {(s["problem_id"], s["sample_idx"]): s for s in samples}
    rows = []
    for rw in rewrites:
        where = (rw["problem_id"], rw["sample_idx"])
        if where not in kept:
            continue
        s = by_sample[where]
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


def truncate_body(writer: StageWriter, rows: list[dict]) -> dict:
    """Write the round's truncation targets as one file (cheap: no model runs here)."""
    writer.write_table("truncations.parquet", pa.Table.from_pylist(rows, TRUNCATIONS), TRUNCATIONS)
    return {"targets": len(rows), "target_tokens": sum(r["total_tokens"] for r in rows)}


def kept_pairs(decisions: pa.Table) -> set[tuple[str, int]]:
    """(problem_id, sample_idx) of the kept rewrites."""
    kept = decisions.filter(decisions.column("kept"))
    return set(
        zip(
            kept.column("problem_id").to_pylist(),
            kept.column("sample_idx").to_pylist(),
            strict=True,
        )
    )


def run(ctx: Context, rnd: Round) -> StageResult:
    r, student = rnd.r, rnd.student
    inputs = {s: rnd.result(s, "truncate").key for s in ("sample", "rewrite", "filter")}
    key, code = ctx.key("truncate", __name__, config={}, inputs=inputs)

    def body(w: Any) -> dict:
        from train.models import load_tokenizer

        rows = truncate_rows(
            read_stage(ctx.store, "sample", r).to_pylist(),
            read_stage(ctx.store, "rewrite", r).to_pylist(),
            kept_pairs(read_stage(ctx.store, "filter", r)),
            tokenizer=load_tokenizer(student.path),
            problems=ctx.problems,
            grader=grader_of(ctx.cfg),
        )
        return truncate_body(w, rows)

    return ctx.run("truncate", rnd, key, code, body)


STAGE = Stage(
    name="truncate",
    summary="each kept rewrite's sample, cut to the rewrite's length (truncation's targets)",
    run=run,
    tables=(Table("truncations", "truncate", "*.parquet", TRUNCATIONS),),
    reads=("sample", "rewrite", "filter"),
)
