"""The reference the streamed stages are checked against: rewrite, score and truncate as they
were at commit 4c4a540, reading each input table whole into Python lists.

The bodies below are that commit's ``run`` bodies with their stage bodies inlined, unchanged
but for the output writer (a stage writer of another workspace, so both results can be compared)
and lint. They share with today's code only what the streaming change did not touch: the engines,
``run_shards``' range-based shard loop, chat prompts, trace rows and top-k encoding. They also
serve ``benchmarks/bench_stage_memory.py`` as the "whole table" side of its comparison.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from data.schemas import REWRITES, SCORES, TRUNCATIONS, encode_topk
from data.stage_writer import StageWriter
from tasks.common import computing, read_stage
from tasks.context import Context, Round
from tasks.generation import chat_prompt, generate_traces, grader_of, shard_seed
from tasks.rewrite import _retokenize
from tasks.shards import run_shards
from tasks.truncate import truncated_ids


def whole_table_rewrite(ctx: Context, rnd: Round, writer: StageWriter, engine: Any) -> dict:
    """4c4a540's rewrite: every sample as a dict, every prompt made before the first shard."""
    from engines.base import GenerationParams
    from train.models import TokenizerMismatchError, check_same_tokenizer, load_tokenizer

    cfg, r = ctx.cfg.rewrite, rnd.r
    samples = read_stage(ctx.store, "sample", r).to_pylist()
    problems, grader = ctx.problems, grader_of(ctx.cfg)
    student_tokenizer = load_tokenizer(rnd.student.path)
    tok = engine.tokenizer
    try:
        check_same_tokenizer(student_tokenizer, tok, names=("student", "rewriter"))
        same = True
    except TokenizerMismatchError:
        same = False
    prompts = [
        chat_prompt(
            tok,
            cfg.prompt.format(problem=problems[s["problem_id"]]["prompt"], trace=s["completion"]),
        )
        for s in samples
    ]

    def make_rows(i: int, part: range) -> list[dict]:
        params = GenerationParams(
            n=1,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=shard_seed(ctx.cfg.seed, r, i),
            stop_token_ids=(tok.eos_token_id,),
        )
        chosen = [samples[j] for j in part]
        records = [{**problems[s["problem_id"]], "sample_idx": s["sample_idx"]} for s in chosen]
        model = str(ctx.cfg.models.rewriter or ctx.cfg.models.teacher)
        rows = generate_traces(
            engine,
            [prompts[j] for j in part],
            records,
            params=params,
            round_=r,
            model=model,
            grader=grader,
        )
        for row, s in zip(rows, chosen, strict=True):
            row["sample_idx"] = s["sample_idx"]
            if not same:
                _retokenize(row, student_tokenizer)
            row.update(
                orig_think_tokens=s["think_tokens"],
                orig_total_tokens=s["total_tokens"],
                orig_correct=s["correct"],
                orig_truncated=s["truncated"],
            )
        return rows

    n = run_shards(writer, len(samples), cfg.shard_size, make_rows, REWRITES, stage="rewrite",
                   round_=r)  # fmt: skip
    return {"shards": n}


def whole_table_score(
    ctx: Context, rnd: Round, writer: StageWriter, engine: Any, *, model: str
) -> dict:
    """4c4a540's score: the targets and the samples (keyed by id) as dicts."""
    cfg, r = ctx.cfg.score, rnd.r
    targets = rnd.result(rnd.targets, "score")
    if targets.stage == "solve":
        cfg = cfg.model_copy(update={"context": "problem"})
    instruction = rnd.instruction
    samples_list = (
        [] if targets.stage == "solve" else read_stage(ctx.store, "sample", r).to_pylist()
    )
    rewrites = read_stage(ctx.store, targets.stage, r).to_pylist()
    samples = {(s["problem_id"], s["sample_idx"]): s for s in samples_list}
    problems, template = ctx.problems, ctx.cfg.rewrite.prompt
    tok = engine.tokenizer
    context = "concise" if instruction is not None else cfg.context

    def make_rows(i: int, part: range) -> list[dict]:
        chosen = [rewrites[j] for j in part]
        prompts = []
        for t in chosen:
            question = problems[t["problem_id"]]["prompt"]
            if instruction is not None:
                question = instruction.format(problem=question)
            elif cfg.context == "rewrite":
                trace = samples[(t["problem_id"], t["sample_idx"])]["completion"]
                question = template.format(problem=question, trace=trace)
            prompts.append(chat_prompt(tok, question))
        with computing():
            scored = engine.score(prompts, [t["token_ids"] for t in chosen], cfg.top_k)
        rows = []
        for t, s in zip(chosen, scored, strict=True):
            ids, gaps, counts = encode_topk(s.topk_ids, s.topk_logprobs, cfg.mass)
            rows.append(
                {
                    "round": r,
                    "problem_id": t["problem_id"],
                    "sample_idx": t["sample_idx"],
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

    n = run_shards(writer, len(rewrites), cfg.shard_size, make_rows, SCORES, stage="score",
                   round_=r)  # fmt: skip
    return {"shards": n}


def whole_table_truncate(ctx: Context, rnd: Round, writer: StageWriter) -> dict:
    """4c4a540's truncate: samples, rewrites and the kept pairs whole; one file."""
    from data.traces import think_close_id, trace_row
    from train.models import load_tokenizer

    r = rnd.r
    samples = read_stage(ctx.store, "sample", r).to_pylist()
    rewrites = read_stage(ctx.store, "rewrite", r).to_pylist()
    decisions = read_stage(ctx.store, "filter", r)
    decisions = decisions.filter(decisions.column("kept"))
    kept = set(
        zip(
            decisions.column("problem_id").to_pylist(),
            decisions.column("sample_idx").to_pylist(),
            strict=True,
        )
    )
    tokenizer, problems = load_tokenizer(rnd.student.path), ctx.problems
    grader = grader_of(ctx.cfg)
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
    writer.write_table("truncations.parquet", pa.Table.from_pylist(rows, TRUNCATIONS), TRUNCATIONS)
    return {"targets": len(rows), "target_tokens": sum(r["total_tokens"] for r in rows)}
