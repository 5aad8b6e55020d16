"""The stage store: a workspace's committed stage runs: look-up, validation, sharing, rerun.

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
rest; a restart with a different key starts clean and cannot mix inputs. Writing a run
(staging, shards, the commit) is ``data/stage_writer.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from data import fence
from data.fsutil import atomic_write_json, sha256_file
from data.manifest import MANIFEST, SHARD_MARKERS, STAGING, Manifest
from data.objstore import attached
from data.stage_writer import StageWriter, install, move_to_trash

log = logging.getLogger("mpd.store")


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
        install(self.workspace, tmp, self.stage_dir(stage, round_))
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
            move_to_trash(self.workspace, target)
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


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A damaged remote commit is looked up twice per stage (Prefect's cache check, then the
    stage): one warning is enough."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)
