"""Generating traces for a stage: prompts, per-shard seeds, grading, the shard loop.

The sample, solve and evaluate stages differ only in their problems, sampling parameters and
extra columns; the rewrite stage shares the prompt and grading. This is the part they share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from data.answers import answers_match, format_prompt
from data.errors import UserError
from data.gym import gym_grader
from data.stage_writer import StageWriter
from data.traces import think_close_id, trace_rows
from engines.base import GenerationParams
from tasks.common import computing


def grader_of(cfg: Any) -> Callable[[str | None, str], bool]:
    """The run's grader (``cfg``: the run config): a problem file's scorer (math-verify or exact),
    a reasoning-gym family's own scorer, else the built-in world's answer match."""
    problems = cfg.problems
    file = problems.file
    if problems.source == "file" and file is not None:
        # deferred: pulls in sympy, for the math grader only (mpd --help imports every stage)
        from data.mathscore import grade

        return lambda pred, gold: grade(pred, gold, file.scorer)
    if problems.source == "reasoning_gym" and problems.reasoning_gym is not None:
        return gym_grader(problems.reasoning_gym, problems.seed_for(cfg.seed))

    return answers_match


def shard_seed(seed: int, round_: int, shard: int) -> int:
    """A per-shard seed: a resumed shard regenerates exactly what the killed one would have."""
    import hashlib

    return int(hashlib.sha256(f"{seed}-{round_}-{shard}".encode()).hexdigest()[:8], 16)


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    """The student's context for ``question``: the tokenizer's own chat template.

    Real checkpoints (Qwen3) and the built-in tokenizer both carry a template;
    a tokenizer without one falls back to the contract in ``data.answers``.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = format_prompt(question)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompts(tokenizer: Any, questions: list[str]) -> list[list[int]]:
    """:func:`chat_prompt` of many questions in one batched call of the template and of the
    tokenizer (the same ids; one call a question was ~18% of a large round's training join)."""
    if not questions:
        return []
    if getattr(tokenizer, "chat_template", None):
        texts = tokenizer.apply_chat_template(
            [[{"role": "user", "content": q}] for q in questions],
            add_generation_prompt=True,
            tokenize=False,
        )
    else:
        texts = [format_prompt(q) for q in questions]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def generate_traces(
    engine: Any,
    prompts: list[list[int]],
    records: list[dict],
    *,
    params: Any,
    round_: int,
    model: str,
    grader: Callable[[str | None, str], bool],
    extra: Callable[[dict, dict, int], dict] | None = None,
) -> list[dict]:
    """Generate and grade; one trace row per (record, sample). ``extra`` adds columns."""
    with computing():
        completions = engine.generate(prompts, params)
    return trace_rows(
        records,
        prompts,
        completions,
        round_=round_,
        think_close_id=think_close_id(engine.tokenizer),
        model=model,
        grader=grader,
        extra=extra,
    )


def context_limit(engine: Any) -> int | None:
    """The longest sequence the engine's model takes, where the engine can tell (None: unknown)."""
    limit = getattr(engine, "max_context", None)
    config = getattr(getattr(engine, "model", None), "config", None)
    return limit or getattr(config, "max_position_embeddings", None)


def check_context(engine: Any, records: list[dict], prompts: list[list[int]]) -> None:
    """Refuse problems whose prompt alone fills the model's context, before generating any.

    A user's problem file can hold a prompt longer than the model reads; the model would then
    generate from a truncated or out-of-range context. One line names how many and the first.
    """
    limit = context_limit(engine)
    if not limit:
        return
    long = [
        (r["problem_id"], len(p)) for r, p in zip(records, prompts, strict=True) if len(p) >= limit
    ]
    if long:
        pid, n = long[0]
        raise UserError(
            f"{len(long)} problem prompt(s) do not fit the model's context of {limit} tokens "
            f"(first: {pid}, {n} tokens); shorten them or leave them out of the problem file"
        )


def generate_stage(
    writer: StageWriter,
    engine: Any,
    records: list[dict],
    schema: pa.Schema,
    *,
    sampling: dict[str, Any],
    seed: int,
    stage: str,
    shard_size: int,
    round_: int,
    model: str,
    grader: Callable[[str | None, str], bool],
    extra: Callable[[dict, dict, int], dict] | None = None,
    workers: int = 1,
) -> dict[str, int]:
    """Answer ``records``' problems (chat prompts) shard by shard, graded, into ``writer``.

    ``sampling``: n, temperature, top_p, max_tokens; each shard gets its own seed
    (:func:`shard_seed`), so a resumed shard regenerates exactly what the killed one would have.
    The sample, solve and evaluate stages differ only in their problems, sampling and extra
    columns; the resumable, Prefect-visible shard loop is this one. Returns the manifest extra.
    """
    # deferred: pulls in Prefect: imported when a stage runs, not by mpd --help or config
    from tasks.shards import run_shards

    tok = engine.tokenizer
    prompts = [chat_prompt(tok, r["prompt"]) for r in records]
    check_context(engine, records, prompts)

    def make_rows(i: int, part: range) -> list[dict]:
        params = GenerationParams(
            **sampling, seed=shard_seed(seed, round_, i), stop_token_ids=(tok.eos_token_id,)
        )
        return generate_traces(
            engine,
            [prompts[j] for j in part],
            [records[j] for j in part],
            params=params,
            round_=round_,
            model=model,
            grader=grader,
            extra=extra,
        )

    shards = run_shards(
        writer,
        len(records),
        shard_size,
        make_rows,
        schema,
        stage=stage,
        round_=round_,
        workers=workers,
    )
    return {"shards": shards, "problems": len(records)}
