"""Small durable-write helpers: write to a temporary name, fsync, rename.

A rename within one filesystem is atomic, so a reader (DuckDB, a resumed run)
sees either the old file or the whole new one, never a prefix. The fsync before
the rename makes the same hold after a power loss, not only after a kill. A write that fails
(a full disk) removes its temporary file, so the failure does not keep the disk full.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from data.diskfull import naming


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming(path):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
