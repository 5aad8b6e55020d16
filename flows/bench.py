"""``mpd bench``: MPD against its alternatives, side by side, from the same start.

Every method runs as an ordinary campaign (the same flow, stages and caches as
``mpd run``), from the same starting student, on the same problems, with the
same training budget: one config, each method's ``preset`` (flows/modes.py) on
top, and a check that no method trains with other steps, batch or length. Each
(method, seed) gets its own workspace below the bench root, so ``mpd status``
and ``mpd sql`` work on any of them; each names all the others in
``cache_from:``, so a stage two methods share (round 0's evaluation, round 1's
sample, the rewriting methods' rewrite and filter) is computed once::

    runs/bench/                       the bench root (the config's ``workspace:``)
      bench.json                      its members: method, seed, workspace
      mpd/seed=0/  on_policy/seed=0/  one workspace per (method, seed)
      catalog.duckdb                  their tables stacked (method, seed columns) + view bench
      bench.parquet  bench.md  bench.png

The numbers come from SQL over the members' ``evals``, ``train_log`` and
``stage_runs`` (``data/sql/bench.sql``): ``mpd sql -w runs/bench "select * from
bench"`` is bench.parquet. The report is in ``flows/bench_report.py``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from data import catalog
from data.errors import kind_of
from data.fsutil import atomic_write_json
from data.lock import WorkspaceLock
from flows.bench_report import print_progress, write_report
from flows.campaign import campaign_flow
from flows.config import DEFAULT_CONFIG, RunConfig, load_config
from flows.errors import UserError
from flows.logs import setup_logging
from flows.modes import MODES
from flows.stopping import in_flow

log = logging.getLogger("mpd")

BENCH_CONFIG = DEFAULT_CONFIG.with_name("bench.yaml")
# What "the same training budget" fixes: per round, the same optimizer steps over the same
# number of sequences of at most the same length. The loss and LoRA are a method's own.
BUDGET_KEYS = ("steps", "batch_size", "grad_accum", "max_length")


@dataclass(frozen=True)
class Member:
    """One campaign of the bench: a method, a seed, its workspace and its ``--set`` list."""

    method: str
    seed: int
    workspace: Path
    overrides: list[str]
    cfg: RunConfig


def parse_list(text: str | None, what: str, choices: list[str] | None = None) -> list[str]:
    """A comma-separated option, checked against ``choices``; a mistake is one line."""
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    if not items:
        raise UserError(f"--{what} is empty: give a comma-separated list")
    for item in items:
        if choices is not None and item not in choices:
            raise UserError(f"unknown method {item!r} in --{what} (methods: {', '.join(choices)})")
    return list(dict.fromkeys(items))


def parse_positive(text: str | int | None, what: str) -> int | None:
    """An option that must be a positive integer (None: not given); a mistake is one line."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--{what} expects a positive integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"--{what} must be at least 1, got {value}")
    return value


def plan(
    config: str | Path | None,
    overrides: list[str],
    methods: list[str] | None,
    seeds: list[int] | None,
    rounds: int | None,
) -> tuple[RunConfig, list[Member]]:
    """The bench's members, every config validated before anything runs."""
    path = Path(config) if config is not None else BENCH_CONFIG
    base = load_config(path, overrides)
    root = base.workspace
    methods = methods or list(MODES)
    rounds = rounds or base.rounds
    # every method on every seed, seed by seed: a stage two methods share is computed by the
    # first, and an interrupted bench has whole seeds done
    runs = [(m, s) for s in dict.fromkeys(seeds or base.bench.seeds) for m in methods]
    places = {(m, s): root / m / f"seed={s}" for m, s in runs}
    members = []
    for m, s in places:
        others = [str(p) for k, p in places.items() if k != (m, s)]
        sets = [
            *(f"{k}={json.dumps(v)}" for k, v in MODES[m].preset.items()),
            *overrides,
            f"method={m}",
            f"seed={s}",
            f"rounds={rounds}",
            f"cache_from={json.dumps(others)}",
        ]
        cfg = load_config(path, sets)
        cfg.workspace = places[(m, s)]
        members.append(Member(m, s, places[(m, s)], sets, cfg))
    check_budget(members)
    return base, members


def check_budget(members: list[Member]) -> None:
    """Refuse a bench whose methods would not train with the same budget."""
    budgets = {m.method: {k: getattr(m.cfg.train, k) for k in BUDGET_KEYS} for m in members}
    first = next(iter(budgets.values()))
    for method, budget in budgets.items():
        if budget != first:
            raise UserError(
                f"bench: {method} trains with {budget}, not {first}: every method needs the "
                "same training budget (do not set these keys per method)"
            )


def budget_line(cfg: RunConfig) -> str:
    t = cfg.train
    return (
        f"per round and method: {t.steps} optimizer steps x {t.batch_size * t.grad_accum} "
        f"sequences (batch {t.batch_size} x accumulation {t.grad_accum}) of at most "
        f"{t.max_length} tokens, lr {t.lr:g} ({t.schedule}); the target tokens each method "
        "trained on are in the train_tokens column"
    )


def write_members(root: Path, members: list[Member]) -> None:
    """bench.json: what makes ``root`` a bench root for ``mpd sql`` (data/catalog.py)."""
    atomic_write_json(
        root / "bench.json",
        {
            "members": [
                {
                    "method": m.method,
                    "seed": m.seed,
                    "path": m.workspace.relative_to(root).as_posix(),
                }
                for m in members
                if m.workspace.is_dir()
            ]
        },
    )


@flow(name="mpd-bench", log_prints=True)
def bench_flow(
    config: str | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    rounds: int | None = None,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every member's campaign (each a subflow run of this one), then write the report.

    A member that fails with a user error (a filter that kept nothing) does not
    stop the others: the report shows what finished and names what failed, and
    the run then fails with one line. A bug fails at once, with its traceback.
    """
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        setup_logging()
    log.setLevel(logging.INFO)
    base, members = plan(config, overrides or [], methods, seeds, rounds)
    root = base.workspace
    root.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    started = time.monotonic()
    with in_flow(), WorkspaceLock(root):  # in_flow: a stop signal ends it in seconds
        log.info("bench: %d campaign(s) under %s; %s", len(members), root, budget_line(base))
        for i, m in enumerate(members, 1):
            where = f"bench [{i}/{len(members)}] {m.method} seed {m.seed}"
            log.info("%s: %d round(s) in %s", where, m.cfg.rounds, m.workspace)
            state = campaign_flow.with_options(flow_run_name=f"bench-{m.method}-seed{m.seed}")(
                config=str(config or BENCH_CONFIG),
                workspace=str(m.workspace),
                overrides=m.overrides,
                return_state=True,
            )
            if state.is_failed():
                outcome = state.result(raise_on_failure=False)
                if isinstance(outcome, BaseException) and kind_of(outcome) == "bug":
                    raise outcome
                failures[f"{m.method} seed {m.seed}"] = str(state.message or outcome)
                log.error("%s failed: %s", where, state.message)
            write_members(root, members)
            print_progress(root, m.method, m.seed, where)
        catalog.write_catalog(root)
        rows = write_report(
            root,
            members=members,
            budget=budget_line(base),
            failures=failures,
            minutes=(time.monotonic() - started) / 60,
        )
    if failures:
        raise UserError(
            f"bench: {len(failures)} of {len(members)} campaign(s) failed "
            f"({'; '.join(f'{k}: {v}' for k, v in failures.items())}); the others are in "
            f"{root / 'bench.md'}"
        )
    return rows
