"""Every stage mpd knows, and the plans made of them: the one list to add a stage to.

Adding a stage is one module, ``tasks/<stage>.py``, that ends with ``STAGE = Stage(...)``
(:mod:`tasks.stage`), and one line: the module imported and listed in ``STAGE_MODULES`` here
(or ``register(module.STAGE)``). Its tables become SQL views, ``mpd status`` lists it,
``mpd rerun --from`` accepts it, and every method whose round has what it reads runs it
(:func:`round_plan`), with a key derived from its declaration.

No stage module imports this one, so a stage's key never covers the other stages' code.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from data import tables
from tasks import (
    bootstrap,
    evaluate,
    filter,
    problems,
    rewrite,
    sample,
    score,
    self_select,
    solve,
    train,
    truncate,
)
from tasks.context import Recipe
from tasks.stage import Stage

# The stage modules. Their order breaks ties in a plan (score before filter: both read the
# rewrites, and a filter knob must not re-score) and orders the campaign-level stages.
STAGE_MODULES: tuple[ModuleType, ...] = (
    bootstrap,
    problems,
    sample,
    solve,
    rewrite,
    score,
    filter,
    truncate,
    self_select,
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


def campaign_stages(cfg: Any | None = None) -> list[str]:
    """The stages that run once per campaign, before round 0 (those ``cfg`` needs, if given)."""
    return [
        name
        for name, s in STAGES.items()
        if not s.per_round and (cfg is None or s.when is None or s.when(cfg))
    ]


def round_plan(recipe: Recipe) -> list[str]:
    """The stages a round of ``recipe`` runs, in the order it runs them, from the declarations.

    The ``every_round`` stages (``round0`` ones in round 0), and what they read, transitively;
    then every ``beside`` stage whose reads are all planned. A stage runs after everything it
    reads: stages are ordered by depth (1 + the deepest stage they read), ``beside`` ones first
    at a depth, then by registration.
    """
    order = list(STAGES)
    wanted = [
        n
        for n, s in STAGES.items()
        if s.per_round and s.runs == "every_round" and (s.round0 or not recipe.start)
    ]
    planned: set[str] = set()

    def need(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"stages read each other in a cycle: {' -> '.join((*path, name))}")
        stage = STAGES[name]
        if not stage.per_round or name in planned:
            return
        for read in stage.reads_for(recipe):
            need(read, (*path, name))
        planned.add(name)

    for name in wanted:
        need(name, ())
    beside = [n for n, s in STAGES.items() if s.per_round and s.runs == "beside"]
    while joining := [
        n
        for n in beside
        if n not in planned
        and (STAGES[n].round0 or not recipe.start)
        and all(r in planned or not STAGES[r].per_round for r in STAGES[n].reads_for(recipe))
    ]:
        planned.update(joining)
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            reads = [r for r in STAGES[name].reads_for(recipe) if r in planned]
            depth[name] = 1 + max((level(r) for r in reads), default=0)
        return depth[name]

    # a stage beside the plan runs as soon as what it reads is there
    return sorted(planned, key=lambda n: (level(n), STAGES[n].runs != "beside", order.index(n)))


for _module in STAGE_MODULES:
    register(_module.STAGE)
