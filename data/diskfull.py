"""A full disk as one line: which path could not be written, how much room its filesystem has
left, and what in the workspace may be removed to make room.

A full disk in the middle of a night's run used to print every layer's traceback (torch's zip
writer, the trainer, the stage task, Prefect's flow engine, the cleanup writes that failed on
the same disk: 335 lines). It is not a bug and not the user's input: the kind is
:class:`data.errors.ResourceError` (exit 1, not retried; see there). What the user needs is
the path, the filesystem and what to free, for example::

    mpd: error: disk full writing runs/x/.staging/train/round=1/f34a95b866f17a11/checkpoints:
    tmpfs at /mnt/ws has 4.0 kB free of 40.0 MB; free space there (runs/x/.staging: 1.2 MB,
    unfinished work the next run would redo), then run again: finished shards and
    checkpoints are kept

(one line). Writers that leave a partial file behind remove it before raising, so the failure
itself does not keep the disk full, and the next run resumes from what was finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from data.errors import ResourceError, is_disk_full
from data.manifest import STAGING, TRASH


class DiskFullError(ResourceError):
    """No room left on the filesystem (or quota) of a path mpd writes: one line, exit 1."""


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """Turn a full disk met inside the block into a :class:`DiskFullError` naming ``path``.

    An error already named by an inner block (a more precise path) passes through unchanged.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:  # boundary: a full disk arrives as any library's exception
        if not is_disk_full(exc):  # (DuckDB's, torch's zip writer's); all else re-raised as is
            raise
        raise disk_full_error(path, exc) from None


def disk_full_error(path: Path | str, exc: BaseException | None = None) -> DiskFullError:
    """The one-line error for a write to ``path`` that found no room."""
    path = Path(path)
    what = "disk quota exceeded" if _errno(exc) == errno.EDQUOT else "disk full"
    mount = mount_point(path)
    room = ""
    with contextlib.suppress(OSError):
        st = os.statvfs(mount)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        room = f" has {human_size(free)} free of {human_size(total)}"
    removable = "; ".join(
        f"{p}: {human_size(size)}, {why}" for p, size, why in _removable(path) if size
    )
    hint = f" ({removable})" if removable else ""
    return DiskFullError(
        f"{what} writing {path}: {_device(mount)} at {mount}{room}; free space there{hint}, "
        "then run again: finished shards and checkpoints are kept"
    )


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        dev = path.stat().st_dev
        while path != path.parent and path.parent.stat().st_dev == dev:
            path = path.parent
    except OSError:
        pass
    return path


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _errno(exc: BaseException | None) -> int | None:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def _device(mount: Path) -> str:
    """The device (or filesystem name, e.g. ``tmpfs``) mounted at ``mount``, from the mount
    table; "the filesystem" where there is none to read."""
    found = "the filesystem"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                found = fields[0]  # the last mount over a point is the one in use
    return found


def _workspace_of(path: Path) -> Path | None:
    """The workspace a path lies in: the parent of its ``.staging``, or the nearest parent
    holding ``run.yaml``."""
    parts = Path(os.path.abspath(path)).parts
    if STAGING in parts:
        return Path(*parts[: parts.index(STAGING)])
    for parent in Path(*parts).parents:
        if (parent / "run.yaml").is_file():
            return parent
    return None


def _removable(path: Path) -> list[tuple[Path, int, str]]:
    """What mpd itself left in the workspace that may be deleted, with its size."""
    ws = _workspace_of(path)
    if ws is None:
        return []
    return [
        (ws / TRASH, _tree_size(ws / TRASH), "safe to delete"),
        (ws / STAGING, _tree_size(ws / STAGING), "unfinished work the next run would redo"),
    ]


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
