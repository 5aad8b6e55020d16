"""Workspaces on object storage (``workspace: s3://bucket/prefix``, any fsspec URL).

An object store has no rename, so the local store's commit (one directory rename) cannot be
used there. The protocol instead::

    <prefix>/.lock                                      the writer's lease (data/lock.py)
    <prefix>/.staging/<stage>/round=<r>/<key16>-g<token>/   shards of a run in progress
        part-00000.parquet  _shards/part-00000.parquet.json   (marker uploaded after its shard)
    <prefix>/<stage>/round=<r>/<objects>/part-*.parquet a commit's files, never overwritten
    <prefix>/<stage>/round=<r>/_manifest.json           the commit: uploaded last

A single PUT is atomic, so the manifest is either the old one or the new one. ``objects`` is a
fresh prefix per commit (``<key16>-<time>``), recorded in the manifest: a new commit never
writes over the files an older manifest names, and readers follow committed manifests only.
After the new manifest is up, the older commit's objects and the run's staging are deleted.

The computing process keeps a *local working copy* (a normal local workspace, marked by
``.remote.json``): engines and the trainer need local files, and the local store's own staging
and resume machinery stays as it is. :class:`data.store.StageStore` consults the object store
on every look-up: a commit made elsewhere is downloaded (each file checked against its
sha256), a local commit not yet published is published, and an object whose size or ETag no
longer matches the manifest makes the stage a miss, so it is recomputed and republished.
``mpd sql`` and ``mpd status`` read the object store directly, with no local copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import fence
from data.diskfull import naming
from data.errors import is_disk_full
from data.fsutil import atomic_write_json, fsync_dir, removed_on_failure, sha256_file
from data.manifest import MANIFEST, SHARD_MARKERS, STAGING, Manifest
from data.objwrite import FencedWrites, _etag, folder_key, writer_folder
from data.storage_errors import (
    StorageError,
    StorageUnreachableError,
    classify,
    client_errors,
    one_line,
    storage_wait_s,
)

REMOTE_FILE = ".remote.json"  # in a local working copy: {"url": ..., "options": {...}}


def is_url(workspace: str | Path) -> bool:
    """True for ``s3://…``, ``gcs://…``, ``memory://…`` (anything fsspec names by protocol)."""
    return "://" in str(workspace)


def default_cache(url: str) -> Path:
    """Where a URL's local working copy lives unless ``storage.cache`` says otherwise.

    ``$MPD_CACHE_DIR`` (default ``~/.cache/mpd``) ``/workspaces/<readable name>-<sha8>``: the
    same URL on the same machine always finds the same copy, and two URLs never share one.
    """
    base = Path(os.environ.get("MPD_CACHE_DIR") or Path.home() / ".cache" / "mpd")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[1]).strip("-")[:60]
    return base / "workspaces" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


@dataclass
class ObjectStore(FencedWrites):
    """One workspace prefix on an fsspec filesystem: manifests, commits, staging."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import fsspec

        self.url = self.url.rstrip("/")
        try:
            # Listings are never cached: another process (a writer elsewhere, an analyst's
            # rerun) changes the store between two calls of a long-lived process.
            options = {"use_listings_cache": False, **self.options}
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise StorageError(f"workspace {self.url}: {one_line(exc)}") from None
        self.root = root.rstrip("/")

    # -- where --------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def round_path(self, stage: str, round_: int) -> str:
        return self.path(stage, f"round={round_}")

    def object_path(self, man: Manifest, relative: str) -> str:
        parts = (self.round_path(man.stage, man.round), man.objects, relative)
        return "/".join(p for p in parts if p)  # no ``objects``: files beside the manifest

    def object_url(self, man: Manifest, relative: str) -> str:
        """A committed file's URL, as DuckDB (with this filesystem registered) reads it."""
        return self.fs.unstrip_protocol(self.object_path(man, relative))

    def staging_path(self, stage: str, round_: int, folder: str | None = None) -> str:
        base = self.path(STAGING, stage, f"round={round_}")
        return base if folder is None else f"{base}/{folder}"

    # -- reading ------------------------------------------------------------
    def check_reachable(self, wait_s: float | None = None) -> None:
        """Fail with one line when the bucket cannot be listed.

        A missing bucket or a refused request is the user's to fix (:class:`StorageError`, exit
        2). A store that does not answer is retried with backoff (0.5, 1, 2, 4 s ...) for up to
        ``wait_s`` seconds (``$MPD_STORAGE_WAIT_S``, default 15), then
        :class:`StorageUnreachableError` (exit 1). The probe turns botocore's own retries off:
        nested in these, they made a dead endpoint cost 10-20 s before it said anything, and
        then as if the user had made a mistake.
        """
        bucket = self.root.split("/", 1)[0]
        wait = storage_wait_s() if wait_s is None else wait_s
        probe, started, delay, tries = self._probe_fs(), time.monotonic(), 0.5, 0
        while True:
            tries += 1
            try:
                self._call(probe.ls, bucket)
                return
            except FileNotFoundError:
                raise StorageError(
                    f"workspace {self.url}: bucket {bucket!r} does not exist (create it first)"
                ) from None
            except (ValueError, TypeError) as exc:  # the client is built at its first call
                raise StorageError(
                    f"workspace {self.url}: storage.options refused by the store's client "
                    f"({type(exc).__name__}: {one_line(exc)})"
                ) from None
            except StorageUnreachableError as exc:
                elapsed = time.monotonic() - started
                if elapsed + delay > wait:
                    word = "try" if tries == 1 else "tries"
                    raise StorageUnreachableError(
                        f"{exc} ({tries} {word} over {elapsed:.1f} s); is the endpoint right "
                        "(storage.options, AWS_ENDPOINT_URL) and the server up? Run again later"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def _probe_fs(self) -> Any:
        """The filesystem to probe with: for S3, one with botocore's retries off (the caller
        retries) and a short connect timeout (botocore's default waits 60 s)."""
        if not hasattr(self.fs, "call_s3"):
            return self.fs
        import fsspec

        config = {"connect_timeout": 5, **dict(self.options.get("config_kwargs") or {})}
        config["retries"] = {"max_attempts": 1, "mode": "standard"}
        options = {"use_listings_cache": False, **self.options, "config_kwargs": config}
        fs, _ = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **options)
        fs.retries = 1  # s3fs's own retry loop (for timeouts): also the caller's job here
        return fs

    def manifest(self, stage: str, round_: int) -> Manifest | None:
        """The committed manifest, or None when there is none (or it is unreadable)."""
        try:
            raw = self._call(self.fs.cat_file, f"{self.round_path(stage, round_)}/{MANIFEST}")
            return Manifest.from_dict(json.loads(raw))
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            return None

    def committed(self) -> list[Manifest]:
        """Every committed stage run, sorted by round then stage."""
        out = []
        for path in self._call(self.fs.glob, self.path("*", "round=*", MANIFEST)):
            stage, rdir = path.split("/")[-3], path.split("/")[-2]
            round_text = rdir.removeprefix("round=")
            if stage.startswith(".") or not round_text.isdigit():
                continue
            if (man := self.manifest(stage, int(round_text))) is not None:
                out.append(man)
        return sorted(out, key=lambda m: (m.round, m.stage))

    def validate(
        self, stage: str, round_: int, *, deep: bool = True, man: Manifest | None = None
    ) -> list[str]:
        """Problems with the committed objects; empty means valid.

        One listing of the commit's prefix gives every object's size and ETag: a size that
        differs is a truncated or replaced object, and (``deep``) an ETag that differs from
        the one recorded at publication is an object overwritten in place. A store without
        ETags has its objects downloaded and re-hashed instead (``deep`` only). ``man``: the
        manifest when the caller has just read it (one request fewer).
        """
        man = man or self.manifest(stage, round_)
        if man is None:
            return [f"{stage} round {round_}: no readable manifest"]
        listed = self._listing(man)
        problems = []
        for entry in man.files:
            info = listed.get(entry.path)
            if info is None:
                problems.append(f"{stage} round {round_}: missing object {entry.path}")
            elif int(info.get("size", -1)) != entry.bytes:
                problems.append(f"{stage} round {round_}: {entry.path} has the wrong size")
            elif deep and not self._same_contents(man, entry, info):
                problems.append(f"{stage} round {round_}: {entry.path} is corrupt (object changed)")
        return problems

    def partial_runs(self) -> list[tuple[str, int, str, int, int]]:
        """(stage, round, key16, finished shards, their rows) of every run left in staging."""
        runs: dict[tuple[str, int, str], list[int]] = {}
        for marker in self._call(
            self.fs.glob, self.path(STAGING, "*", "round=*", "*", SHARD_MARKERS, "*.json")
        ):
            stage, rdir, folder = marker.split("/")[-5:-2]
            key16 = folder_key(folder)
            try:
                rows = int(json.loads(self._call(self.fs.cat_file, marker)).get("rows", 0))
            except (FileNotFoundError, ValueError):
                continue
            runs.setdefault((stage, int(rdir.removeprefix("round=")), key16), []).append(rows)
        return [(s, r, k, len(v), sum(v)) for (s, r, k), v in sorted(runs.items())]

    def get_object(self, man: Manifest, relative: str, out: Path) -> None:
        """Download one file of commit ``man`` to local path ``out`` (unchecked: the caller
        compares it with the manifest's sha256, as it decides what a mismatch means)."""
        self._call(self.fs.get_file, self.object_path(man, relative), str(out))

    # -- writing (commits: data/objwrite.py) --------------------------------
    def download(self, man: Manifest, target: Path) -> None:
        """Download a commit into local directory ``target`` (made by rename from a temporary
        one), each file checked against the manifest's sha256; raise on a mismatch."""
        tmp = target.parent / f".download-{target.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        # A full local disk: one line, and the partial download removed.
        with naming(target), removed_on_failure(tmp):
            for entry in man.files:
                out = tmp / entry.path
                out.parent.mkdir(parents=True, exist_ok=True)
                self.get_object(man, entry.path, out)
                if out.stat().st_size != entry.bytes or sha256_file(out) != entry.sha256:
                    raise ValueError(
                        f"{man.stage} round {man.round}: {entry.path} is corrupt (sha256)"
                    )
            atomic_write_json(tmp / MANIFEST, man.to_dict())
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
        fsync_dir(target.parent)

    # -- staging ------------------------------------------------------------
    def push_shard(self, stage: str, round_: int, key16: str, shard: Path, marker: Path) -> None:
        """Upload a finished shard, then its marker: a marker up implies its whole shard.

        Fenced in two steps, because a store has no conditional "PUT while my lease holds": the
        lease is read before the uploads (a writer known to be fenced out uploads nothing), and
        again after them. A writer paused between the first read and its PUTs may have lost the
        lease meanwhile; its uploads went to its own folder (``<key16>-g<token>``, never a newer
        writer's), and the second read finds the loss and deletes them again before it raises.
        """
        fenced = fence.fence_of(self.url)
        base = self.staging_path(stage, round_, writer_folder(key16, fenced))
        uploads = [
            (shard, f"{base}/{shard.name}"),
            (marker, f"{base}/{SHARD_MARKERS}/{marker.name}"),
        ]
        with fence.guarded(self.url):  # a writer that lost its lease adds nothing
            for local, remote in uploads:
                self._call(self.fs.put_file, str(local), remote)
        try:
            fence.verify(self.url)
        except fence.LeaseLostError:
            for _, remote in uploads:
                with contextlib.suppress(FileNotFoundError, StorageError):
                    self._call(self.fs.rm_file, remote)
            raise

    def pull_staging(self, stage: str, round_: int, key16: str, local_dir: Path) -> int:
        """Download the shards another process finished for this key; returns how many.

        What resumes a run on another machine (or after the local copy was lost): the local
        writer then checks each shard against its marker, as for its own shards. Every writer's
        folder of the key is read (``<key16>-g<token>``, and ``<key16>`` of a run that held no
        lease), each shard taken once.
        """
        pulled = 0
        pattern = self.staging_path(stage, round_, f"{key16}*/{SHARD_MARKERS}/*.json")
        for marker in sorted(self._call(self.fs.glob, pattern)):
            base = marker.rsplit("/", 2)[0]
            if folder_key(base.rsplit("/", 1)[1]) != key16:
                continue
            name = marker.rsplit("/", 1)[1]
            local_marker = local_dir / SHARD_MARKERS / name
            if local_marker.exists():
                continue
            shard = name.removesuffix(".json")
            tmp = local_dir / f".{shard}.tmp-pull"
            try:
                with naming(local_dir / shard), removed_on_failure(tmp):
                    self._call(self.fs.get_file, f"{base}/{shard}", str(tmp))
            except FileNotFoundError:  # deleted since the listing (its run committed)
                continue
            tmp.replace(local_dir / shard)
            local_marker.parent.mkdir(parents=True, exist_ok=True)
            local_marker.write_bytes(self._call(self.fs.cat_file, marker))
            pulled += 1
        return pulled

    def drop_staging(self, stage: str, round_: int, *, keep: str | None = None) -> None:
        """Delete the staging of ``(stage, round_)`` (every key's, or all but key16 ``keep``'s).
        Fenced: a writer that lost its lease must not delete the shards its successor is
        writing, and a folder a newer writer uploaded is left alone, whenever this runs."""
        fenced = fence.fence_of(self.url)
        with fence.guarded(self.url):
            self._drop_dirs(
                self.staging_path(stage, round_),
                keep=keep,
                upto=None if fenced is None else fenced.token,
            )

    # -- internals ----------------------------------------------------------
    def _listing(self, man: Manifest) -> dict[str, dict[str, Any]]:
        base = f"{self.round_path(man.stage, man.round)}/{man.objects}"
        try:
            found = self._call(self.fs.find, base, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(base) + 1 :]: info for path, info in found.items()}

    def _same_contents(self, man: Manifest, entry: Any, info: dict[str, Any]) -> bool:
        if entry.etag and _etag(info):
            return _etag(info) == entry.etag
        data = self._call(self.fs.cat_file, self.object_path(man, entry.path))
        return hashlib.sha256(data).hexdigest() == entry.sha256

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One filesystem call, its failure told apart by meaning: a store that did not answer
        is transient (:class:`StorageUnreachableError`, retried), a refused request the user's
        (:class:`StorageError`), both one line; a full local disk (a download) is left for the
        caller, which knows the local path."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except client_errors() as exc:  # OSError, and the installed clients' own bases
            if is_disk_full(exc) or (error := classify(exc, self.url, self.options)) is None:
                raise
            raise error from None


def attached(workspace: Path) -> ObjectStore | None:
    """The object store a local working copy belongs to (its ``.remote.json``), or None."""
    try:
        raw = json.loads((Path(workspace) / REMOTE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return ObjectStore(raw["url"], raw.get("options") or {})


def attach(workspace: Path, url: str, options: dict[str, Any] | None = None) -> ObjectStore:
    """Mark ``workspace`` as the local working copy of ``url``; check the store answers."""
    store = ObjectStore(url, dict(options or {}))
    store.check_reachable()
    body = {"url": store.url, "options": store.options}
    marker = Path(workspace) / REMOTE_FILE
    current = None
    with contextlib.suppress(OSError, ValueError):
        current = json.loads(marker.read_text())
    if current is not None and current.get("url") != store.url:
        raise StorageError(
            f"local copy {workspace} belongs to {current.get('url')}, not {store.url}; "
            "give another storage.cache directory"
        )
    if current != body:
        atomic_write_json(marker, body)
    return store
