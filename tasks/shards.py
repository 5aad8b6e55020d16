"""The shard loop every generating stage shares: resumable, visible, and run by Prefect.

A stage's rows are cut into shards of ``shard_size`` items; each finished shard
is written and marked in staging at once, so a killed stage redoes only the
shards without a marker. Inside a flow, each shard is a Prefect task submitted
to the flow's task runner (threads by default), at most ``workers`` in flight:

- ``workers: 1`` (the default) suits an in-process engine that already uses
  every core or the whole GPU; more would only contend.
- ``workers: 8`` suits a served endpoint (the ``openai`` engine) or an engine
  with spare capacity.
- ``runner: {kind: dask}``: every shard's generation goes to a Dask cluster at once
  (``tasks/cluster.py``); the shard task waits for it and writes it here.

Outside a flow (a test, a notebook) the same shards run in a plain loop.
Progress shows as a Prefect progress artifact per stage, and in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from data.errors import best_effort
from data.stage_writer import StageWriter
from tasks import cluster
from tasks.common import shards
from tasks.failing import failed_quietly

log = logging.getLogger("mpd")

MakeRows = Callable[[int, Any], list[dict]]
Load = Callable[[int, range], Any]


class _Progress:
    """Shards done out of total, as a log line and (inside a run) a Prefect progress artifact."""

    def __init__(self, stage: str, round_: int, total: int, done: int) -> None:
        self.stage, self.round, self.total, self.done = stage, round_, total, done
        self.artifact_id: Any = None
        with best_effort("no progress artifact", log):  # visibility must never fail a stage
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext

            if FlowRunContext.get() is not None:
                self.artifact_id = create_progress_artifact(
                    progress=self.percent,
                    key=f"{stage}-round-{round_}-progress",
                    description=f"round {round_} {stage}: shards written / shards in the stage",
                )

    @property
    def percent(self) -> float:
        return 100.0 * self.done / max(self.total, 1)

    def step(self) -> None:
        self.done += 1
        log.info("round %d %-8s shard %d/%d", self.round, self.stage, self.done, self.total)
        if self.artifact_id is not None:
            with best_effort("progress artifact not updated", log):
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.artifact_id, progress=self.percent)


@task(name="shard", task_run_name="{stage}-round-{round_}-shard-{index}", cache_policy=NO_CACHE)
def shard_task(stage: str, round_: int, index: int, run: Callable[[int], int]) -> int:
    """One shard: generate, write, mark. Its rows live in the shard file, not in Prefect."""
    return failed_quietly(lambda: run(index))


def run_shards(
    writer: StageWriter,
    n_items: int,
    shard_size: int,
    make_rows: MakeRows,
    schema: pa.Schema,
    *,
    stage: str,
    round_: int,
    workers: int = 1,
    load: Load | None = None,
) -> int:
    """Write every unfinished shard of ``n_items`` items; returns the number of shards.

    ``make_rows(i, part)`` computes shard ``i`` (item indices ``part``); it must
    be deterministic in ``i`` (per-shard seeds), so a resumed shard equals the
    one a killed run would have written.

    ``load(i, part)``, when given, reads shard ``i``'s inputs (its rows of an earlier stage,
    :mod:`tasks.stream`) here, where the workspace is, when the shard is about to be computed;
    ``make_rows(i, inputs)`` then gets them instead of the indices. So a stage holds the inputs
    of the shards in flight only, a resumed stage never reads its finished shards' inputs, and
    a shard sent to a Dask worker carries its rows, never a path.
    """
    parts = shards(n_items, shard_size)
    todo = [i for i in range(len(parts)) if i not in writer.resumed]
    progress = _Progress(stage, round_, len(parts), done=len(parts) - len(todo))

    from prefect.context import FlowRunContext

    def inputs(i: int) -> Any:
        return parts[i] if load is None else load(i, parts[i])

    dask = cluster.client() if todo else None
    if dask is not None:
        # Every shard to the cluster now; each is written here as it comes back. ``make_rows``
        # travels pickled: what it holds is data and an engine handle (tasks/engines.py).
        remote = {i: dask.submit(make_rows, i, inputs(i), pure=False) for i in todo}
        workers = len(todo)

    def one(i: int) -> int:
        made = remote[i].result() if dask is not None else make_rows(i, inputs(i))
        rows = writer.write_shard(i, pa.Table.from_pylist(made), schema)
        progress.step()
        return rows

    if FlowRunContext.get() is None or not todo:
        for i in todo:
            one(i)
        return len(parts)
    # Keep at most ``workers`` shards in flight; the first failure fails the stage
    # (finished shards stay marked, so the retry or the next run resumes after them).
    pending: list[Any] = []
    for i in todo:
        if len(pending) >= workers:
            pending.pop(0).result()
        pending.append(shard_task.submit(stage, round_, i, one))
    for future in pending:
        future.result()
    return len(parts)
