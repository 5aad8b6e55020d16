"""The one Prefect task every stage runs through, and its cache policy.

Prefect's default cache policy hashes the flow run id, so a nightly run would
recompute everything. ``StageKeyPolicy`` keys on the stage key instead, and
only while the committed output on disk is valid: the disk stays the source of
truth (a deleted or corrupt output is recomputed even if Prefect remembers a
result), and Prefect shows an unchanged stage as ``Cached``.

Only transient failures (a dead engine worker, a server that kept failing, a lost
connection: ``data.errors``) are retried, with backoff; a user mistake (a filter that
keeps nothing, a bad SQL file), a full disk or a bug fails the stage at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext

from data.errors import is_retried
from data.store import StageStore
from tasks.common import StageResult
from tasks.failing import failed_quietly


@dataclass
class StageKeyPolicy(CachePolicy):
    """Cache key = (stage, round, key) while the committed output validates; else no cache."""

    def compute_key(
        self,
        task_ctx: Any,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        stage, round_, key = inputs["stage"], inputs["round_"], inputs["key"]
        store = StageStore(Path(inputs["workspace"]))
        if store.lookup(stage, round_, key):
            # The result names paths in this workspace: another workspace with the same
            # stage key (a copy, a second campaign) must not get it back.
            where = hashlib.sha256(str(store.workspace).encode()).hexdigest()[:16]
            return f"mpd-{stage}-r{round_}-{key}-{where}"
        return None


def execute(
    workspace: str, stage: str, round_: int, key: str, run: Callable[[], StageResult]
) -> StageResult:
    """Run a stage through :func:`stage_task` inside a flow, else directly (the executor the
    flows hand :class:`tasks.context.Context`); a Prefect cache hit counts as cached."""
    if FlowRunContext.get() is None:
        return run()
    state = stage_task(
        workspace=workspace, stage=stage, round_=round_, key=key, run=run, return_state=True
    )
    result = state.result()  # raises the stage's exception if it failed
    # A Prefect cache hit hands back the result of the run that computed it.
    cached = result.cached or state.name == "Cached"
    return dataclasses.replace(result, cached=cached)


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # boundary: whatever the stage raised, retried by its kind
        return is_retried(exc)
    return False


@task(
    name="stage",
    task_run_name="{stage}-round-{round_}",
    cache_policy=StageKeyPolicy(),
    persist_result=True,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_condition,
)
def stage_task(
    workspace: str, stage: str, round_: int, key: str, run: Callable[[], StageResult]
) -> StageResult:
    """Run one stage (``run`` checks the store itself, so a cache miss here is still cheap)."""
    return failed_quietly(run)
