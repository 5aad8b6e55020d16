"""The base of every config model: unknown keys, non-finite numbers and integers past 64 bits
are errors, not silently kept.

A misspelt key (``train.lrr``) that pydantic quietly dropped would run a whole night with the
default learning rate; forbidding extras turns it into a one-line error at start-up instead.
``train.lr=inf`` is the same kind of mistake: pydantic takes ``inf`` (and ``"Infinity"``) for
a float unless told not to, and the run then trains to NaN hours later. No config field means
"unlimited" by infinity, so ``allow_inf_nan=False`` holds for every float field of every
model. An integer past 64 bits (``seed: 1.0e+30`` is one: pydantic turns a whole float into an
int) cannot be stored in a Parquet column or seed torch; it is refused here, once for all
models, rather than by a bound on each field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StrictModel(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    @field_validator("*", mode="after")
    @classmethod
    def _ints_fit_64_bits(cls, value: Any) -> Any:
        if not fits_64_bits(value):
            raise ValueError("integer out of range: it must fit in 64 bits")
        return value


def fits_64_bits(value: Any) -> bool:
    """Whether every integer in ``value`` (searched through lists, tuples and dicts) fits an
    int64; models nested in ``value`` were checked by their own validator."""
    if isinstance(value, int) and not isinstance(value, bool):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, list | tuple):
        return all(fits_64_bits(v) for v in value)
    if isinstance(value, dict):
        return all(fits_64_bits(k) and fits_64_bits(v) for k, v in value.items())
    return True


# A field that does not shape any stage's output (a time limit, a resume granularity, a worker
# count) says so where it is declared, ``Field(..., json_schema_extra=NOT_IN_KEY)``, and stays
# out of every stage key (``key_view``): changing it recomputes nothing.
NOT_IN_KEY: dict[str, Any] = {"in_key": False}


def in_key(model: type[BaseModel], name: str) -> bool:
    """Whether field ``name`` of ``model`` shapes output (it is not marked ``NOT_IN_KEY``)."""
    extra = model.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("in_key") is False)


def key_view(value: Any) -> Any:
    """``value`` as JSON data for a stage key: a config model without its ``NOT_IN_KEY``
    fields (nested models too), anything else as pydantic dumps it."""
    if isinstance(value, BaseModel):
        cls = type(value)
        return {
            name: key_view(getattr(value, name)) for name in cls.model_fields if in_key(cls, name)
        }
    if isinstance(value, dict):
        return {str(k): key_view(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [key_view(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
