"""Filter stage: a DuckDB SQL rule keeps or drops each rewrite, with a reason."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from data.configbase import StrictModel


class FilterConfig(StrictModel):
    ratio: float = Field(
        0.9, gt=0, le=10, description="Keep a rewrite whose think tokens <= ratio x the original's."
    )
    sql: Path | None = Field(
        None, description="Your own filter SQL file; None uses the built-in data/sql/filter.sql."
    )
