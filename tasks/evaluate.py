"""Evaluate stage: held-out accuracy and token counts under one fixed scorer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.configbase import StrictModel


class EvaluateConfig(StrictModel):
    splits: list[Literal["test", "heldout"]] = Field(
        default_factory=lambda: ["test", "heldout"], description="Which splits to evaluate."
    )
    limit: int | None = Field(None, ge=1, description="At most this many problems per split.")
    n: int = Field(1, ge=1, description="Samples per problem.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default, reproducible).")
    max_tokens: int = Field(512, ge=1)
    shard_size: int = Field(64, ge=1)
