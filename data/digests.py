"""Content digests of input files and model directories, remembered across runs.

A stage key names its input files (a problem file, a filter's SQL, the world's assets, a model's
weights) by their content, never by their path: edit a problem file in place and the problems
stage recomputes. Hashing a 16 GB teacher every night would cost minutes, so each file's sha256
is kept in a small cache entry beside the stat it was computed under::

    <cache>/digests/3f2a9c1b….json
    {"path": "/data/gsm.jsonl", "size": 4812, "mtime_ns": 1733…, "ctime_ns": 1733…,
     "ino": 918273, "sha256": "9b1c…"}

and trusted only while the file's size, mtime, ctime and inode are all unchanged. ctime is set
by the kernel on every write and cannot be put back by ``touch``/``cp -p``/``rsync -t``, so a
file rewritten with the same size and an old mtime is still re-hashed, and a file changed in
the last two seconds is not remembered at all (an edit in the same clock tick could leave every
timestamp as it was). A changed file costs one re-hash, never a stale digest. The cache lives in ``$MPD_CACHE_DIR`` when that is set,
else in the workspace (``.mpd/cache``): a run never trusts a cache it did not choose. An entry
that cannot be read or written (a read-only workspace, a full disk) is ignored: the cache saves
time, it never fails a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

_MEMO: dict[tuple[str, int, int, int, int], str] = {}  # this process's digests, by stat
RACY_NS = 2_000_000_000  # a file changed more recently than this is hashed, not remembered
_LOCK = threading.Lock()


def cache_dir(workspace: Path | str | None) -> Path | None:
    """Where digests are remembered: ``$MPD_CACHE_DIR``, else ``<workspace>/.mpd/cache``."""
    if env := os.environ.get("MPD_CACHE_DIR"):
        return Path(env).expanduser()
    return Path(workspace) / ".mpd" / "cache" if workspace is not None else None


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _entry_path(cache: Path, file: Path) -> Path:
    return cache / "digests" / f"{hashlib.sha256(str(file).encode()).hexdigest()[:32]}.json"


def read_entry(path: Path) -> dict | None:
    """A cache entry, or None when it is missing or unreadable (torn, foreign, a directory)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def write_entry(path: Path, entry: dict) -> None:
    """Write a cache entry atomically (a unique temporary name, then a rename); failure is
    ignored: a lost entry is a re-hash next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".entry-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(entry, fh, sort_keys=True)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def file_digest(path: Path | str, cache: Path | None = None) -> str:
    """The sha256 of a file's content, from the cache while its stat is unchanged."""
    file = Path(path).resolve()
    st = file.stat()
    memo = (str(file), *_stamp(st))
    with _LOCK:
        if memo in _MEMO:
            return _MEMO[memo]
    where = _entry_path(cache, file) if cache is not None else None
    entry = read_entry(where) if where is not None else None
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    stamp["ino"] = st.st_ino
    if (
        entry
        and entry.get("path") == str(file)
        and all(entry.get(k) == v for k, v in stamp.items())
    ):
        digest = str(entry["sha256"])
    else:
        h = hashlib.sha256()
        with open(file, "rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
        digest = h.hexdigest()
        if _stamp(file.stat()) != _stamp(st) or _racy(st):  # written while read, or just now
            return digest
        if where is not None:
            write_entry(where, {"path": str(file), **stamp, "sha256": digest})
    with _LOCK:
        _MEMO[memo] = digest
    return digest


def _racy(st: os.stat_result) -> bool:
    """A file changed within the last ``RACY_NS``: not remembered. Timestamps advance in
    clock ticks (milliseconds on many filesystems), so a second edit in the same tick could
    leave size, mtime and ctime as they were; a file that old cannot be edited in the past tick
    (git's "racy clean" rule)."""
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS


def tree_digest(path: Path | str, cache: Path | None = None) -> str:
    """Digest of a file's content, or of a directory's files (relative names and contents).

    A model directory's identity: the same weights, tokenizer and config give the same digest
    wherever they lie (a workspace's bootstrap copy of the shipped world, a copied checkpoint).
    Hidden files and folders are not part of it: ``huggingface-cli download --local-dir`` leaves
    per-download metadata under ``.cache/``, which no loader reads and which differs between
    two downloads of the same weights (a commit leaves hidden files out too, data/store.py).
    """
    path = Path(path)
    if not path.is_dir():
        return file_digest(path, cache)  # its content: a file moved or renamed is the same input
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .cache/huggingface/ of a download, .DS_Store: no loader reads them
        h.update(f"{rel.as_posix()}\0{file_digest(file, cache)}\n".encode())
    return h.hexdigest()
