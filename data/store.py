"""The stage store: staging, shards, atomic commit, manifests, look-up.

Layout, per stage run ``(stage, round)``::

    <ws>/.staging/<stage>/round=<r>/<key16>/     work in progress (invisible to SQL)
        part-00000.parquet                       a finished shard (renamed into place)
        _shards/part-00000.parquet.json          its completion marker, written after it
    <ws>/<stage>/round=<r>/                      committed: one atomic rename
        part-00000.parquet ... _manifest.json

A committed manifest::

    {"stage": "sample", "round": 1, "key": "9f2c...", "rows": 512,
     "files": [{"path": "part-00000.parquet", "bytes": 81234, "rows": 64,
                "sha256": "..."}], "started_at": ..., "finished_at": ...,
     "duration_s": 12.3, "resumed_shards": 3, "code_version": "0.1.0+ab12cd34",
     "extra": {...}}

The disk is the source of truth: a stage is done when its manifest exists,
names the requested key, and every file it lists exists with the recorded size
and sha256. Anything else is "not done" and will be recomputed.

Staging is keyed by the stage key, so a restart with the *same* key finds the
shards that finished before a crash (their marker is written after the shard
was renamed into place, so a marker implies a whole shard) and redoes only the
rest; a restart with a different key starts clean and cannot mix inputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data import fence
from data.diskfull import DiskFullError, naming
from data.errors import InternalError
from data.fsutil import atomic_write_json, fsync_dir, removed_on_failure, sha256_file
from data.manifest import MANIFEST, SHARD_MARKERS, STAGING, TRASH, FileEntry, Manifest
from data.objstore import attached
from data.schemas import conform

PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd"}
log = logging.getLogger("mpd.store")


class CorruptShardError(InternalError):
    """A shard's marker disagrees with its file (or the file is missing). Met while resuming,
    the shard is recomputed; met at commit, a stage skipped a shard: our bug."""


class StageStore:
    """All stage runs of one workspace."""

    def __init__(self, workspace: Path | str) -> None:
        self.workspace = Path(workspace).resolve()
        # A local working copy of an object-storage workspace (data/objstore.py): commits are
        # published there, and look-ups follow its manifests.
        self.remote = attached(self.workspace)

    def stage_dir(self, stage: str, round_: int) -> Path:
        return self.workspace / stage / f"round={round_}"

    def manifest(self, stage: str, round_: int) -> Manifest | None:
        """The committed manifest, or None when absent or unreadable."""
        path = self.stage_dir(stage, round_) / MANIFEST
        try:
            return Manifest.from_dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None

    def validate(
        self, stage: str, round_: int, *, deep: bool = True, man: Manifest | None = None
    ) -> list[str]:
        """Problems with the committed output; empty means valid.

        ``deep`` re-hashes every file: slower, but it is what catches a shard
        overwritten in place or truncated to the same size. ``man``: the manifest when the
        caller has just read it (not read again).
        """
        man = man or self.manifest(stage, round_)
        if man is None:
            return [f"{stage} round {round_}: no readable manifest"]
        base = self.stage_dir(stage, round_)
        problems = []
        for entry in man.files:
            path = base / entry.path
            if not path.is_file():
                problems.append(f"{stage} round {round_}: missing file {entry.path}")
            elif path.stat().st_size != entry.bytes:
                problems.append(f"{stage} round {round_}: {entry.path} has the wrong size")
            elif deep and sha256_file(path) != entry.sha256:
                problems.append(f"{stage} round {round_}: {entry.path} is corrupt (sha256)")
        return problems

    def lookup(self, stage: str, round_: int, key: str, *, deep: bool = True) -> Manifest | None:
        """The committed manifest if it has ``key`` and validates; else None (a miss).

        With object storage, its manifest decides: a valid remote commit of ``key`` is a hit
        (downloaded if the local copy differs), a damaged one is a miss (recomputed and
        republished), and a valid local commit the store lacks is published (a run killed
        between its local commit and the upload).
        """
        man = self.manifest(stage, round_)
        if man is None or man.key != key or self.validate(stage, round_, deep=deep, man=man):
            man = None
        return man if self.remote is None else self._follow_remote(stage, round_, key, man, deep)

    def _follow_remote(
        self, stage: str, round_: int, key: str, local: Manifest | None, deep: bool
    ) -> Manifest | None:
        assert self.remote is not None
        remote = self.remote.manifest(stage, round_)
        if remote is not None and remote.key == key:
            if problems := self.remote.validate(stage, round_, deep=deep, man=remote):
                _warn_once(f"{problems[0]} in {self.remote.url}; recomputing it")
                return None
            if local is not None and local.objects == remote.objects:
                return local
            try:
                self.remote.download(remote, self.stage_dir(stage, round_))
            except ValueError as exc:
                _warn_once(f"{exc} in {self.remote.url}; recomputing it")
                return None
            return remote
        return None if local is None else self.publish(local)

    def publish(self, man: Manifest) -> Manifest:
        """Publish a local commit to object storage; the local manifest records where."""
        assert self.remote is not None
        base = self.stage_dir(man.stage, man.round)
        published = self.remote.publish(man, base)
        atomic_write_json(base / MANIFEST, published.to_dict())
        return published

    def writer(self, stage: str, round_: int, key: str, *, code_version: str = "") -> StageWriter:
        return StageWriter(self, stage, round_, key, code_version=code_version)

    def committed(self) -> list[Manifest]:
        """Every committed stage run, sorted by round then stage."""
        out = []
        for path in sorted(self.workspace.glob(f"*/round=*/{MANIFEST}")):
            stage, rdir = path.parent.parent.name, path.parent.name
            man = self.manifest(stage, int(rdir.split("=", 1)[1]))
            if man is not None:
                out.append(man)
        return sorted(out, key=lambda m: (m.round, m.stage))

    def adopt(self, source: StageStore, stage: str, round_: int, key: str) -> Manifest | None:
        """Commit ``source``'s valid output of ``(stage, round_, key)`` here; None on a miss.

        How two workspaces share a stage (``cache_from:``, ``mpd bench``): the key
        names the whole computation (config, inputs' keys, models, seed, code),
        so an equal key in another workspace is the same result. Files are hard-
        linked (copied across file systems): committed files are never changed in
        place, only replaced or moved aside, so sharing an inode is safe. The
        manifest keeps the original timings and records where it came from; the
        directory appears here by the same single rename as a commit.
        """
        man = source.lookup(stage, round_, key)
        if man is None or source.workspace == self.workspace:
            return None
        parent = self.workspace / STAGING / stage / f"round={round_}"
        tmp = parent / f".adopt-{key[:16]}"
        shutil.rmtree(tmp, ignore_errors=True)
        src = source.stage_dir(stage, round_)
        for entry in man.files:
            out = tmp / entry.path
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src / entry.path, out)
            except OSError:
                shutil.copy2(src / entry.path, out)
        man.extra = {**man.extra, "shared_from": str(source.workspace)}
        man.objects = ""
        atomic_write_json(tmp / MANIFEST, man.to_dict())
        target = self.stage_dir(stage, round_)
        target.parent.mkdir(parents=True, exist_ok=True)
        with fence.guarded(self.workspace):  # a writer that lost its lease replaces nothing
            if target.exists():
                _move_to_trash(self.workspace, target, f"{stage}-round={round_}")
            tmp.replace(target)
        fsync_dir(target.parent)
        _prune_empty(parent, self.workspace / STAGING)
        return man if self.remote is None else self.publish(man)

    def invalidate(self, stage: str, round_: int) -> bool:
        """Move a committed output aside (``mpd rerun``); True if there was one.

        On object storage the manifest is deleted first, so no reader follows it any more.
        """
        retracted = self.remote.retract(stage, round_) if self.remote is not None else False
        target = self.stage_dir(stage, round_)
        with fence.guarded(self.workspace):
            if not target.exists():
                return retracted
            _move_to_trash(self.workspace, target, f"{stage}-round={round_}")
        return True

    def partial_runs(self) -> list[tuple[str, int, str, int, int]]:
        """(stage, round, key16, finished shards, their rows) of every run left in staging."""
        staging = self.workspace / STAGING
        out = []
        for keydir in sorted(staging.glob("*/round=*/*")):
            if not keydir.is_dir():
                continue
            rows = []
            for marker in (keydir / SHARD_MARKERS).glob("*.json"):
                try:
                    rows.append(int(json.loads(marker.read_text()).get("rows", 0)))
                except (OSError, ValueError):
                    continue
            stage, round_text = keydir.parent.parent.name, keydir.parent.name
            out.append((stage, int(round_text.split("=", 1)[1]), keydir.name, len(rows), sum(rows)))
        return out


class StageWriter:
    """Writes one stage run into staging, then commits it atomically."""

    def __init__(
        self, store: StageStore, stage: str, round_: int, key: str, *, code_version: str = ""
    ) -> None:
        self.store, self.stage, self.round, self.key = store, stage, round_, key
        self.code_version = code_version
        self.dir = store.workspace / STAGING / stage / f"round={round_}" / key[:16]
        self.markers = self.dir / SHARD_MARKERS
        self.started_at = time.time()
        with fence.guarded(store.workspace):  # never another writer's staging, once ours is lost
            self._drop_other_keys()
        self.markers.mkdir(parents=True, exist_ok=True)
        self._clean_temporaries()
        if (remote := store.remote) is not None:  # shards finished elsewhere resume here
            remote.drop_staging(stage, round_, keep=self.dir.name)
            remote.pull_staging(stage, round_, self.dir.name, self.dir)
        self.resumed = self.done_shards()

    # -- shards -------------------------------------------------------------
    def shard_name(self, index: int) -> str:
        return f"part-{index:05d}.parquet"

    def done_shards(self) -> set[int]:
        """Indices of shards whose file matches their marker; bad ones are removed."""
        done = set()
        for marker in self.markers.glob("part-*.parquet.json"):
            name = marker.name.removesuffix(".json")
            index = int(name.split("-")[1].split(".")[0])
            try:
                self._check_shard(name, json.loads(marker.read_text()))
                done.add(index)
            except (CorruptShardError, ValueError):
                marker.unlink(missing_ok=True)
                (self.dir / name).unlink(missing_ok=True)
        return done

    def write_shard(self, index: int, table: pa.Table, schema: pa.Schema) -> int:
        """Write shard ``index`` atomically and mark it done; returns its rows."""
        return self.write_table(self.shard_name(index), table, schema, marker=True)

    def write_table(
        self, name: str, table: pa.Table, schema: pa.Schema, *, marker: bool = False
    ) -> int:
        """Write a whole Parquet file into staging (checked against ``schema``)."""
        table = conform(table, schema, name=f"{self.stage}/{name}")
        fence.verify(self.store.workspace)  # a lost lease ends the run here, in one line
        path = self.dir / name
        tmp = path.with_name(f".{name}.tmp")
        # A full disk: one line naming the shard, no partial file left.
        with naming(path), removed_on_failure(tmp):
            pq.write_table(table, tmp, **PARQUET_OPTIONS)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.replace(path)
        fsync_dir(self.dir)
        if marker:
            entry = {"rows": table.num_rows, "bytes": path.stat().st_size}
            entry["sha256"] = sha256_file(path)
            try:
                atomic_write_json(self.markers / f"{name}.json", entry)
            except DiskFullError:  # a shard without its marker is redone: give its room back
                path.unlink(missing_ok=True)
                raise
            if (remote := self.store.remote) is not None:
                remote.push_shard(
                    self.stage, self.round, self.dir.name, path, self.markers / f"{name}.json"
                )
        return table.num_rows

    def path(self, relative: str) -> Path:
        """A path inside staging for non-Parquet outputs (a model directory)."""
        out = self.dir / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    # -- commit -------------------------------------------------------------
    def commit(
        self, extra: dict[str, Any] | None = None, *, expected_shards: int | None = None
    ) -> Manifest:
        """Publish the staging directory as the stage's output in one rename.

        With ``expected_shards``, refuse to publish unless shards ``0..n-1`` are
        all present and intact: a stage must never commit with a hole in it.
        """
        fence.verify(self.store.workspace)  # staging may be the new writer's by now
        if expected_shards is not None:
            missing = set(range(expected_shards)) - self.done_shards()
            if missing:
                raise CorruptShardError(
                    f"{self.stage} round {self.round}: shard(s) {sorted(missing)} not finished"
                )
        shutil.rmtree(self.markers, ignore_errors=True)
        files = []
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            if rel == MANIFEST or path.name.startswith("."):
                path.unlink()
                continue
            rows = pq.read_metadata(path).num_rows if path.suffix == ".parquet" else None
            files.append(FileEntry(rel, path.stat().st_size, sha256_file(path), rows))
        finished = time.time()
        man = Manifest(
            stage=self.stage,
            round=self.round,
            key=self.key,
            files=files,
            rows=sum(f.rows or 0 for f in files if f.path.endswith(".parquet")),
            started_at=self.started_at,
            finished_at=finished,
            duration_s=round(finished - self.started_at, 3),
            code_version=self.code_version,
            resumed_shards=len(self.resumed),
            extra=extra or {},
        )
        atomic_write_json(self.dir / MANIFEST, man.to_dict())
        target = self.store.stage_dir(self.stage, self.round)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The commit: the lease checked and held (a flock on .lock) through both renames, so a
        # writer that lost its lease replaces nothing (data/fence.py).
        with fence.guarded(self.store.workspace):
            if target.exists():
                _move_to_trash(self.store.workspace, target, f"{self.stage}-round={self.round}")
            self.dir.replace(target)
        fsync_dir(target.parent)
        _prune_empty(self.dir.parent, self.store.workspace / STAGING)
        return man if self.store.remote is None else self.store.publish(man)

    def abandon(self) -> None:
        """Delete this run's staging (finished shards included)."""
        with fence.guarded(self.store.workspace):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- internals ----------------------------------------------------------
    def _check_shard(self, name: str, entry: dict[str, Any]) -> None:
        path = self.dir / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise CorruptShardError(f"{name}: missing or wrong size")
        if sha256_file(path) != entry["sha256"]:
            raise CorruptShardError(f"{name}: sha256 mismatch")

    def _clean_temporaries(self) -> None:
        """Remove files a killed writer left half-written (never renamed into place)."""
        for tmp in self.dir.rglob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        for path in self.dir.glob("part-*.parquet"):
            if not (self.markers / f"{path.name}.json").exists():
                path.unlink()

    def _drop_other_keys(self) -> None:
        """Staging of this (stage, round) under another key can never be reused."""
        parent = self.dir.parent
        if parent.is_dir():
            for other in parent.iterdir():
                if other.name != self.dir.name:
                    shutil.rmtree(other, ignore_errors=True)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A damaged remote commit is looked up twice per stage (Prefect's cache check, then the
    stage): one warning is enough."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _move_to_trash(workspace: Path, target: Path, label: str) -> None:
    trash = workspace / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    aside = trash / f"{label}-{time.time_ns()}"
    target.replace(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _prune_empty(path: Path, stop: Path) -> None:
    while path != stop and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent
