"""Writing one stage run: staging, shards with their markers, and the commit by one rename.

A run writes under ``<ws>/.staging/<stage>/round=<r>/<key16>/`` (layout: ``data/store.py``).
Each shard is written to a temporary name, fsynced, renamed into place, and only then
marked done (``_shards/part-00000.parquet.json``: rows, bytes, sha256), so a marker implies
a whole shard and a restart with the same key redoes only the shards without one. The
commit writes the manifest last and publishes the directory with one rename
(:func:`install`), the workspace's lease held through it (``data/fence.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from data import fence
from data.diskfull import DiskFullError, naming
from data.errors import InternalError
from data.fsutil import atomic_write_json, fsync_dir, removed_on_failure, sha256_file
from data.manifest import MANIFEST, SHARD_MARKERS, STAGING, TRASH, FileEntry, Manifest
from data.schemas import conform

if TYPE_CHECKING:
    from data.store import StageStore

PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd"}


class CorruptShardError(InternalError):
    """A shard's marker disagrees with its file (or the file is missing). Met while resuming,
    the shard is recomputed; met at commit, a stage skipped a shard: our bug."""


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
        install(self.store.workspace, self.dir, self.store.stage_dir(self.stage, self.round))
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


def install(workspace: Path, staged: Path, target: Path) -> None:
    """Publish the directory ``staged`` as ``target`` (``<stage>/round=<r>``) in one rename.

    The lease is checked and held (a flock on .lock) through both renames, so a writer that
    lost its lease replaces nothing (data/fence.py). A previous commit is moved aside first;
    the emptied staging directories above ``staged`` are removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with fence.guarded(workspace):
        if target.exists():
            move_to_trash(workspace, target)
        staged.replace(target)
    fsync_dir(target.parent)
    _prune_empty(staged.parent, workspace / STAGING)


def move_to_trash(workspace: Path, target: Path) -> None:
    """Move a committed ``<stage>/round=<r>`` aside (one rename), then delete it."""
    trash = workspace / TRASH
    trash.mkdir(parents=True, exist_ok=True)
    aside = trash / f"{target.parent.name}-{target.name}-{time.time_ns()}"
    target.replace(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _prune_empty(path: Path, stop: Path) -> None:
    while path != stop and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent
