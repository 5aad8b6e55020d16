"""``mpd status``: the state of every (round, stage) of a workspace, from disk alone.

``mpd status --keys`` shows instead each (round, stage)'s key under the current config and
what went into it (config, inputs, files, models, engines, code, library versions of each
interpreter that computes it), and whether the workspace holds a run of that key.

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

from data.errors import UserError
from data.objstore import ObjectStore
from data.store import StageStore
from tasks.context import Recipe
from tasks.registry import STAGES, campaign_stages, round_plan
from tasks.stagekey import StageKey

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
    """(round, stage) pairs a campaign of ``rounds`` rounds of ``stages`` produces: the
    campaign-level stages every campaign runs, round 0's plan, then ``stages`` each round."""
    out = [(0, s) for s in campaign_stages() if STAGES[s].when is None]
    out += [(0, s) for s in round_plan(Recipe(start=True))]
    for r in range(1, rounds + 1):
        out += [(r, s) for s in stages]
    return out


def downstream(round_: int, stage: str, rounds: int, stages: list[str]) -> list[tuple[int, str]]:
    """``stage`` of ``round_`` and every stage after it (of the method's ``stages``)."""
    order = stages if round_ > 0 else round_plan(Recipe(start=True))
    if stage not in order:
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
    runs = {} if isinstance(workspace, ObjectStore) else last_run(workspace)
    for where, outcome in runs.items():
        round_, stage = int(where.split("/")[0]), where.split("/")[1]
        st = states.setdefault((round_, stage), StageState(round_, stage, "missing"))
        if outcome.get("state") == "failed":  # what is committed there is an older key's
            st.state, st.detail = "failed", outcome.get("error", "")
        elif outcome.get("state") == "cached" and st.state == "done":
            st.state = "cached"
    # Planned rows up to the round after the last one the workspace has anything of (the next
    # run's): what this costs follows the rounds computed, not the rounds configured
    # (`rounds: 1000000` used to build six million rows); the rest is one line in print_status.
    for round_, stage in planned(min(rounds or 0, last_round_of(states) + 1), stages):
        states.setdefault((round_, stage), StageState(round_, stage, "missing"))
    order = {s: i for i, s in enumerate(dict.fromkeys([*campaign_stages(), *stages, *STAGES]))}
    return sorted(states.values(), key=lambda s: (s.round, order.get(s.stage, 99), s.stage))


def last_round_of(states: dict[tuple[int, str], StageState] | list[StageState]) -> int:
    """The highest round with any state (round 0 when there is none)."""
    rounds = [k[0] for k in states] if isinstance(states, dict) else [s.round for s in states]
    return max(rounds, default=0)


def last_computed_round(workspace: Path | ObjectStore) -> int | None:
    """The highest round holding a committed or partial stage run (on object storage too, for
    a local working copy); None when nothing was ever computed."""
    store = workspace if isinstance(workspace, ObjectStore) else StageStore(workspace)
    stores: list[StageStore | ObjectStore] = [store]
    if isinstance(store, StageStore) and store.remote is not None:
        stores.append(store.remote)
    rounds = [m.round for s in stores for m in s.committed()]
    rounds += [run[1] for s in stores for run in s.partial_runs()]
    return max(rounds, default=None)


def check_rerun(round_: int, rounds: int, workspace: Path, *, name: str | None = None) -> None:
    """Refuse a rerun of a round with nothing to redo, in one line, before anything changes.

    A round never computed has nothing to redo (``mpd rerun --round 99`` used to print
    "invalidated: nothing" and start a campaign up to round 99); a round past the rounds the
    run reaches would be invalidated and never recomputed.
    """
    last = last_computed_round(workspace)
    if last is None or round_ > last:
        has = "nothing computed yet" if last is None else f"rounds 0-{last} computed"
        raise UserError(
            f"rerun --round {round_}: workspace {name or workspace} has {has}; "
            f"`mpd run --rounds {max(round_, 1)}` computes the rounds not computed yet"
        )
    if round_ > rounds:
        raise UserError(
            f"rerun --round {round_} is past the rounds this run reaches ({rounds}): "
            f"add --rounds {round_} (or more)"
        )


def not_computed(rounds: int | None, states: list[StageState]) -> str | None:
    """The one line that stands for the configured rounds no stage has reached yet."""
    first, last = last_round_of(states) + 1, rounds or 0
    if last < first:
        return None
    which = f"round {first}" if first == last else f"rounds {first}-{last}"
    return f"{which}: not computed yet ({last - first + 1} round(s))"


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
    console = Console()
    console.print(table)
    if (rest := not_computed(rounds, states)) is not None:
        console.print(rest)
    return states


def key_lines(r: int, stage: str, key: StageKey, committed: str | None) -> list[str]:
    """What went into one (round, stage)'s key, as ``mpd status --keys`` prints it."""
    doc = key.doc
    if committed is None:
        disk = "not computed"
    elif committed == key.key:
        disk = "committed with this key: cached"
    else:
        disk = f"committed with {committed[:12]}: recomputed by the next run"
    config = ", ".join(doc["config"]) or "-"
    inputs = ", ".join(f"{s} {k[:12]}" for s, k in doc["inputs"].items()) or "-"
    files = ", ".join(f"{n} {d[:12]}" for n, d in doc["files"].items()) or "-"
    models = ", ".join(f"{role} {i[:12]}" for role, i in doc["models"].items()) or "-"
    if doc["dtype"]:
        models += f" (weights in {doc['dtype']})"
    engines = "; ".join(
        f"{role}: " + " ".join(f"{k}={v}" for k, v in settings.items())
        for role, settings in doc["engines"].items()
    )
    lines = [
        f"round {r} {stage:<9} key {key.key[:12]}  {disk}",
        f"  config     {config}",
        f"  inputs     {inputs}",
        f"  files      {files}",
        f"  models     {models}",
        f"  engines    {engines or '-'}",
        f"  code       {doc['code']}",
    ]
    for where, versions in doc["libraries"].items():
        libs = ", ".join(f"{d} {v}" for d, v in versions.items()) or "-"
        lines.append(f"  libraries  {where}: {libs}")
    return lines


def print_keys(workspace: Path | ObjectStore, keys: list[tuple[int, str, StageKey]]) -> list[str]:
    """Every (round, stage) key the config gives, what went into it, and whether the workspace
    holds its output (a committed run of another key is what the next run recomputes)."""
    store = workspace if isinstance(workspace, ObjectStore) else StageStore(workspace)
    committed = {(m.round, m.stage): m.key for m in store.committed()}
    lines: list[str] = []
    for r, stage, key in keys:
        lines += key_lines(r, stage, key, committed.get((r, stage)))
    print("\n".join(lines))
    return lines
