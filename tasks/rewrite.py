"""Rewrite stage: the teacher rewrites each student trace concisely (MPD)."""

from __future__ import annotations

from pydantic import Field, field_validator

from data.configbase import StrictModel
from data.prompts import DEFAULT_REWRITE_PROMPT


class RewriteConfig(StrictModel):
    prompt: str = Field(
        DEFAULT_REWRITE_PROMPT,
        description="Template with {problem} and {trace}; the built-in teacher ignores the "
        "instruction wording and reads only the problem and trace.",
    )
    temperature: float = Field(0.0, ge=0, description="0 = greedy rewrite.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(384, ge=1)
    shard_size: int = Field(64, ge=1)

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        for name in ("{problem}", "{trace}"):
            if name not in value:
                raise ValueError(f"the rewrite prompt must contain {name}")
        return value
