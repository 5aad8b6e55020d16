"""What a round shows in the Prefect UI: a summary table and a markdown report per round.

Data engineers watch nightly runs in the Prefect UI, not in a terminal: after
each round's evaluation the campaign publishes

- a table artifact ``mpd-<workspace>-round-summary`` (one row per round so far;
  its key's history shows how the campaign moved night after night), and
- a markdown artifact ``mpd-<workspace>-round-<r>``: accuracy and tokens against
  round 0, what the filter kept and why it dropped the rest, stage wall times.

Generation stages add a progress artifact of their own (``tasks/shards.py``).
Outside a flow run nothing is published; a failure to publish is logged and
never fails a round.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from data import catalog
from data.errors import best_effort
from flows.summary import QUERY, stage_times

log = logging.getLogger("mpd")

DROP_REASONS = ("wrong", "truncated", "no_answer", "unfaithful", "not_shorter", "duplicate")


def artifact_slug(workspace: Path) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(workspace).resolve().name.lower()).strip("-")
    return slug or "workspace"


def _change(now: Any, base: Any, *, percent: bool) -> str:
    if now is None or base is None:
        return ""
    if percent:
        return f" ({(now - base) / base:+.0%} vs round 0)" if base else ""
    return f" ({(now - base) * 100:+.1f} points vs round 0)"


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def round_markdown(rows: list[dict], r: int, times: str = "") -> str:
    """The report of round ``r`` from ``round_summary`` rows (one per round, any order)."""
    by_round = {row["round"]: row for row in rows}
    now, base = by_round[r], by_round.get(0, {})
    acc, think = now.get("accuracy"), now.get("mean_think_tokens")
    lines = [
        f"# Round {r}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy (test) | {_fmt(acc, '.3f')}"
        f"{_change(acc, base.get('accuracy'), percent=False) if r else ''} |",
        f"| accuracy (held-out family) | {_fmt(now.get('heldout_accuracy'), '.3f')} |",
        f"| mean think tokens | {_fmt(think, '.1f')}"
        f"{_change(think, base.get('mean_think_tokens'), percent=True) if r else ''} |",
        f"| mean answer tokens | {_fmt(now.get('mean_answer_tokens'), '.1f')} |",
        f"| truncation rate | {_fmt(now.get('truncation_rate'), '.3f')} |",
    ]
    if r:
        kept, dropped = now.get("kept") or 0, now.get("dropped") or 0
        lines += [
            f"| rewrites kept / dropped | {kept} / {dropped} |",
            "",
            "## Drop reasons",
            "",
            "| reason | rewrites |",
            "|---|---|",
            *(f"| {why} | {now.get(f'dropped_{why}') or 0} |" for why in DROP_REASONS),
        ]
    if times:
        lines += ["", f"Stage wall times: {times}."]
    return "\n".join(lines) + "\n"


def publish_round(workspace: Path, r: int) -> None:
    """Publish round ``r``'s table and markdown artifacts, when running inside a flow.

    Called for the rounds a run computed something in; a fully cached round was
    published by the run that computed it.
    """
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    # Visibility must never fail a round.
    with best_effort(f"round {r}: Prefect artifacts not published", log):
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        slug = artifact_slug(workspace)
        summary, table = catalog.internal_queries(
            workspace, "select * from round_summary order by round", QUERY
        )
        rows = summary.drop_columns(["dropped_by_reason"]).to_pylist()
        create_table_artifact(
            table=table.to_pylist(),
            key=f"mpd-{slug}-round-summary",
            description=f"mpd campaign in {workspace}: accuracy and tokens per round",
        )
        create_markdown_artifact(
            markdown=round_markdown(rows, r, stage_times(workspace).get(r, "")),
            key=f"mpd-{slug}-round-{r}",
            description=f"round {r} of the mpd campaign in {workspace}",
        )
