"""Score stage: the teacher's top-k logprobs for every target token."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from data.configbase import StrictModel
from data.schemas import LOGPROB_MIN, LOGPROB_SCALE, SCORES
from data.store import StageWriter
from tasks.common import chat_prompt, shards

log = logging.getLogger("mpd")


class ScoreConfig(StrictModel):
    top_k: int = Field(32, ge=1, le=1024, description="Teacher candidates kept per token.")
    context: Literal["problem", "rewrite"] = Field(
        "problem",
        description="problem: score the target under the plain problem prompt (MPD, same "
        "context as the student); rewrite: under the teacher's rewrite prompt.",
    )
    shard_size: int = Field(64, ge=1)


def quantize(logprobs: np.ndarray) -> np.ndarray:
    """Logprobs -> int16 in units of LOGPROB_SCALE nats, clipped at LOGPROB_MIN."""
    clipped = np.clip(logprobs, LOGPROB_MIN, 0.0)
    return np.round(clipped / LOGPROB_SCALE).astype(np.int16)


def dequantize(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.float32(LOGPROB_SCALE)


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
) -> dict:
    """The teacher's top-k next-token distribution at every token of every rewrite.

    ``context=problem`` conditions on the plain problem prompt, the student's own
    context (MPD); ``context=rewrite`` on the rewrite request (problem + the
    student's trace), sharper when the teacher rewrites better than it solves.
    """
    tok = engine.tokenizer
    parts = shards(len(rewrites), cfg.shard_size)
    stored = 0
    for i, part in enumerate(parts):
        if i in writer.resumed:
            continue
        chosen = [rewrites[j] for j in part]
        prompts = []
        for r in chosen:
            question = problems[r["problem_id"]]["prompt"]
            if cfg.context == "rewrite":
                trace = samples[(r["problem_id"], r["sample_idx"])]["completion"]
                question = rewrite_template.format(problem=question, trace=trace)
            prompts.append(chat_prompt(tok, question))
        scored = engine.score(prompts, [r["token_ids"] for r in chosen], cfg.top_k)
        rows = [
            {
                "round": round_,
                "problem_id": r["problem_id"],
                "sample_idx": r["sample_idx"],
                "k": int(s.topk_ids.shape[1]),
                "num_tokens": int(s.topk_ids.shape[0]),
                "topk_ids": s.topk_ids.reshape(-1).tolist(),
                "topk_logprobs_q": quantize(s.topk_logprobs).reshape(-1).tolist(),
                "context": cfg.context,
                "model": model,
            }
            for r, s in zip(chosen, scored, strict=True)
        ]
        writer.write_shard(i, pa.Table.from_pylist(rows), SCORES)
        stored += sum(r["num_tokens"] for r in rows)
        log.info("round %d score    shard %d/%d", round_, i + 1, len(parts))
    return {"shards": len(parts), "context": cfg.context, "top_k": cfg.top_k}
