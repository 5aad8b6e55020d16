"""Score stage: the teacher's top-k logprobs for every target token."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.configbase import StrictModel


class ScoreConfig(StrictModel):
    top_k: int = Field(32, ge=1, le=1024, description="Teacher candidates kept per token.")
    context: Literal["problem", "rewrite"] = Field(
        "problem",
        description="problem: score the target under the plain problem prompt (MPD, same "
        "context as the student); rewrite: under the teacher's rewrite prompt.",
    )
    shard_size: int = Field(64, ge=1)
