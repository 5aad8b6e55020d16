"""The campaign: every round of a run, in one workspace, under one lock.

Until the round DAG lands (issue 6) this runs the stages that exist: the
problem set (round 0), committed through the stage store and cached by its
key, then the SQL catalog, then a summary read back through SQL, so that
``make run`` exercises config, store and catalog for real.
"""

from __future__ import annotations

import logging

import pyarrow as pa

import tasks.problems
from data import catalog
from data.fsutil import atomic_write_bytes
from data.keys import code_version, stage_key
from data.lock import WorkspaceLock, describe_holder
from data.schemas import PROBLEMS
from data.store import StageStore
from flows.bootstrap import check_tokenizers, ensure_bootstrap
from flows.config import RunConfig, dump_config
from flows.logs import setup_logging

log = logging.getLogger("mpd")


def problems_stage(store: StageStore, cfg: RunConfig) -> str:
    """Commit the problem set (round 0) unless a valid one with the same key exists."""
    code = code_version(tasks.problems)
    key = stage_key("problems", config=cfg.problems, seed=cfg.seed, code=code)
    if man := store.lookup("problems", 0, key):
        log.info("problems: cached (%d rows, key %s)", man.rows, key[:12])
        return key
    records = tasks.problems.problem_records(cfg.problems, cfg.seed)
    writer = store.writer("problems", 0, key, code_version=code)
    writer.write_shard(0, pa.Table.from_pylist(records), PROBLEMS)
    man = writer.commit({"config": cfg.problems.model_dump(mode="json")}, expected_shards=1)
    log.info("problems: wrote %d rows in %.1fs (key %s)", man.rows, man.duration_s, key[:12])
    return key


def run_campaign(cfg: RunConfig) -> None:
    setup_logging()
    ws = cfg.workspace
    with WorkspaceLock(ws) as lock:
        if lock.stale:
            log.info("recovered a stale lock left by %s", describe_holder(lock.stale))
        atomic_write_bytes(ws / "run.yaml", dump_config(cfg).encode())
        store = StageStore(ws)
        if any(m.startswith("builtin:") for m in (cfg.models.student, cfg.models.teacher)):
            ensure_bootstrap(store, cfg, device=cfg.models.device)
        check_tokenizers(cfg)
        problems_stage(store, cfg)
        catalog.write_catalog(ws)
        summary = catalog.run_query(
            ws,
            "select split, family, count(*) as problems, "
            "round(avg(length(prompt))) as mean_prompt_chars "
            "from problems group by all order by split, family",
        )
        print(catalog.format_table(summary, "table"))
        log.info(
            'workspace %s ready; query it with: mpd sql -w %s "select * from problems limit 5"',
            ws,
            ws,
        )
