"""The checks a command can make before Prefect starts, so that a refusal takes under a second.

Starting the ephemeral Prefect API costs seconds (a minute on a loaded machine); a wrong
workspace path, a busy workspace or a missing model must not wait for it, and must not come
back as an ``OSError`` traceback from inside a flow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from data.errors import UserError
from data.lock import WorkspaceLock
from data.objstore import attach
from flows.modes import MODES
from tasks.context import check_model_dir
from tasks.filter import check_filter_sql

if TYPE_CHECKING:
    from flows.config import RunConfig


def usable_workspace(workspace: Path | str) -> Path:
    """The workspace directory, created if missing, checked to be a writable directory."""
    path = Path(workspace).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"is under {existing}, a file"
                raise UserError(f"workspace {path} {where}: give a directory (-w DIR)")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create workspace {path}: {exc.strerror or exc}") from None
    probe = path / f".mpd-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"workspace {path} is not writable: {exc.strerror or exc}") from None
    return path


def check_models(names: list[str | None]) -> None:
    """Every model given as a path exists (``builtin:`` and ``packaged:`` ones are installed
    by the run)."""
    for name in names:
        if not name or name.startswith(("builtin:", "packaged:")):
            continue
        check_model_dir(name)


def check_inputs(cfg: RunConfig) -> None:
    """The files a config names exist: a missing filter SQL file used to surface only at the
    filter stage, after a round's sampling and rewriting."""
    if cfg.filter.sql is not None and not Path(cfg.filter.sql).expanduser().is_file():
        raise UserError(f"filter.sql: file not found: {cfg.filter.sql}")
    if MODES[cfg.method].filtered:
        check_filter_sql(cfg.filter)  # one SELECT that binds and has the decisions columns
    source = cfg.problems.file if cfg.problems.source == "file" else None
    if source is not None and not Path(source.path).expanduser().exists():
        raise UserError(f"problems.file.path: problem source not found: {source.path}")


def preflight(cfg: RunConfig) -> Path:
    """Workspace usable and not in use, models and input files present: each failure one
    line, exit 2, before Prefect starts."""
    check_inputs(cfg)
    check_models([cfg.models.student, cfg.models.teacher])
    path = attach_storage(cfg)
    WorkspaceLock(path).check_free()
    return path


def attach_storage(cfg: RunConfig) -> Path:
    """The local workspace directory, marked as the working copy of ``storage.url`` when the
    workspace is on object storage (whose bucket must answer: one line if it does not)."""
    path = usable_workspace(cfg.workspace)
    if cfg.storage.url:
        attach(path, cfg.storage.url, cfg.storage.options)
    return path
