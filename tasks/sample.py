"""Sample stage: the current student answers training problems."""

from __future__ import annotations

from pydantic import Field

from data.configbase import StrictModel


class SampleConfig(StrictModel):
    problems_per_round: int = Field(256, ge=1, description="Training problems drawn each round.")
    n: int = Field(1, ge=1, description="Samples per problem.")
    temperature: float = Field(1.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="Completion budget; longer traces truncate.")
    shard_size: int = Field(64, ge=1, description="Prompts per resumable shard.")
