"""Object-storage faults, by meaning: a second writer is the user's to wait for (exit 2, before
Prefect starts), a store that does not answer is transient (retried, then one line naming the
endpoint, exit 1), and a damaged lease object names no holder.

Against the real S3-compatible server of ``tests/test_objstore.py`` (moto's server mode, started
by ``scripts/s3-server.sh``); an unreachable store is a 127.0.0.1 port nobody listens on. Each
CLI row is the real ``mpd`` in a subprocess with a fresh ``MPD_CACHE_DIR`` (a machine that has
never seen the workspace), and none of them gets as far as starting Prefect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.errors import is_retried, kind_of
from data.hostid import identity
from data.lock import ObjectLease, WorkspaceBusyError, WorkspaceLock
from data.manifest import FileEntry, Manifest
from data.objstore import ObjectStore, attach, default_cache
from tests.conftest import REPO, free_port
from tests.fencing import other_machine
from tests.test_objstore import BUCKET, held, s3  # noqa: F401  (the S3 server fixture)

MACHINE_A = {"pid": 1, "host": "elsewhere", "command": "mpd run (machine A)"}


def _live_lease(url: str) -> None:
    store = ObjectStore(url)
    body = {**MACHINE_A, "started": "02:00", "expires": time.time() + 600}
    store.fs.pipe_file(store.path(".lock"), json.dumps(body).encode())


def _nothing(url: str) -> None:
    pass


# (case id, prepare the bucket, argv (URL for {url}), the store is unreachable, exit code,
# texts the one error line must contain ({port}: the unreachable port))
CASES: list[tuple[str, Callable[[str], None], list[str], bool, int, list[str]]] = [
    ("a second writer on a fresh working copy", _live_lease, ["run", "-w", "{url}", "--rounds", "1"],
     False, 2, ["is in use by pid 1 on elsewhere", "machine A"]),
    ("run with the store unreachable", _nothing, ["run", "-w", "{url}", "--rounds", "1"], True, 1,
     ["object store http://127.0.0.1:{port} ", "did not answer", "tries over"]),
    ("status with the store unreachable", _nothing, ["status", "-w", "{url}"], True, 1,
     ["object store http://127.0.0.1:{port} ", "did not answer"]),
    ("sql with the store unreachable", _nothing, ["sql", "-w", "{url}", "select 1"], True, 1,
     ["object store http://127.0.0.1:{port} ", "did not answer"]),
    ("rerun where nothing was computed", _nothing,
     ["rerun", "-w", "{url}", "--round", "3", "--from", "filter"], False, 2,
     ["nothing computed yet", "s3://"]),
]  # fmt: skip
WAIT_S = 2.0  # $MPD_STORAGE_WAIT_S for the rows: how long an unreachable store is retried


@pytest.mark.parametrize(
    ("prepare", "argv", "unreachable", "code", "texts"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_object_storage_fault_is_one_line(
    s3: dict[str, str],  # noqa: F811
    tmp_path: Path,
    prepare: Callable[[str], None],
    argv: list[str],
    unreachable: bool,
    code: int,
    texts: list[str],
) -> None:
    url = f"s3://{BUCKET}/{tmp_path.name}"
    prepare(url)
    store = ObjectStore(url)
    before = {p: store.fs.info(p)["ETag"] for p in store.fs.find(store.root)}
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MPD_CACHE_DIR": str(tmp_path / "cache"),
        "MPD_STORAGE_WAIT_S": str(WAIT_S),
    }
    if unreachable:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", *(a.format(url=url) for a in argv)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    seconds = time.monotonic() - started
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "prefect" not in out.stderr.lower(), out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("mpd: error:"), line
    for text in texts:
        assert text.format(port=port) in line, line
    # Refused before Prefect: the time of imports and a request or two; retried for WAIT_S.
    assert seconds < (WAIT_S + 8 if unreachable else 8), seconds
    after = {p: store.fs.info(p)["ETag"] for p in store.fs.find(store.root)}
    assert after == before, "nothing was written to the bucket"
    if argv[0] != "rerun":  # refused before the working copy is made (a rerun checks after)
        assert not (tmp_path / "cache").exists(), "nothing was written on this machine"


def _fresh(cache: Path, url: str) -> None:
    pass


def _working_copy(cache: Path, url: str) -> None:
    """A working copy this machine made in an earlier run (released its lease cleanly)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPD_CACHE_DIR", str(cache))
        copy = default_cache(url)
    copy.mkdir(parents=True)
    attach(copy, url)
    WorkspaceLock(copy, command="mpd run (earlier)").acquire().release()


def _killed_here(cache: Path, url: str) -> None:
    """A working copy whose local lease names a run of this machine that was killed."""
    _working_copy(cache, url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPD_CACHE_DIR", str(cache))
        lock = default_cache(url) / ".lock"
    gone = other_machine("mpd run (killed)")
    lock.write_text(json.dumps({**gone, **identity(), "pid": gone["pid"], "expires": 1e12}))


@pytest.mark.parametrize(
    "cache_holds",
    [_fresh, _working_copy, _killed_here],
    ids=["nothing", "a working copy", "a killed run's local lease"],
)
def test_fencing_early_refusal_before_prefect_whatever_the_cache_holds(
    s3: dict[str, str],  # noqa: F811
    tmp_path: Path,
    cache_holds: Callable[[Path, str], None],
) -> None:
    """A live lease on the bucket, held by another machine with this one's host name (its pid
    names no process here), refuses ``mpd run`` in one line before Prefect starts, whatever
    this machine's cache holds; nothing is written to the bucket or the cache."""
    url = f"s3://{BUCKET}/{tmp_path.name}"
    store = ObjectStore(url)
    cache = tmp_path / "cache"
    cache_holds(cache, url)
    body = {**other_machine("mpd run (machine B)"), "expires": time.time() + 600}
    store.fs.pipe_file(store.path(".lock"), json.dumps({**body, "generation": 7}).encode())
    before = {p: store.fs.info(p)["ETag"] for p in store.fs.find(store.root)}
    files = sorted((p.as_posix(), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPD_CACHE_DIR": str(cache)}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "-w", url, "--rounds", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "prefect" not in out.stderr.lower(), out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "is in use by pid" in line and "(machine bbbbbbbb, boot other-bo)" in line, line
    assert seconds < 8, seconds
    assert {p: store.fs.info(p)["ETag"] for p in store.fs.find(store.root)} == before
    assert sorted((p.as_posix(), p.stat().st_mtime_ns) for p in cache.rglob("*")) == files


# (case id, the lease object's body, whether it is taken over (else: a live holder, refused))
LEASES: list[tuple[str, bytes, bool]] = [
    ("a JSON list", b"[1, 2]", True),
    ("a JSON string", b'"mpd"', True),
    ("an expiry that is not a number", json.dumps({**MACHINE_A, "expires": "soon"}).encode(),
     True),
    ("an expiry past the end of time", json.dumps({**MACHINE_A, "expires": 1e300}).encode(),
     False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "taken_over"), [c[1:] for c in LEASES], ids=[c[0] for c in LEASES]
)
def test_a_damaged_lease_object(
    s3: dict[str, str],  # noqa: F811
    tmp_path: Path,
    body: bytes,
    taken_over: bool,
) -> None:
    """A lease object mpd did not write (mpd PUTs whole JSON records) names no live holder: it
    is taken over like an expired one; one that names a holder is refused in one line."""
    url = f"s3://{BUCKET}/{tmp_path.name}"
    store = ObjectStore(url)
    store.fs.pipe_file(store.path(".lock"), body)
    local = tmp_path / "copy"
    local.mkdir()
    attach(local, url)
    if not taken_over:  # refused by the check before Prefect, and by the lock itself
        with pytest.raises(WorkspaceBusyError, match="is in use by pid 1 on elsewhere"):
            ObjectLease(store, {}).check_free()
        with pytest.raises(WorkspaceBusyError, match="is in use by pid 1 on elsewhere"):
            WorkspaceLock(local).acquire()
        return
    ObjectLease(store, {}).check_free()
    with WorkspaceLock(local, command="mpd run (machine B)"):
        assert "machine B" in json.loads(store.fs.cat_file(store.path(".lock")))["command"]
    assert not held(store), "released"


def test_a_store_gone_during_a_commit_is_transient(
    s3: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The store stops answering while a commit is published: a transient failure (the stage
    task retries it; then exit 1), not a user mistake (exit 2, never retried), and the commit
    readers follow is the previous one, whole."""
    url = f"s3://{BUCKET}/{tmp_path.name}"
    local = tmp_path / "round"
    local.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), local / "part-00000.parquet")
    size = (local / "part-00000.parquet").stat().st_size
    man = Manifest(
        "sample", 1, "a" * 64, [FileEntry("part-00000.parquet", size, "", 2)], 2, 0, 0, 0, "t"
    )
    first = ObjectStore(url).publish(man, local)
    port = free_port()
    gone = ObjectStore(
        url,
        {
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
            "config_kwargs": {"retries": {"max_attempts": 1}},
        },
    )
    second = Manifest.from_dict({**man.to_dict(), "key": "b" * 64})
    with pytest.raises(Exception) as caught:  # its kind is what is checked
        gone.publish(second, local)
    assert kind_of(caught.value) == "transient" and is_retried(caught.value), repr(caught.value)
    assert f"object store http://127.0.0.1:{port} " in str(caught.value)
    live = ObjectStore(url)
    assert live.manifest("sample", 1).objects == first.objects
    assert not live.validate("sample", 1, deep=True)
