"""Shards on a real Dask cluster (``runner.kind: dask``): a ``distributed.LocalCluster`` of 2
worker processes runs the sample stage of the tiny student.

- its rows equal the thread runner's, row for row (per-shard seeds; each worker loads its own
  engine from the handle, never a pickled engine);
- a worker killed with SIGKILL in the middle of a shard: Dask reruns that shard on a worker
  that lives, the stage commits, and its rows still equal a clean run's;
- ``mpd run`` with ``--set runner.kind=dask`` runs a whole round on a local cluster and commits
  the same samples as the thread runner.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from data.store import StageStore
from engines.config import EngineConfig
from tasks import cluster
from tasks.cluster import RunnerConfig
from tasks.common import read_stage
from tasks.engines import EngineHandle, close_engines
from tests.stage_runner import STUDENT, run_sample_stage

DASK = RunnerConfig(kind="dask", n_workers=2, threads_per_worker=1)


def handle() -> EngineHandle:
    return EngineHandle(EngineConfig(kind="hf"), str(STUDENT), "float32", "cpu")


def rows(ws: Path, stage: str = "sample", round_: int = 1) -> list[dict]:
    out = read_stage(StageStore(ws), stage, round_).to_pylist()
    return sorted(out, key=lambda r: (r["problem_id"], r["sample_idx"]))


def loaded_engines() -> int:
    """How many engines this process holds (run on each worker)."""
    from tasks.engines import _ENGINES

    return len(_ENGINES)


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test picks its runner; threads again (and no cluster left) afterwards. The local
    cluster's workers inherit this test's cache (where they fetch models), not ~/.cache."""
    monkeypatch.setenv("MPD_CACHE_DIR", str(tmp_path / "machine-cache"))
    try:
        yield
    finally:
        cluster.use(RunnerConfig())
        close_engines()


@pytest.fixture(scope="module")
def threads_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    ws = tmp_path_factory.mktemp("threads")
    cluster.use(RunnerConfig())
    run_sample_stage(ws, handle())
    close_engines()
    return rows(ws)


def test_sample_stage_on_a_local_cluster_equals_threads(
    runner: None, threads_rows: list[dict], tmp_path: Path
) -> None:
    cluster.use(DASK)
    client = cluster.client()
    assert len(client.scheduler_info()["workers"]) == 2
    result = run_sample_stage(tmp_path, handle())
    assert result.rows == len(threads_rows) > 0
    assert rows(tmp_path) == threads_rows
    # the workers loaded their own engines (one each at most): the flow's was never pickled
    loaded = client.run(loaded_engines)
    assert sum(loaded.values()) >= 1 and max(loaded.values()) == 1


def test_a_worker_killed_mid_shard_reruns_its_shard(
    runner: None, threads_rows: list[dict], tmp_path: Path
) -> None:
    cluster.use(DASK)
    client = cluster.client()
    pids = client.run(os.getpid)  # worker address -> its process id
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = [addr for addr, keys in client.processing().items() if keys]
            if busy:
                time.sleep(0.3)  # inside the shard's generation, not before it
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(pids[busy[0]])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    result = run_sample_stage(tmp_path, handle())
    killer.join()
    assert killed, "no worker was ever busy"
    assert result.rows == len(threads_rows)
    assert rows(tmp_path) == threads_rows
    manifest = json.loads((tmp_path / "sample" / "round=1" / "_manifest.json").read_text())
    assert manifest["rows"] == len(threads_rows)


@pytest.mark.usefixtures("prefect_api")
def test_mpd_run_on_a_local_cluster_commits_the_threads_rows(runner: None, tmp_path: Path) -> None:
    from flows.cli import main
    from tests.test_modes import TINY

    sets = {**TINY, "method": "on_policy", "train.loss": "ce"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    for name, extra in (("threads", []), ("dask", ["--set", "runner.kind=dask"])):
        assert main(["run", "-w", str(tmp_path / name), "--rounds", "1", *args, *extra]) == 0
    for stage, r in (("sample", 1), ("eval", 0), ("eval", 1)):
        assert rows(tmp_path / "dask", stage, r) == rows(tmp_path / "threads", stage, r), stage
