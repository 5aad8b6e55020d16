"""``mpd bootstrap``, and the models a campaign needs before its first stage.

The bootstrap stage itself (shipped world or trained from scratch, its key and body) is
``tasks/bootstrap.py``; here are the ``mpd-bootstrap`` flow, the import of ``packaged:``
models into the workspace, and the check that student and teacher share a tokenizer.
The shipped world was produced by the command recorded in its manifest (and that manifest's
``parent``, for a world fine-tuned from an earlier one with ``mpd bootstrap --finetune SRC
--out DIR``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from data import catalog
from data.fsutil import atomic_write_bytes
from data.lock import WorkspaceLock
from data.store import StageStore
from flows.config import RunConfig, dump_config
from flows.logs import setup_logging
from flows.prefect_env import prefect_env
from tasks.bootstrap import SHIPPED, bootstrap_assets, ensure_bootstrap
from tasks.context import resolve_model
from train.gguf import import_gguf, packaged_gguf
from train.models import check_same_tokenizer, load_tokenizer

log = logging.getLogger("mpd")
__all__ = ["SHIPPED", "bootstrap_assets", "ensure_bootstrap", "ensure_packaged"]


def bootstrap_workspace(
    cfg: RunConfig, *, from_scratch: bool, device: str, workers: int | None
) -> Path:
    """``mpd bootstrap`` into a workspace, as the Prefect flow ``mpd-bootstrap``."""
    prefect_env()
    from prefect import flow

    setup_logging()

    @flow(name="mpd-bootstrap")
    def bootstrap_flow(from_scratch: bool, device: str) -> str:
        return str(_bootstrap(cfg, from_scratch=from_scratch, device=device, workers=workers))

    with WorkspaceLock(cfg.workspace):  # taken before Prefect starts: a busy workspace is one line
        return Path(bootstrap_flow(from_scratch, device))


def _bootstrap(cfg: RunConfig, *, from_scratch: bool, device: str, workers: int | None) -> Path:
    atomic_write_bytes(cfg.workspace / "run.yaml", dump_config(cfg).encode())
    store = StageStore(cfg.workspace)
    ensure_bootstrap(store, cfg, from_scratch=from_scratch, device=device, workers=workers)
    catalog.write_catalog(cfg.workspace)
    return store.stage_dir("bootstrap", 0)


def ensure_packaged(cfg: RunConfig) -> None:
    """Import each ``packaged:NAME`` model of the config into ``<workspace>/models/NAME``, once
    per workspace (``train/gguf.py``), before any stage resolves it."""
    for name in (cfg.models.student, cfg.models.teacher, cfg.models.rewriter):
        if not name or not name.startswith("packaged:"):
            continue
        short = name.removeprefix("packaged:")
        path = Path(cfg.workspace) / "models" / short
        if not (path / "IMPORT.json").is_file():
            source = packaged_gguf(short)  # an unknown name is one line
            log.info("importing %s into %s (once per workspace)", name, path)
            import_gguf(source, path)


def check_tokenizers(cfg: RunConfig) -> None:
    """Student and teacher must tokenize identically (token-level KL needs it)."""
    student = load_tokenizer(resolve_model(cfg.models.student, cfg.workspace))
    teacher = load_tokenizer(resolve_model(cfg.models.teacher, cfg.workspace))
    check_same_tokenizer(student, teacher)
