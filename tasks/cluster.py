"""Where the shards of the generating stages run: the flow's threads, or a Dask cluster.

``runner: {kind: dask}`` sends each shard's generation to a Dask cluster (a scheduler at
``address``, or a ``LocalCluster`` of ``n_workers`` processes started here). The Prefect shard
task stays in the flow's process and waits for its Dask future; the shard's rows come back to it
and are written and marked there (and, for an ``s3://`` workspace, uploaded to the store's
staging area by the flow's writer), so resuming works as with threads and a worker writes
nothing. What travels to a worker is the shard's inputs and an
:class:`tasks.engines.EngineHandle` (engine config; a model a stage made named by workspace URL
and content key, :mod:`data.model_fetch`), never an engine and never a path of the flow's host:
each worker process fetches the model into its own cache once, loads its engine once and
reuses it for every shard it gets. So a worker needs mpd installed and access to the store, not
the flow's disk. Dask reruns the
shard of a worker that dies on another worker; shards are deterministic in their index (per-shard
seeds), so the rows equal a clean run's.

Why not Prefect task runs on the workers (``prefect_dask.DaskTaskRunner`` as the flow's task
runner): each worker would need the flow's Prefect API and the stage task's closure (the stage
writer, the progress artifact), and a dead worker's task run would be recorded twice. Dask here
carries computation only; Prefect keeps one shard task per shard, in the flow's process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field

from data.configbase import StrictModel
from data.errors import UserError

log = logging.getLogger("mpd")


class RunnerConfig(StrictModel):
    kind: Literal["threads", "dask"] = Field(
        "threads",
        description="threads: shards on the flow's threads (engines.<role>.shard_workers at a "
        "time); dask: on a Dask cluster, every shard of a stage submitted at once.",
    )
    address: str | None = Field(
        None,
        description="dask: the scheduler, e.g. tcp://10.0.0.5:8786; null starts a LocalCluster "
        "of n_workers processes here for the run.",
    )
    n_workers: int = Field(2, ge=1, description="dask, local cluster: worker processes.")
    threads_per_worker: int = Field(1, ge=1, description="dask, local cluster: threads each.")


_CLIENT: Any = None
_CONFIG: RunnerConfig = RunnerConfig()


def use(cfg: RunnerConfig) -> None:
    """Make ``cfg`` this process's runner (the campaign calls it first; threads by default)."""
    global _CONFIG
    if cfg != _CONFIG:
        close()
    _CONFIG = cfg


_SUSPENDED = False


@contextmanager
def suspended() -> Iterator[None]:
    """Shards on threads inside the block; the cluster stays up for after it (a benchmark
    compares both runners in turns without restarting the cluster)."""
    global _SUSPENDED
    _SUSPENDED = True
    try:
        yield
    finally:
        _SUSPENDED = False


def client() -> Any:
    """The Dask client of this process's runner, connected on first use; None for threads."""
    global _CLIENT
    if _CONFIG.kind != "dask" or _SUSPENDED:
        return None
    if _CLIENT is None:
        from distributed import Client, LocalCluster

        if _CONFIG.address:
            try:
                _CLIENT = Client(_CONFIG.address, timeout=30)
            except OSError as exc:
                raise UserError(
                    f"runner.address: no Dask scheduler at {_CONFIG.address} ({exc})"
                ) from None
        else:
            cluster = LocalCluster(
                n_workers=_CONFIG.n_workers,
                threads_per_worker=_CONFIG.threads_per_worker,
                processes=True,
                dashboard_address=None,
                # torch in each worker uses its own threads, not every core of the machine;
                # model loads stay quiet, as in the flow's process
                env={
                    "OMP_NUM_THREADS": str(_CONFIG.threads_per_worker),
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "TRANSFORMERS_VERBOSITY": "error",
                },
            )
            _CLIENT = Client(cluster)
        log.info("shards run on the Dask cluster at %s", _CLIENT.scheduler.address)
    return _CLIENT


def close() -> None:
    """Disconnect (and stop a local cluster this process started)."""
    global _CLIENT
    if _CLIENT is not None:
        cluster = _CLIENT.cluster
        _CLIENT.close()
        if cluster is not None:
            cluster.close()
        _CLIENT = None
