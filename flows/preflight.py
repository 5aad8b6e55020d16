"""The checks a command can make before Prefect starts, so that a refusal takes under a second.

Starting the ephemeral Prefect API costs seconds (a minute on a loaded machine); a wrong
workspace path, a busy workspace or a missing model must not wait for it, and must not come
back as an ``OSError`` traceback from inside a flow.
"""

from __future__ import annotations

import os
from pathlib import Path

from data.errors import UserError
from data.lock import WorkspaceLock


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
    """Every model given as a path exists (``builtin:`` ones are installed by the run)."""
    for name in names:
        if name and not name.startswith("builtin:") and not Path(name).expanduser().exists():
            raise UserError(f"model path does not exist: {name}")


def preflight(workspace: Path | str, models: list[str | None] = ()) -> Path:
    """Workspace usable and not in use, models present: each failure one line, exit 2."""
    path = usable_workspace(workspace)
    WorkspaceLock(path).check_free()
    check_models(list(models))
    return path
