"""The campaign: bootstrap, problems, then N rounds, each round's student the last one's.

    problems ─► eval(0) ─► [ sample ─► rewrite ─► score ─► filter ─► train ─► eval ] x N

(for ``method: mpd``; the other methods run a subset of these stages plus ``solve``
or ``truncate``, see flows/modes.py).

Every stage is cached on the stage store by its key (each stage's ``run`` in ``tasks/``), so a
re-run computes only what changed, and a killed run resumes from its finished
shards and checkpoints. The whole campaign holds the workspace lock.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from prefect import flow
from prefect.states import Failed

from data import catalog
from data.diskfull import DiskFullError, naming
from data.errors import kind_of, one_line
from data.fence import LeaseLostError
from data.fsutil import atomic_write_bytes, atomic_write_json
from data.lock import WorkspaceLock, describe_holder
from flows import modes
from flows.artifacts import publish_round
from flows.bootstrap import check_tokenizers, ensure_packaged
from flows.config import DEPLOYMENT, ConfigError, RunConfig, dump_config, load_config
from flows.logs import quiet_returned_failures, setup_logging
from flows.nightly import rounds_to_reach
from flows.preflight import attach_storage, check_inputs
from flows.stopping import in_flow
from flows.summary import print_summary
from flows.trusted import is_owners_run
from tasks import cluster
from tasks.context import Context
from tasks.engines import close_engines
from tasks.prefect_stage import execute

log = logging.getLogger("mpd")


LAST_RUN = ".mpd/last_run.json"


def write_last_run(ws: Path, outcomes: dict) -> None:
    """What the last run did per (round, stage): computed, cached or failed (for mpd status)."""
    import time

    atomic_write_json(
        ws / LAST_RUN, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": outcomes}
    )


@contextlib.contextmanager
def _bookkeeping(path: Path, failing: bool) -> Iterator[None]:
    """A write after the stages (the run's outcomes, the catalog). On a full disk while the run
    is already failing (most often for that same disk) it is a warning, so that the user's one
    line names the first failure, not this one."""
    try:
        with naming(path):
            yield
    except DiskFullError:
        if not failing:
            raise
        log.warning("%s not written: the disk is full", path)


@flow(name="mpd-campaign", log_prints=True)
def campaign_flow(
    config: str | None = None,
    rounds: int | None = None,
    workspace: str | None = None,
    overrides: list[str] | None = None,
    rounds_per_night: int | None = None,
) -> list[dict]:
    """Run (or continue) a campaign: every stage cached, so a nightly run only adds rounds.

    Parameters are what a deployment passes: a config path, the rounds to reach,
    an optional workspace and ``key=value`` overrides. ``rounds_per_night`` (the
    nightly deployment's) reaches the rounds already committed in the workspace
    plus that many instead, capped by ``rounds`` when both are given
    (``flows/nightly.py``).
    """
    with in_flow():  # a stop signal ends the run in seconds (flows/stopping.py)
        try:
            # A deployment's parameters are anyone's to set: a mistake in them is one line that
            # names the parameter, and the run ends Failed (not with a traceback).
            # ``mpd run``'s own flow may set any key; a deployment's run may not (flows/trusted.py).
            labels = replace(DEPLOYMENT, untrusted=False) if is_owners_run() else DEPLOYMENT
            cfg = load_config(config, overrides, workspace=workspace, labels=labels)
            for name, value, least in (
                ("rounds", rounds, 0),
                ("rounds_per_night", rounds_per_night, 1),
            ):
                if value is not None and value < least:
                    raise ConfigError(f"{name} parameter {value}: must be {least} or more")
            if rounds_per_night is not None:
                cfg.rounds = rounds_to_reach(cfg.workspace, rounds_per_night, cap=rounds)
            elif rounds is not None:
                cfg.rounds = rounds
            check_inputs(cfg)  # a deployment's run, too, refuses a bad problem file before writing
            run_campaign(cfg)
        except Exception as exc:  # boundary: the flow's Failed state, by the failure's kind
            # A user mistake (or a transient failure that outlived its retries) ends the run as
            # Failed with one clear line, not a traceback; a bug propagates with its traceback.
            if kind_of(exc) == "bug":
                raise
            return Failed(message=one_line(exc), data=exc)  # type: ignore[return-value]
    (summary,) = catalog.internal_queries(cfg.workspace, "select * from round_summary")
    return summary.to_pylist()


def run_campaign(cfg: RunConfig) -> None:
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        setup_logging()  # inside a flow, Prefect's handlers already carry the mpd logger
    quiet_returned_failures()
    log.setLevel(logging.INFO)
    ws = attach_storage(cfg)
    with WorkspaceLock(ws) as lock:
        if lock.stale:
            log.info("recovered a stale lock left by %s", describe_holder(lock.stale))
        atomic_write_bytes(ws / "run.yaml", dump_config(cfg).encode())
        ctx = None
        try:
            ensure_packaged(cfg)
            ctx = Context(cfg, execute)
            modes.run_setup(ctx)  # the world's models (builtin: ones), the problems
            check_tokenizers(cfg)
            cluster.use(cfg.runner)
            student = ctx.starting_student()
            modes.evaluate_start(ctx, student)
            if ctx.computed(0):
                publish_round(ws, 0)
            for r in range(1, cfg.rounds + 1):
                student = modes.run_round(ctx, r, student)
                if ctx.computed(r):
                    publish_round(ws, r)
        finally:
            close_engines()
            cluster.close()
            failing = sys.exc_info()[1] is not None
            # A run that lost its lease writes nothing more: the workspace is another writer's.
            fenced_out = lock.lost or isinstance(sys.exc_info()[1], LeaseLostError)
            if ctx is not None and not fenced_out:
                with _bookkeeping(ws / LAST_RUN, failing):
                    write_last_run(ws, ctx.outcomes)
            if not fenced_out:
                with _bookkeeping(ws / "catalog.duckdb", failing):
                    catalog.write_catalog(ws)
        changed = any(o["state"] != "cached" for o in ctx.outcomes.values()) if ctx else True
        print_summary(ws, replot=changed)
