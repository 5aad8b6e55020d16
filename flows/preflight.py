"""The checks a command can make before Prefect starts, so that a refusal takes under a second
(two for a 100 MB problem file) and writes nothing.

Starting the ephemeral Prefect API costs seconds (a minute on a loaded machine); a wrong
workspace path, a busy workspace or a missing model must not wait for it, and must not come
back as an ``OSError`` traceback from inside a flow.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from data.errors import UserError
from data.lock import ObjectLease, WorkspaceLock
from data.objstore import ObjectStore, attach
from data.sources import check_problem_source
from flows.modes import MODES
from tasks.context import check_model_dir
from tasks.filter import check_filter_sql

if TYPE_CHECKING:
    from flows.config import RunConfig


def check_workspace(workspace: Path | str) -> Path:
    """The workspace path, checked to be (or to be able to become) a directory: nothing is
    created, so a refused run leaves no empty workspace behind."""
    path = Path(workspace).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"is under {existing}, a file"
                raise UserError(f"workspace {path} {where}: give a directory (-w DIR)")
            break
    return path


def usable_workspace(workspace: Path | str) -> Path:
    """The workspace directory, created if missing, checked to be a writable directory; what
    this created is removed again when the check fails."""
    path = check_workspace(workspace)
    made = _missing(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(made)
        raise UserError(f"cannot create workspace {path}: {exc.strerror or exc}") from None
    probe = path / f".mpd-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _remove_empty(made)
        raise UserError(f"workspace {path} is not writable: {exc.strerror or exc}") from None
    return path


def _missing(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_empty(made: list[Path]) -> None:
    """Remove the directories a failed preflight created (deepest first), if still empty."""
    for directory in made:
        with contextlib.suppress(OSError):
            directory.rmdir()


def check_models(names: list[str | None]) -> None:
    """Every model given as a path exists (``builtin:`` and ``packaged:`` ones are installed
    by the run)."""
    for name in names:
        if not name or name.startswith(("builtin:", "packaged:")):
            continue
        check_model_dir(name)


def check_inputs(cfg: RunConfig) -> None:
    """The files a config names exist, and the problem file holds problems: a missing filter
    SQL file used to surface only at the filter stage, after a round's sampling and rewriting;
    a problem file with a duplicate id or an empty answer only after Prefect had started and
    the workspace held a bootstrap, a catalog and run.yaml."""
    if cfg.filter.sql is not None and not Path(cfg.filter.sql).expanduser().is_file():
        raise UserError(f"filter.sql: file not found: {cfg.filter.sql}")
    if MODES[cfg.method].filtered:
        check_filter_sql(cfg.filter)  # one SELECT that binds and has the decisions columns
    source = cfg.problems.file if cfg.problems.source == "file" else None
    if source is None:
        return
    local = source.format != "hf_dataset"  # hf_dataset may name a dataset on the hub
    if local and not Path(source.path).expanduser().exists():
        raise UserError(f"problems.file.path: problem source not found: {source.path}")
    check_problem_source(source)  # every rule the problems stage applies, by the same code


def preflight(cfg: RunConfig) -> Path:
    """Inputs present and sound, models present, workspace usable and not in use: each failure
    one line, exit 2, before Prefect starts. Every check runs before anything is created: a
    refused run writes nothing, not even the workspace directory. A workspace in use is
    checked first: a second writer (a nightly run still going) learns it before anything reads
    a 100 MB problem file."""
    WorkspaceLock(check_workspace(cfg.workspace)).check_free()
    check_lease(cfg)
    check_inputs(cfg)
    check_models([cfg.models.student, cfg.models.teacher])
    return attach_storage(cfg)


def check_lease(cfg: RunConfig) -> None:
    """On object storage, the one-writer lease: a second writer is refused here in one line,
    reading only (this machine's working copy may not exist yet: it used to be refused only
    after Prefect had started, 79 s in). A store that does not answer is retried, then one
    line, exit 1 (``ObjectStore.check_reachable``)."""
    if cfg.storage.url:
        store = ObjectStore(str(cfg.storage.url), cfg.storage.options)
        store.check_reachable()
        ObjectLease(store, {}).check_free()


def attach_storage(cfg: RunConfig) -> Path:
    """The local workspace directory, marked as the working copy of ``storage.url`` when the
    workspace is on object storage (whose bucket must answer: one line if it does not, and
    the directory is not left behind when this call created it)."""
    made = _missing(Path(cfg.workspace).expanduser())
    path = usable_workspace(cfg.workspace)
    if cfg.storage.url:
        try:
            attach(path, cfg.storage.url, cfg.storage.options)
        except BaseException:  # boundary: no empty directory left behind, re-raised unchanged
            _remove_empty(made)
            raise
    return path
