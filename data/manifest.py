"""A committed stage run's manifest: what the store writes last and every reader follows.

Shared by the local store (:mod:`data.store`) and object storage (:mod:`data.objstore`).
``objects`` is empty for a local commit (the files lie in the round directory); on object
storage it names the commit's own prefix inside the round directory, so a new commit never
overwrites the objects an older manifest names (there is no rename to swap them atomically).
``etag`` is the object store's checksum of a file when it was published: comparing it with a
listing finds an object replaced in place without downloading it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST = "_manifest.json"
SHARD_MARKERS = "_shards"
STAGING = ".staging"
TRASH = ".trash"


@dataclass
class FileEntry:
    path: str
    bytes: int
    sha256: str
    rows: int | None = None
    etag: str | None = None


@dataclass
class Manifest:
    stage: str
    round: int
    key: str
    files: list[FileEntry]
    rows: int
    started_at: float
    finished_at: float
    duration_s: float
    code_version: str
    resumed_shards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    objects: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        files = [FileEntry(**f) for f in raw.pop("files")]
        return cls(files=files, **raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
