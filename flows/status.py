"""``mpd status``: the state of every (round, stage) of a workspace, from disk alone.

States: ``done`` (committed, files intact), ``corrupt`` (committed but a file is
missing or altered: the next run redoes it), ``partial`` (staging holds finished
shards of an interrupted run: the next run with the same key reuses them),
``missing`` (planned by the config, never started).

Which stages a round has is the method's plan (``flows.modes.round_stages``); the rows are
ordered as the stages are registered (``tasks/registry.py``), so a new stage shows up here
without a change to this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data.objstore import ObjectStore
from data.store import StageStore
from tasks.registry import STAGES

# done: computed by the last run; cached: reused by it; failed: the last run failed there


@dataclass
class StageState:
    round: int
    stage: str
    state: str
    rows: int | None = None
    duration_s: float | None = None
    key: str = ""
    detail: str = ""


def last_run(workspace: Path) -> dict[str, dict]:
    path = Path(workspace) / ".mpd" / "last_run.json"
    try:
        return json.loads(path.read_text()).get("stages", {})
    except (OSError, ValueError):
        return {}


def planned(rounds: int, stages: list[str]) -> list[tuple[int, str]]:
    """(round, stage) pairs a campaign of ``rounds`` rounds of ``stages`` produces."""
    out = [(0, "problems"), (0, "eval")]
    for r in range(1, rounds + 1):
        out += [(r, s) for s in stages]
    return out


def downstream(round_: int, stage: str, rounds: int, stages: list[str]) -> list[tuple[int, str]]:
    """``stage`` of ``round_`` and every stage after it (of the method's ``stages``)."""
    order = stages if round_ > 0 else ["eval"]
    if stage not in order:
        from flows.errors import UserError

        raise UserError(f"round {round_} has no {stage} stage (it has: {', '.join(order)})")
    out = [(round_, s) for s in order[order.index(stage) :]]
    return out + [(r, s) for r in range(round_ + 1, max(rounds, round_) + 1) for s in stages]


def collect(
    workspace: Path | ObjectStore,
    rounds: int | None,
    stages: list[str],
    *,
    deep: bool = False,
) -> list[StageState]:
    """Every (round, stage)'s state; ``deep`` re-hashes the committed files (sha256), or on
    object storage compares every object's ETag with the one recorded when it was published.

    An object-storage workspace is read where it is (no local copy needed); the last run's
    outcomes (``cached``, ``failed``) are known only to the machine that ran it.
    """
    store = workspace if isinstance(workspace, ObjectStore) else StageStore(workspace)
    states: dict[tuple[int, str], StageState] = {}
    for man in store.committed():
        problems = store.validate(man.stage, man.round, deep=deep, man=man)
        states[(man.round, man.stage)] = StageState(
            man.round,
            man.stage,
            "corrupt" if problems else "done",
            man.rows,
            man.duration_s,
            man.key[:12],
            problems[0] if problems else "",
        )
    for stage, round_, key16, shards, rows in store.partial_runs():
        if (round_, stage) in states and states[(round_, stage)].key.startswith(key16[:12]):
            continue
        states[(round_, stage)] = StageState(
            round_, stage, "partial", rows, None, key16[:12], f"{shards} shard(s)"
        )
    for round_, stage in planned(rounds or 0, stages):
        states.setdefault((round_, stage), StageState(round_, stage, "missing"))
    runs = {} if isinstance(workspace, ObjectStore) else last_run(workspace)
    for where, outcome in runs.items():
        round_, stage = int(where.split("/")[0]), where.split("/")[1]
        st = states.setdefault((round_, stage), StageState(round_, stage, "missing"))
        if outcome.get("state") == "failed":  # what is committed there is an older key's
            st.state, st.detail = "failed", outcome.get("error", "")
        elif outcome.get("state") == "cached" and st.state == "done":
            st.state = "cached"
    order = {s: i for i, s in enumerate(dict.fromkeys(["problems", *stages, *STAGES]))}
    return sorted(states.values(), key=lambda s: (s.round, order.get(s.stage, 99), s.stage))


def print_status(
    workspace: Path | ObjectStore,
    rounds: int | None,
    stages: list[str],
    *,
    deep: bool = False,
) -> list[StageState]:
    states = collect(workspace, rounds, stages, deep=deep)
    name = workspace.url if isinstance(workspace, ObjectStore) else workspace
    table = Table(title=f"workspace {name}")
    for col in ("round", "stage", "state", "rows", "duration", "key", "detail"):
        table.add_column(col, justify="right" if col in ("round", "rows", "duration") else "left")
    colors = {
        "done": "green",
        "cached": "cyan",
        "corrupt": "red",
        "failed": "red",
        "partial": "yellow",
        "missing": "dim",
    }
    for s in states:
        table.add_row(
            str(s.round),
            s.stage,
            f"[{colors.get(s.state, 'white')}]{s.state}[/]",
            "" if s.rows is None else str(s.rows),
            "" if s.duration_s is None else f"{s.duration_s:.1f}s",
            s.key,
            s.detail,
        )
    Console().print(table)
    return states
