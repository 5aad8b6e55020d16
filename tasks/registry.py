"""Every stage mpd knows, in the order a round runs them: the one list to add a stage to.

Adding a stage is one module, ``tasks/<stage>.py``, that ends with ``STAGE = Stage(...)``
(:mod:`tasks.stage`), and the module imported and listed in ``STAGE_MODULES`` here. Its tables become SQL views, ``mpd status`` lists it,
``mpd rerun --from`` accepts it; a method runs it once ``flows/modes.py`` puts it in a plan.

Importing this module registers the stages' tables with the catalog (:mod:`data.tables`);
every ``flows`` module imports it (``flows/__init__.py``). No stage module imports it, so a
stage's key never covers the other stages' code.
"""

from __future__ import annotations

from types import ModuleType

from data import tables
from tasks import (
    bootstrap,
    evaluate,
    filter,
    problems,
    rewrite,
    sample,
    score,
    solve,
    train,
    truncate,
)
from tasks.stage import Stage

# The stage modules, in the order a round runs them (``per_round`` ones) and SQL lists their
# tables. Each ends with ``STAGE = Stage(...)``.
STAGE_MODULES: tuple[ModuleType, ...] = (
    bootstrap,
    problems,
    sample,
    solve,
    rewrite,
    score,
    filter,
    truncate,
    train,
    evaluate,
)

STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage (and its tables); the same name twice is an error."""
    if stage.name in STAGES and STAGES[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    tables.register(*stage.tables)
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage and its tables (a test's toy stage cleans up after itself)."""
    stage = STAGES.pop(name, None)
    for table in stage.tables if stage else ():
        tables.unregister(table.name)


def per_round_stages() -> list[str]:
    """The stages that can run in a round, in registration order."""
    return [name for name, stage in STAGES.items() if stage.per_round]


for _module in STAGE_MODULES:
    register(_module.STAGE)
