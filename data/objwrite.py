"""An object store's commits, fenced (data/fence.py): publish, retract, and their deletes.

The commit protocol itself is data/objstore.py's docstring. What this part adds is that a
writer whose lease is no longer current changes nothing committed:

- the manifest PUT, the commit, is conditional: ``If-Match`` on the ETag the manifest had
  *before* the lease was read back and found ours (``If-None-Match: *`` when there was none).
  A newer writer's commit of the same stage in between makes the PUT fail; one after it
  replaces ours, as a newer commit should;
- a commit's folder carries its writer's token (``<key16>-g<token>-<time>``), and a delete
  removes only folders whose token is not newer than the deleter's: the lease check before a
  delete and the delete are two requests (S3 has no conditional delete of a prefix), so a
  writer paused between them may run after a takeover, and must then still find nothing of
  the newer writer's that it may delete;
- staging deletes and uploads are preceded by the lease check (check, then act: staging is not
  committed, and a writer paused in that gap costs at worst a shard recomputed).

Stores without conditional writes (not S3) get check-then-act everywhere (:meth:`put_if`).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data import fence
from data.manifest import MANIFEST, Manifest
from data.storage_errors import StorageError


class FencedWrites:
    """The writing half of :class:`data.objstore.ObjectStore` (a mixin: it uses the store's
    ``fs``, ``url``, paths and ``_call``)."""

    url: str
    fs: Any

    if TYPE_CHECKING:  # provided by ObjectStore

        def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...
        def round_path(self, stage: str, round_: int) -> str: ...
        def staging_path(self, stage: str, round_: int, folder: str | None = None) -> str: ...
        def object_path(self, man: Manifest, relative: str) -> str: ...
        def _listing(self, man: Manifest) -> dict[str, dict[str, Any]]: ...

    def publish(self, man: Manifest, local_dir: Path) -> Manifest:
        """Upload a local commit's files under a fresh prefix, then its manifest (the commit).

        Returns the manifest as published (``objects`` and each file's ETag filled in); the
        older commit's objects and the run's staging are deleted after the manifest is up.
        Fenced (data/fence.py): with the lease lost, nothing is published or deleted.
        """
        fenced = fence.fence_of(self.url)
        token = None if fenced is None else fenced.token
        objects = f"{writer_folder(man.key[:16], fenced)}-{time.time_ns():x}"
        published = Manifest.from_dict({**man.to_dict(), "objects": objects})
        fence.check(self.url)
        try:
            for entry in published.files:
                self._call(
                    self.fs.put_file,
                    str(local_dir / entry.path),
                    self.object_path(published, entry.path),
                )
            listed = self._listing(published)
            for entry in published.files:
                entry.etag = _etag(listed.get(entry.path, {}))
            body = (json.dumps(published.to_dict(), indent=2, sort_keys=True) + "\n").encode()
            self._put_manifest(published, body, fenced=fenced is not None)
        except fence.LeaseLostError:
            # Fenced out after uploading: the folder is this writer's own (fresh name, its
            # token), named by no manifest, so taking it back can touch no one else's files.
            with contextlib.suppress(FileNotFoundError, StorageError):
                self._call(
                    self.fs.rm, f"{self.round_path(man.stage, man.round)}/{objects}", recursive=True
                )
            raise
        with fence.guarded(self.url):
            self._drop_dirs(self.round_path(man.stage, man.round), keep=objects, upto=token)
            self._drop_dirs(self.staging_path(man.stage, man.round), keep=None, upto=token)
        return published

    def _put_manifest(self, man: Manifest, body: bytes, *, fenced: bool) -> None:
        """The commit: one PUT. Fenced, it is conditional on the manifest read before the
        lease check, so a newer writer's commit of this stage in between is never replaced."""
        path = f"{self.round_path(man.stage, man.round)}/{MANIFEST}"
        if not fenced:
            self._call(self.fs.pipe_file, path, body)
            return
        etag = self.etag_of(path)
        with fence.guarded(self.url):
            if self.put_if(path, body, etag=etag) is None:
                raise fence.LeaseLostError(
                    f"{man.stage} round {man.round} in {self.url} was committed by another "
                    "writer while this run published it: this run's lease is no longer current; "
                    "it stopped without replacing or deleting anything"
                )

    def put_if(self, path: str, body: bytes, *, etag: str | None) -> str | None:
        """PUT ``body`` at ``path`` only if the object still has ETag ``etag`` (None: only if
        there is no object); the new ETag, or None when the condition failed.

        S3 (and moto, MinIO) evaluate ``If-Match`` / ``If-None-Match: *`` atomically with the
        write. Other fsspec stores have no conditional write: an exclusive create where the
        store has one, else the ETag is compared and then the object written (check, then act).
        """
        fs = self.fs
        if hasattr(fs, "call_s3"):
            bucket, key, _ = fs.split_path(path)
            condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": f'"{etag}"'}
            try:
                out = self._call(
                    fs.call_s3, "put_object", Bucket=bucket, Key=key, Body=body, **condition
                )
            except (FileExistsError, StorageError) as exc:
                if isinstance(exc, FileExistsError) or "pre-condition" in str(exc):
                    return None
                raise
            return str(out.get("ETag", "")).strip('"') or None
        try:
            if etag is None:
                with fs.open(path, "xb") as fh:
                    fh.write(body)
            elif self.etag_of(path) != etag:
                return None
            else:
                self._call(fs.pipe_file, path, body)
        except FileExistsError:
            return None
        return self.etag_of(path)

    def etag_of(self, path: str) -> str | None:
        """An object's ETag (a store without ETags: its mtime), or None when there is none."""
        try:
            info = self._call(self.fs.info, path)
        except FileNotFoundError:
            return None
        return _etag(info) or (str(info["mtime"]) if info.get("mtime") else None)

    def retract(self, stage: str, round_: int) -> bool:
        """Uncommit (``mpd rerun``): the manifest first, so no reader follows it, then objects.
        Fenced: checked against the lease just before (the store has no conditional delete)."""
        manifest = f"{self.round_path(stage, round_)}/{MANIFEST}"
        if not self._call(self.fs.exists, manifest):
            return False
        fenced = fence.fence_of(self.url)
        with fence.guarded(self.url):
            self._call(self.fs.rm_file, manifest)
            upto = None if fenced is None else fenced.token
            self._drop_dirs(self.round_path(stage, round_), keep=None, upto=upto)
        return True

    def _drop_dirs(self, path: str, *, keep: str | None, upto: int | None = None) -> None:
        """Delete every directory directly under ``path`` except ``keep`` (a folder's name, or
        a key16: every writer's staging folder of that key; None: delete all).

        ``upto``: the deleting writer's fencing token; a commit's or staging folder that a
        writer with a newer token uploaded (``<key16>-g<token>[-<time>]``) is left alone,
        whenever this runs.
        """
        try:
            entries = self._call(self.fs.ls, path, detail=True, refresh=True)
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry["name"].rstrip("/")
            base = name.rsplit("/", 1)[1]
            if entry.get("type") != "directory" or keep in (base, folder_key(base)):
                continue
            if upto is not None and objects_token(base) > upto:
                continue
            self._call(self.fs.rm, name, recursive=True)


def writer_folder(key16: str, fenced: fence.Fence | None) -> str:
    """A writer's folder for a run of key ``key16``: the key and its lease's token
    (``<key16>-g<token>``; ``<key16>`` for a process that holds no lease). A commit's objects
    folder adds its time; a staging folder is this. A writer fenced out late therefore never
    writes into its successor's folder, and deletes can spare newer tokens' folders."""
    return key16 if fenced is None else f"{key16}-g{fenced.token}"


def folder_key(folder: str) -> str:
    """The run key (key16) a commit's or staging folder belongs to, whatever writer made it."""
    return folder.split("-", 1)[0]


def objects_token(objects: str) -> int:
    """The fencing token a commit's or staging folder's name carries (0: none, a writer that
    held no lease or named it before tokens existed)."""
    match = re.fullmatch(r"[0-9a-f]{16}-g(\d+)(-[0-9a-f]+)?", objects)
    return int(match.group(1)) if match else 0


def _etag(info: dict[str, Any]) -> str | None:
    value = info.get("ETag") or info.get("etag")
    return str(value).strip('"') if value else None
