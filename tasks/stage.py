"""A stage's declaration: everything the rest of mpd needs to know about it, in one object.

Each ``tasks/<stage>.py`` ends with ``STAGE = Stage(...)``, and ``tasks/registry.py`` lists
them. From the declarations come the CLI's stage choices (``mpd rerun --from``), ``mpd status``'s
rows, the SQL views (:mod:`data.tables`) and the order of a round's stages; the methods
(``flows/modes.py``) say which of them a round runs, and the campaign calls each one's ``run``.

``run(ctx, rnd)`` is the stage's wiring: it builds the stage key from the config section, the
stages it reads (their keys) and the models it uses (their identities), then runs the body on
the store (cached by that key). The key's code part is the declaring module and everything of
this package it imports (``Context.key``), so the wiring, the body and what they call are all in
it, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from data.tables import Table
from tasks.common import StageResult
from tasks.context import Context, Round


@dataclass(frozen=True)
class Stage:
    """One stage of the round DAG.

    ``reads``: the stages whose committed output the body reads (edges of the DAG; a round plan
    must run them first). ``config``: the ``RunConfig`` section that configures it (None: none).
    ``per_round``: False for a stage that runs once per campaign (``problems``), before round 0.
    """

    name: str
    summary: str
    run: Callable[[Context, Round], StageResult] | None
    tables: tuple[Table, ...] = ()
    reads: tuple[str, ...] = ()
    config: str | None = None
    per_round: bool = True
