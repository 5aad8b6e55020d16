"""A ``packaged:`` model on a worker of another host: imported there, checked by content.

A ``packaged:NAME`` model (a GGUF file shipped in a Python package, ``train/gguf.py``) is
imported by the flow into ``<workspace>/models/NAME``: a directory of the flow host's working
copy, in no committed stage, so no store holds it and no other host can open it. A worker is
handed :class:`PackagedModel` instead of that path: the name and the digest of the imported
files. It imports the same packaged file into its own cache (once per cache; a file lock keeps
two processes of one machine from importing it twice at once) and uses the copy only when its
files have that digest; a worker whose package or importer gives other weights fails in one
line rather than computing with another model.

The import code is not part of any stage's key (``train/gguf.py`` stays out of the closures,
as on the flow host): what the stage computes with is checked by content, and that content's
digest is the model's identity in the key already. ``IMPORT.json`` is left out of the digest:
it names the host's own source path.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from data.digests import file_digest
from data.errors import UserError
from data.model_fetch import cache_root

log = logging.getLogger("mpd")
RECORD = "IMPORT.json"  # the importer's record: names the host's source path, not content
_FETCHED: dict[PackagedModel, Path] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class PackagedModel:
    """A packaged model by name and content: what any host can import and check."""

    name: str
    digest: str

    def fetch(self) -> Path:
        return fetch_packaged(self)

    def __str__(self) -> str:
        return f"packaged:{self.name} (files {self.digest[:12]})"


def weights_digest(path: Path, cache: Path | None = None) -> str:
    """The digest of an imported model's files, its import record aside."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel != RECORD:
            h.update(f"{rel}\0{file_digest(file, cache)}\n".encode())
    return h.hexdigest()


def packaged_model(workspace: Path, path: str, cache: Path | None = None) -> PackagedModel | None:
    """The packaged model imported at ``path`` (``<workspace>/models/NAME``), or None when
    ``path`` is not one."""
    models = (Path(workspace) / "models").resolve()
    try:
        rel = Path(path).resolve().relative_to(models).parts
    except ValueError:
        return None
    if len(rel) != 1 or not (models / rel[0] / RECORD).is_file():
        return None
    return PackagedModel(rel[0], weights_digest(models / rel[0], cache))


def fetch_packaged(model: PackagedModel) -> Path:
    """This machine's copy of ``model``: imported on first use, checked, then reused."""
    with _LOCK:
        if (done := _FETCHED.get(model)) is not None:
            return done
        target = cache_root() / f"packaged-{model.name}-{model.digest[:16]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one import per machine; released on close
            if not (target / RECORD).is_file():
                # by name: the importer is no stage's code (the result is checked below)
                gguf = importlib.import_module("train.gguf")
                log.info("importing packaged:%s into %s (once per machine)", model.name, target)
                gguf.import_gguf(gguf.packaged_gguf(model.name), target)
        if (found := weights_digest(target)) != model.digest:
            raise UserError(
                f"packaged:{model.name} imported on this host has other files than the flow "
                f"host's ({found[:12]} here, {model.digest[:12]} there): install the same mpd "
                f"and package versions on every host (or delete {target} if it was damaged)"
            )
        _FETCHED[model] = target
        return target


def forget() -> None:
    """Drop this process's memory of imported models (a test's fresh worker process)."""
    with _LOCK:
        _FETCHED.clear()
