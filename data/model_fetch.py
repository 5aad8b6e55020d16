"""Model directories by content key: what a worker on another host is given instead of a path.

A model a stage made (the bootstrap stage's built-in students, each round's trained student) is
a directory inside a committed stage, and that stage's manifest lists every file with its
sha256. A path to it is a path in the *flow host's* workspace (or its local working copy of an
``s3://`` workspace): another machine cannot open it. So a Dask worker is handed a
:class:`StoredModel` (the workspace's URL, its storage options, the stage, round and key, and
the directory inside the commit) and :func:`fetch` copies that directory from the workspace's
store into the worker's own cache:

- once per worker process (remembered), and once per cache: a later process reuses the
  cached copy when the store's manifest still names the same files (key and every sha256);
- every file checked against the manifest's sha256 as it arrives, the copy made under a
  temporary name and renamed into place, so a killed fetch leaves nothing that looks whole;
- from the store the flow commits to: an object store (``s3://…``) or a local directory,
  which is one more kind of store (fsspec's local filesystem). A shared file system is then
  possible, never assumed: the worker copies from it like from a bucket.

The cache is ``$MPD_CACHE_DIR/models`` (``$MPD_CACHE_DIR`` defaults to ``~/.cache/mpd``, as for
working copies), the worker's own disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.diskfull import naming
from data.errors import UserError
from data.fsutil import atomic_write_json, fsync_dir, removed_on_failure, sha256_file
from data.manifest import MANIFEST, Manifest
from data.objstore import ObjectStore, is_url

_FETCHED: dict[StoredModel, Path] = {}  # this process's fetched models
_LOCK = threading.Lock()  # a worker's threads fetch a model once between them


class StaleModelError(UserError):
    """The stage that made a model was replaced on the store after the shard was handed out."""


@dataclass(frozen=True)
class StoredModel:
    """A model directory inside a committed stage, named so that any host can fetch it.

    ``workspace``: the store (a URL, or the absolute path of a local-disk workspace);
    ``options``: its fsspec storage options as JSON (hashable, and what the flow was given);
    ``subdir``: the model's directory inside the commit (``student``, ``model``).
    """

    workspace: str
    options: str
    stage: str
    round: int
    key: str
    subdir: str

    def store(self) -> ObjectStore:
        return ObjectStore(self.workspace, json.loads(self.options))

    def fetch(self) -> Path:
        return fetch(self)

    def __str__(self) -> str:
        return f"{self.stage} round {self.round} {self.subdir} (key {self.key[:12]})"


def stored_model(workspace: Path, remote: ObjectStore | None, path: str) -> StoredModel | None:
    """The committed model at ``path`` inside ``workspace`` (a local workspace or the local
    working copy of ``remote``), or None when ``path`` is no model of a committed stage (a
    user's own model directory: that one must exist on every worker, as the config names it)."""
    try:
        rel = Path(path).resolve().relative_to(Path(workspace).resolve()).parts
    except ValueError:
        return None
    if len(rel) < 3 or not rel[1].startswith("round=") or not rel[1][6:].isdigit():
        return None
    stage, round_, subdir = rel[0], int(rel[1][6:]), "/".join(rel[2:])
    try:
        raw = json.loads((Path(workspace) / rel[0] / rel[1] / MANIFEST).read_text())
        man = Manifest.from_dict(raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not any(f.path.startswith(subdir + "/") for f in man.files):
        return None
    url = remote.url if remote is not None else str(Path(workspace).resolve())
    options = json.dumps(remote.options if remote is not None else {}, sort_keys=True)
    return StoredModel(url, options, stage, round_, man.key, subdir)


def cache_root() -> Path:
    """This machine's model cache: ``$MPD_CACHE_DIR/models`` (default ``~/.cache/mpd``)."""
    base = Path(os.environ.get("MPD_CACHE_DIR") or Path.home() / ".cache" / "mpd")
    return base.expanduser() / "models"


def fetch(model: StoredModel) -> Path:
    """The local directory of ``model`` on this machine: fetched on first use (verified), then
    reused by every shard of this process."""
    with _LOCK:
        if (done := _FETCHED.get(model)) is not None:
            return done
        if not is_url(model.workspace) and not Path(model.workspace).is_dir():
            raise UserError(
                f"workspace {model.workspace} is not on this host: Dask workers on other hosts "
                "need an s3:// workspace, or the local one mounted at the same path"
            )
        store = model.store()
        man = store.manifest(model.stage, model.round)
        if man is None or man.key != model.key:
            found = "no commit" if man is None else f"key {man.key[:12]}"
            raise StaleModelError(
                f"{model} is no longer committed in {model.workspace} ({found} there); "
                "another run replaced it: run again"
            )
        files = [f for f in man.files if f.path.startswith(model.subdir + "/")]
        digest = hashlib.sha256(f"{model.workspace}\n{model.subdir}".encode()).hexdigest()[:8]
        target = cache_root() / f"{model.key[:16]}-{model.stage}-{model.round}-{digest}"
        if not _matches(target, files):
            _download(store, man, files, target)
        _FETCHED[model] = target / model.subdir
        return _FETCHED[model]


def _matches(target: Path, files: list[Any]) -> bool:
    """Whether the cached copy holds exactly these files (same sha256 recorded, same size)."""
    try:
        cached = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    want = {f.path: f.sha256 for f in files}
    if cached.get("files") != want:
        return False
    return all(
        (target / f.path).is_file() and (target / f.path).stat().st_size == f.bytes for f in files
    )


def _download(store: ObjectStore, man: Manifest, files: list[Any], target: Path) -> None:
    """Copy ``files`` of commit ``man`` into ``target``: each checked against its sha256, the
    whole made under a temporary name and renamed into place (a killed fetch is never reused)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".fetch-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with naming(target), removed_on_failure(tmp):
        for entry in files:
            out = tmp / entry.path
            out.parent.mkdir(parents=True, exist_ok=True)
            store.get_object(man, entry.path, out)
            if out.stat().st_size != entry.bytes or sha256_file(out) != entry.sha256:
                raise StaleModelError(
                    f"{man.stage} round {man.round}: {entry.path} in {store.url} does not match "
                    "its manifest's sha256 (changed or corrupt); run again"
                )
        atomic_write_json(tmp / MANIFEST, {"key": man.key, "files": _sums(files)})
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:6]}")
    if target.exists():  # a stale copy (other files): moved aside, then removed
        target.replace(old)
    try:
        tmp.replace(target)
    except OSError:  # another process of this machine renamed its own copy first: use it
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def _sums(files: list[Any]) -> dict[str, str]:
    return {f.path: f.sha256 for f in files}


def forget() -> None:
    """Drop this process's memory of fetched models (a test's fresh worker process)."""
    with _LOCK:
        _FETCHED.clear()
