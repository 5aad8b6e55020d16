"""Small durable-write helpers: write to a temporary name, fsync, rename.

A rename within one filesystem is atomic, so a reader (DuckDB, a resumed run)
sees either the old file or the whole new one, never a prefix. The fsync before
the rename makes the same hold after a power loss, not only after a kill. A write that fails
(a full disk) removes its temporary file, so the failure does not keep the disk full.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
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


@contextlib.contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """Remove ``tmp`` (a file or a directory being written) if the block fails in any way: an
    error, a full disk, Ctrl-C, a stop signal raised as an exception. The failure itself goes on
    unchanged: this only makes sure no half-written file outlives the write that made it.

    Put it inside :func:`data.diskfull.naming`, so that the free space a full disk reports is
    measured once the partial file is gone (what the next try will have).
    """
    try:
        yield
    except BaseException:  # boundary: undo the partial write, then re-raised unchanged
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming(path), removed_on_failure(tmp), open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
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
