"""Problems stage: the problem set of a campaign (built-in world or the user's file)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from data.configbase import StrictModel
from data.sources import ProblemSourceConfig


class ProblemsConfig(StrictModel):
    source: Literal["builtin", "file"] = Field(
        "builtin", description="builtin: the procedural reference world; file: your problems."
    )
    n_train: int = Field(2000, ge=1, description="builtin: training problems.")
    n_test: int = Field(200, ge=1, description="builtin: test problems (training families).")
    n_heldout: int = Field(100, ge=0, description="builtin: problems of the held-out family.")
    difficulty: int = Field(3, ge=1, le=5, description="builtin: 1 (short) to 5 (long chains).")
    file: ProblemSourceConfig | None = Field(
        None, description="source=file: where your problems are and which columns to read."
    )

    @model_validator(mode="after")
    def _file_given(self) -> ProblemsConfig:
        if self.source == "file" and self.file is None:
            raise ValueError("source: file needs a problems.file section (path, columns)")
        return self
