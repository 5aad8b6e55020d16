"""The base of every config model: unknown keys are errors, not silently ignored.

A misspelt key (``train.lrr``) that pydantic quietly dropped would run a whole
night with the default learning rate; forbidding extras turns it into a
one-line error at start-up instead.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
