"""Turning one generated completion into one trace row (samples, rewrites, evals).

Token counts come from the generated ids, not from re-encoding the text:
``</think>`` is a single token, so the think part is everything up to and
including its last occurrence, and the counts are exactly what the model spent.

    >>> row = trace_row(round_=1, problem_id="arith-train-000001", sample_idx=0,
    ...     text="<think>\\n2 + 3 = 5\\n</think>\\n\\nAnswer: 5", token_ids=[3, 9, 4, 7, 2],
    ...     finish_reason="stop", prompt_tokens=20, gold="5", think_close_id=4, model="m")
    >>> (row["think_tokens"], row["answer_tokens"], row["correct"])
    (3, 2, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from data.answers import answers_match, extract_answer

Grader = Callable[[str | None, str], bool]


def think_close_id(tokenizer: Any) -> int | None:
    """The id of ``</think>`` in ``tokenizer``; None for a model that has no such token (its
    whole completion is reasoning and answer, untagged)."""
    tid = tokenizer.convert_tokens_to_ids("</think>")
    return None if tid is None or tid == getattr(tokenizer, "unk_token_id", None) else tid


def split_counts(token_ids: Sequence[int], think_close_id: int | None) -> tuple[int, int, int]:
    """(think, answer, total) tokens; without ``</think>`` everything is thinking."""
    total = len(token_ids)
    for i in range(total - 1, -1, -1):
        if token_ids[i] == think_close_id:
            return i + 1, total - i - 1, total
    return total, 0, total


def trace_row(
    *,
    round_: int,
    problem_id: str,
    sample_idx: int,
    text: str,
    token_ids: Sequence[int],
    finish_reason: str,
    prompt_tokens: int,
    gold: str,
    think_close_id: int | None,
    model: str,
    grader: Grader = answers_match,
) -> dict[str, Any]:
    think, answer, total = split_counts(token_ids, think_close_id)
    pred = extract_answer(text, tagged=think_close_id is not None)
    return {
        "round": round_,
        "problem_id": problem_id,
        "sample_idx": sample_idx,
        "completion": text,
        "token_ids": list(token_ids),
        "prompt_tokens": prompt_tokens,
        "think_tokens": think,
        "answer_tokens": answer,
        "total_tokens": total,
        "finish_reason": finish_reason,
        "truncated": finish_reason == "length",
        "correct": bool(pred is not None and grader(pred, gold)),
        "pred_answer": pred,
        "model": model,
    }


def trace_rows(
    records: Sequence[dict],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[Any]],
    *,
    round_: int,
    think_close_id: int | None,
    model: str,
    grader: Grader = answers_match,
    extra: Callable[[dict, dict, int], dict] | None = None,
) -> list[dict[str, Any]]:
    """One graded row per completion of every record (``outputs[i]``: the completions of
    ``prompts[i]``, each with ``text``, ``token_ids``, ``finish_reason``, ``sample_idx``, as an
    engine returns them). ``extra(record, row, sample_idx)`` adds columns.

    Every generating stage and the world's own evaluation turn completions into rows here.
    """
    rows = []
    for rec, pids, outs in zip(records, prompts, outputs, strict=True):
        for c in outs:
            row = trace_row(
                round_=round_,
                problem_id=rec["problem_id"],
                sample_idx=c.sample_idx,
                text=c.text,
                token_ids=c.token_ids,
                finish_reason=c.finish_reason,
                prompt_tokens=len(pids),
                gold=rec["answer"],
                think_close_id=think_close_id,
                model=model,
                grader=grader,
            )
            rows.append({**row, **(extra(rec, row, c.sample_idx) if extra else {})})
    return rows
