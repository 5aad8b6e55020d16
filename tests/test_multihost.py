"""Separate hosts simulated on this machine: Dask workers that cannot see the flow's disk.

The flow (an ``mpd run`` subprocess) keeps everything it has on this machine under one
directory (``flow/``: its local workspace, its cache with the ``s3://`` workspace's working
copy). Each Dask worker runs in its own mount namespace (``unshare --mount``), where an empty
tmpfs lies over ``flow/``: what a worker on another host sees of the flow's files, i.e. nothing.
A worker has its own cache (``$MPD_CACHE_DIR``) and reaches the workspace only through the
store: the S3 server (moto, ``scripts/s3-server.sh``, the object-storage tests' fixture).

A one-round campaign with an ``s3://`` workspace on that cluster, one worker killed with
SIGKILL in the middle of a shard, commits samples, rewrites, scores and evaluations identical
to a threads run on local disk; the surviving worker fetched each model it served (the
bootstrap student, the round's trained student) from the store into its cache, once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from data.objstore import ObjectStore, attach
from data.store import StageStore
from tests.conftest import free_port
from tests.test_campaign import ENV, REPO, command, ok, sets, table
from tests.test_objstore import BUCKET, s3  # noqa: F401 (the S3 server fixture, reused)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

COMPARED = [("sample", 1), ("rewrite", 1), ("score", 1), ("eval", 0), ("eval", 1)]


def namespace_prefix(hidden: Path) -> list[str]:
    """The command prefix that runs a process with ``hidden`` replaced by an empty tmpfs.

    As root, a plain mount namespace; otherwise an unprivileged user namespace (root inside it
    only), which most Linux CI runners allow. Checked here, so a refusal fails with its reason.
    """
    mount = f"mount -t tmpfs -o size=1m,mode=000 none {hidden}"
    for prefix in (
        ["unshare", "--mount", "--propagation", "private"],
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
    ):
        probe = subprocess.run(
            [*prefix, "sh", "-c", f"{mount} && test ! -e {hidden}/workspace"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            return prefix
    pytest.fail(f"no mount namespace can hide the flow's files here: {probe.stderr.strip()}")


@contextlib.contextmanager
def cluster(base: Path, hidden: Path, s3_env: dict[str, str]) -> Iterator[str]:
    """A Dask scheduler and two workers (no nanny: a killed worker stays dead), each worker
    in a mount namespace that hides ``hidden``; yields the scheduler's address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen] = []
    logs = []
    prefix = namespace_prefix(hidden)
    try:
        scheduler = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        log = open(base / "scheduler.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [*scheduler, "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        for n in range(2):
            own = base / f"worker-{n}"
            own.mkdir()
            worker_env = {**env, **s3_env, "HOME": str(own), "MPD_CACHE_DIR": str(own / "cache")}
            worker_env.pop("PREFECT_API_URL", None)  # a worker needs no Prefect
            python = f"{sys.executable} -m distributed.cli.dask_worker {address}"
            flags = "--nthreads 1 --no-nanny --no-dashboard --death-timeout 60"
            log = open(own / "worker.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            script = f"mount -t tmpfs -o size=1m,mode=000 none {hidden} && exec {python} {flags}"
            procs.append(
                subprocess.Popen(
                    [*prefix, "sh", "-c", script],
                    env=worker_env,
                    cwd=own,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        yield address
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def worker_view(client: object, hidden: Path) -> dict:
    """Per worker: whether it sees the flow's files, and the models it fetched so far."""

    def look(hidden: str = str(hidden)) -> dict:
        fetch = sys.modules.get("data.model_fetch")  # loaded with the first engine handle
        return {
            "sees_flow": os.path.exists(os.path.join(hidden, "workspace")),
            "fetched": sorted(str(m) for m in fetch._FETCHED) if fetch else [],
            "cache": os.environ["MPD_CACHE_DIR"],
            "pid": os.getpid(),
        }

    return client.run(look)  # type: ignore[attr-defined]


def kill_a_busy_worker(client: object, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first worker seen running a shard, a moment into it."""
    pids = client.run(os.getpid)  # type: ignore[attr-defined]
    while not stop.is_set() and not killed:
        busy = [a for a, keys in client.processing().items() if keys]  # type: ignore[attr-defined]
        if busy:
            time.sleep(0.5)  # inside the shard's generation, not before it
            os.kill(pids[busy[0]], signal.SIGKILL)
            killed.append(pids[busy[0]])
        time.sleep(0.05)


def rows(ws: Path, stage: str, round_: int) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in table(ws, stage, round_).to_pylist())


def bucket_rows(url: str, reader: Path, stage: str, round_: int) -> list[str]:
    """A committed stage as a fresh machine reads it from the bucket (downloaded, checked)."""
    man = ObjectStore(url).manifest(stage, round_)
    assert man is not None, f"{stage} round {round_} is not committed in {url}"
    assert StageStore(reader).lookup(stage, round_, man.key) is not None
    return rows(reader, stage, round_)


def test_multihost_workers_without_the_flows_disk_commit_the_threads_rows(
    s3: dict[str, str],  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    from distributed import Client

    flow = tmp_path / "flow"  # everything the flow host has: hidden from the workers
    (flow / "workspace").mkdir(parents=True)
    flow.chmod(0o700)
    url = f"s3://{BUCKET}/multihost"
    flow_env = {**os.environ, **ENV, **s3, "MPD_CACHE_DIR": str(flow / "cache")}

    def mpd(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command(*args), capture_output=True, text=True, cwd=REPO, env=flow_env, timeout=600
        )

    with cluster(tmp_path, flow, s3) as address:
        client = Client(address, timeout=60)
        client.wait_for_workers(2, timeout=120)
        assert not any(v["sees_flow"] for v in worker_view(client, flow).values())
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(target=kill_a_busy_worker, args=(client, killed, stop))
        killer.start()
        try:
            dask = [*sets(), "--set", "runner.kind=dask", "--set", f"runner.address={address}"]
            ok(mpd("run", "-w", url, "--rounds", 1, *dask))
        finally:
            stop.set()
            killer.join()
        assert killed, "no worker was ever busy"
        views = worker_view(client, flow)
        client.close()
    assert len(views) == 1, "the killed worker is gone; one survives"
    (view,) = views.values()
    assert not view["sees_flow"]
    # the survivor served round 0's eval (bootstrap student) and round 1's (the trained one)
    assert any(m.startswith("bootstrap round 0 student") for m in view["fetched"]), view
    assert any(m.startswith("train round 1 model") for m in view["fetched"]), view
    assert len(list((Path(view["cache"]) / "models").iterdir())) == len(view["fetched"])

    ok(mpd("run", "-w", flow / "workspace", "--rounds", 1, *sets()))  # threads, local disk
    reader = tmp_path / "reader"
    reader.mkdir()
    attach(reader, url)
    for stage, r in COMPARED:
        expected = rows(flow / "workspace", stage, r)
        assert expected, f"{stage} round {r}: no rows"
        assert bucket_rows(url, reader, stage, r) == expected, f"{stage} round {r}"
