"""``mpd bench``: MPD against its alternatives, side by side, from the same start.

Every method runs as an ordinary campaign (the same flow, stages and caches as
``mpd run``), on every seed of ``bench.seeds`` (the same for all), from the same
starting student, on the same problems, with the same training budget: one config,
each method's ``preset`` (flows/modes.py) on top, and a check that no method trains
with other steps, batch or length. Each (method, seed) gets its own workspace below
the bench root, so ``mpd status`` and ``mpd sql`` work on any of them; each names
all the others in ``cache_from:``, so a stage two methods share (round 0's
evaluation, round 1's sample, the rewriting methods' rewrite, score and filter) is
computed once. With ``--tune``, each method's learning rate is first chosen on the
dev split (:func:`tune_plan`, :mod:`flows.bench_tune`)::

    runs/bench/                       the bench root (the config's ``workspace:``)
      bench.json                      its members: method, seed, workspace
      mpd/seed=0/  on_policy/seed=0/  one workspace per (method, seed)
      tune/mpd/lr=3e-05/  tune.json   --tune: the dev campaigns, and the choice
      catalog.duckdb                  their tables stacked (method, seed columns) + views
      bench.parquet  bench_family.parquet  bench_paired.parquet  bench.md  bench.png

The numbers come from SQL over the members' ``evals``, ``train_log`` and
``stage_runs`` (``data/sql/bench*.sql``): ``mpd sql -w runs/bench "select * from
bench"`` is bench.parquet. The report is in ``flows/bench_report.py`` and
``flows/bench_tables.py``; docs/bench.md says how to read it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from data import catalog
from data.errors import kind_of
from data.fsutil import atomic_write_json
from data.lock import WorkspaceLock
from flows.bench_pool import run_side_by_side
from flows.bench_report import print_progress, write_report
from flows.bench_tune import dev_progress, tune_lrs
from flows.campaign import campaign_flow
from flows.config import DEFAULT_CONFIG, BenchConfig, RunConfig, load_config
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
    lrs: dict[str, float] | None = None,
) -> tuple[RunConfig, list[Member]]:
    """The bench's members, every config validated before anything runs; ``lrs``: each
    method's learning rate, as chosen on the dev split (``--tune``)."""
    path = Path(config) if config is not None else BENCH_CONFIG
    base = load_config(path, overrides)
    methods = methods or list(MODES)
    # every method on every seed, seed by seed: a stage two methods share is computed by the
    # first, and an interrupted bench has whole seeds done
    runs = [(m, s) for s in dict.fromkeys(seeds or base.bench.seeds) for m in methods]
    places = [Place(m, s, base.workspace / m / f"seed={s}", lr_sets(lrs, m)) for m, s in runs]
    members = build_members(path, places, overrides, rounds or base.rounds)
    check_budget(members)
    return base, members


def lr_sets(lrs: dict[str, float] | None, method: str) -> list[str]:
    """The ``--set`` of a tuned learning rate (after the method's preset, which it replaces)."""
    return [f"train.lr={lrs[method]!r}"] if lrs and method in lrs else []


@dataclass(frozen=True)
class Place:
    """A campaign to plan: method, seed, workspace, and ``--set``s of its own."""

    method: str
    seed: int
    workspace: Path
    sets: list[str]


def build_members(
    path: Path, places: list[Place], overrides: list[str], rounds: int
) -> list[Member]:
    """Each place's config: the method's preset, the user's overrides, its own sets; every
    other place of the list in ``cache_from``, so a stage two of them share runs once."""
    members = []
    for p in places:
        others = [str(o.workspace) for o in places if o is not p]
        sets = [
            *(f"{k}={json.dumps(v)}" for k, v in MODES[p.method].preset.items()),
            *overrides,
            *p.sets,
            f"method={p.method}",
            f"seed={p.seed}",
            f"rounds={rounds}",
            f"cache_from={json.dumps(others)}",
        ]
        cfg = load_config(path, sets)
        cfg.workspace = p.workspace
        members.append(Member(p.method, p.seed, p.workspace, sets, cfg))
    return members


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
        f"{t.max_length} tokens, {t.schedule} schedule; each method's learning rate is in the "
        "summary's lr column; the target tokens each method trained on are in the train_tokens "
        "column"
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


def run_campaigns(
    members: list[Member],
    config: str | None,
    label: str,
    after: Callable[[Member, str], None],
    jobs: int = 1,
) -> dict[str, str]:
    """Each member's campaign; ``after`` logs its progress line. With ``jobs`` > 1, that many
    side by side, each in its own process (:mod:`flows.bench_pool`); with 1, one after the
    other, each a subflow run of this one. A user error (a filter that kept nothing) is
    returned by member, not raised: the others still run. A bug raises at once."""

    def where_of(i: int, m: Member) -> str:
        return f"{label} [{i + 1}/{len(members)}] {m.method} " + (
            f"lr {m.cfg.train.lr:g}" if label.endswith("tune") else f"seed {m.seed}"
        )

    path = str(config or BENCH_CONFIG)
    if jobs > 1:
        return run_side_by_side(members, path, label, where_of, after, jobs)
    failures: dict[str, str] = {}
    for i, m in enumerate(members):
        where = where_of(i, m)
        log.info("%s: %d round(s) in %s", where, m.cfg.rounds, m.workspace)
        name = f"{label.replace(' ', '-')}-{m.method}-{m.workspace.name}"
        state = campaign_flow.with_options(flow_run_name=name)(
            config=path, workspace=str(m.workspace), overrides=m.overrides, return_state=True
        )
        if state.is_failed():
            outcome = state.result(raise_on_failure=False)
            if isinstance(outcome, BaseException) and kind_of(outcome) == "bug":
                raise outcome
            failures[where.split("] ", 1)[1]] = str(state.message or outcome)
            log.error("%s failed: %s", where, state.message)
        after(m, where)
    return failures


@flow(name="mpd-bench", log_prints=True)
def bench_flow(
    config: str | None = None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    rounds: int | None = None,
    overrides: list[str] | None = None,
    tune: list[float] | None = None,
) -> list[dict[str, Any]]:
    """With ``tune`` (a learning-rate grid), first each method's rate on the dev split
    (:mod:`flows.bench_tune`); then every member's campaign, then the report.

    A member that fails with a user error (a filter that kept nothing) does not
    stop the others: the report shows what finished and names what failed, and
    the run then fails with one line. A bug fails at once, with its traceback.
    """
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        setup_logging()
    log.setLevel(logging.INFO)
    overrides = overrides or []
    base, _ = plan(config, overrides, methods, seeds, rounds)
    root = base.workspace
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with in_flow(), WorkspaceLock(root):  # in_flow: a stop signal ends it in seconds
        tuning, lrs = [], None
        if tune:
            trials = tune_plan(config, overrides, methods, seeds, rounds, tune)
            tuning, lrs = run_tuning(root, config, trials, tune, base.bench)
        _, members = plan(config, overrides, methods, seeds, rounds, lrs)
        log.info("bench: %d campaign(s) under %s; %s", len(members), root, budget_line(base))

        def after(m: Member, where: str) -> None:
            write_members(root, members)
            print_progress(root, m.method, m.seed, where)

        failures = run_campaigns(members, config, "bench", after, base.bench.jobs)
        catalog.write_catalog(root)
        rows = write_report(
            root,
            members=members,
            budget=budget_line(base),
            failures=failures,
            minutes=(time.monotonic() - started) / 60,
            tuning=tuning,
        )
    if failures:
        raise UserError(
            f"bench: {len(failures)} of {len(members)} campaign(s) failed "
            f"({'; '.join(f'{k}: {v}' for k, v in failures.items())}); the others are in "
            f"{root / 'bench.md'}"
        )
    return rows


def run_tuning(
    root: Path, config: str | None, trials: list[Member], grid: list[float], bench: BenchConfig
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """``--tune``'s dev campaigns, then the choice committed (:mod:`flows.bench_tune`); one
    that fails leaves nothing to choose from: one line."""
    log.info("bench tune: %d campaign(s) on the dev split", len(trials))
    failed = run_campaigns(trials, config, "bench tune", dev_progress, bench.jobs)
    if failed:
        raise UserError(
            f"bench --tune: {len(failed)} dev campaign(s) failed "
            f"({'; '.join(f'{k}: {v}' for k, v in failed.items())}); nothing chosen"
        )
    return tune_lrs(root, trials, grid, bench.tune_tolerance)


def tune_plan(
    config: str | Path | None,
    overrides: list[str],
    methods: list[str] | None,
    seeds: list[int] | None,
    rounds: int | None,
    grid: list[float],
) -> list[Member]:
    """The dev campaigns of ``--tune``: every method at every rate of ``grid``, on the first
    seed, with the bench's budget, evaluated on the dev split only; each in
    ``<root>/tune/<method>/lr=<lr>``. Refused (one line) where the problems have no dev split."""
    path = Path(config) if config is not None else BENCH_CONFIG
    base = load_config(path, overrides)
    p = base.problems
    if not (p.dev_fraction > 0 or (p.source == "builtin" and p.n_dev > 0)):
        raise UserError(
            "bench --tune chooses on the dev split, and these problems have none: set "
            "problems.n_dev (built-in world) or problems.dev_fraction (any source)"
        )
    seed = (seeds or base.bench.seeds)[0]
    places = [
        Place(m, seed, base.workspace / "tune" / m / f"lr={lr:g}", [*DEV_ONLY, f"train.lr={lr!r}"])
        for m in methods or list(MODES)
        for lr in grid
    ]
    trials = build_members(path, places, overrides, rounds or base.rounds)
    check_budget(trials)
    return trials


# A dev campaign evaluates nothing but dev: the test split is never computed before the choice.
DEV_ONLY = ['evaluate.splits=["dev"]']
