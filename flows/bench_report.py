"""The bench's outputs: bench.parquet (the ``bench`` view), bench.md, bench.png.

bench.parquet is ``select * from bench`` over the bench root, one row per
(method, seed, round, split), so every number in it can be recomputed in SQL
from the members' ``evals`` (tests/test_bench.py does); bench_family.parquet and
bench_paired.parquet are the views of the same names (per problem family; each method
against mpd on the same problems). bench.md (:mod:`flows.bench_tables`) and bench.png show
the mean over seeds ± its standard error (:mod:`flows.bench_stats`): the spread is what tells
a real difference from noise.

Pareto front: among all (method, round) points of the test split, those that no
other point beats on both axes (at least as accurate with at most as many mean
total tokens, and strictly better on one).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from data import catalog
from data.errors import best_effort
from data.fsutil import atomic_write_bytes
from flows.bench_tables import (
    ReportData,
    aggregate,
    every_round,
    families,
    num,
    off_policy_note,
    pct,
    summary,
    tuning,
)
from flows.sqlout import write_parquet_atomic
from flows.summary import save_png

log = logging.getLogger("mpd")


def print_progress(root: Path, method: str, seed: int, where: str) -> None:
    """One log line per finished member: accuracy and think tokens per round."""
    ws = root / method / f"seed={seed}"
    if not ws.is_dir():
        return
    try:
        rows = catalog.run_query(
            ws, "select round, accuracy, mean_think_tokens from round_summary where eval_n > 0"
        ).to_pylist()
    except catalog.SqlError as exc:
        log.warning("%s: no summary (%s)", where, exc)
        return
    parts = [
        f"r{r['round']} acc {pct(r['accuracy'])} think {num(r['mean_think_tokens'])}" for r in rows
    ]
    log.info("%s: %s", where, " | ".join(parts) or "no evaluation")


def pareto(points: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated points (max accuracy, min mean_total_tokens), by tokens."""
    pts = [p for p in points if p["accuracy"] is not None and p["mean_total_tokens"] is not None]

    def beats(q: dict[str, Any], p: dict[str, Any]) -> bool:
        no_worse = (
            q["accuracy"] >= p["accuracy"] and q["mean_total_tokens"] <= p["mean_total_tokens"]
        )
        better = q["accuracy"] > p["accuracy"] or q["mean_total_tokens"] < p["mean_total_tokens"]
        return no_worse and better

    front = [p for p in pts if not any(beats(q, p) for q in pts)]
    # Round 0 is one student for every method: one point, not one per method.
    unique = {(p["accuracy"], p["mean_total_tokens"]): p for p in reversed(front)}
    return sorted(unique.values(), key=lambda p: (p["mean_total_tokens"], -p["accuracy"]))


def _label(p: dict[str, Any]) -> str:
    return (
        "the starting student (round 0)" if p["round"] == 0 else f"{p['method']} round {p['round']}"
    )


def markdown(data: ReportData) -> str:
    """bench.md: the header, then the sections of :mod:`flows.bench_tables`."""
    cfg = data.members[0].cfg
    methods = list(dict.fromkeys(m.method for m in data.members))
    seeds = sorted({m.seed for m in data.members})
    builtin = cfg.problems.source == "builtin"
    ev = cfg.evaluate
    agg = aggregate(data.rows)
    lines = [
        "# mpd bench",
        "",
        f"Methods {', '.join(methods)}; every one on seeds {', '.join(map(str, seeds))}; "
        f"{cfg.rounds} round(s) each, from the same starting student on the same problems "
        f"({data.minutes:.1f} minutes).",
        "",
        f"- Training budget, the same for every method: {data.budget}.",
        f"- Evaluation: at most {ev.limit or 'all'} problems per split, temperature "
        f"{ev.temperature:g}, {ev.max_tokens} tokens; round 0 is the starting student.",
        "- wall: the round's stage durations summed (also for stages shared from another "
        "method's workspace).",
        "",
        *summary(data),
        "",
        *families(data, builtin),
        *every_round(agg),
    ]
    notes = off_policy_note(data, builtin)
    if notes:
        lines += ["", "## Notes", "", *notes]
    if data.tuning:
        lines += ["", *tuning(data)]
    front = pareto(a for a in agg if a["split"] == "test")
    lines += ["", "## Pareto front (test split: more accurate, fewer tokens)", ""]
    lines += [
        f"- {_label(p)}: {pct(p['accuracy'])} at {num(p['mean_total_tokens'])} mean total tokens"
        for p in front
    ]
    lines += ["", "![accuracy against mean total tokens](bench.png)"]
    if data.failures:
        lines += ["", "## Failed", ""] + [f"- {k}: {v}" for k, v in data.failures.items()]
    lines += [
        "",
        "Data: bench.parquet (one row per method, seed, round, split), bench_family.parquet, "
        'bench_paired.parquet; the same as `mpd sql -w <bench root> "select * from bench"` '
        "(views bench_family, bench_paired).",
    ]
    return "\n".join(lines) + "\n"


def plot(agg: list[dict[str, Any]], out: Path) -> Path:
    """Accuracy against mean total tokens (test split): a line per method, the front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = [a for a in agg if a["split"] == "test" and a["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(a["method"] for a in test):
        pts = sorted((a for a in test if a["method"] == method), key=lambda a: a["round"])
        xs, ys = [a["mean_total_tokens"] for a in pts], [a["accuracy"] for a in pts]
        bars = ax.errorbar(
            xs,
            ys,
            xerr=[a.get("mean_total_tokens_se") or 0.0 for a in pts],
            yerr=[a.get("accuracy_se") or 0.0 for a in pts],
            fmt="o-",
            capsize=3,
            label=method,
            alpha=0.85,
        )
        line = bars.lines[0]
        for a in pts[1:] if pts and pts[0]["round"] == 0 else pts:
            ax.annotate(
                f"r{a['round']}",
                (a["mean_total_tokens"], a["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=line.get_color(),
            )
    start = [a for a in test if a["round"] == 0]
    if start:  # one starting student for every method: one marker, not six labels
        ax.scatter(
            [start[0]["mean_total_tokens"]],
            [start[0]["accuracy"]],
            marker="*",
            s=220,
            color="black",
            zorder=5,
            label="starting student (round 0)",
        )
    front = pareto(test)
    if front:
        ax.plot(
            [p["mean_total_tokens"] for p in front],
            [p["accuracy"] for p in front],
            "k--",
            lw=1,
            alpha=0.6,
        )
        ax.scatter(
            [p["mean_total_tokens"] for p in front],
            [p["accuracy"] for p in front],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
        )
    ax.set_xlabel("mean total tokens (test split)")
    ax.set_ylabel("accuracy (test split)")
    ax.set_ylim(0, 1)
    ax.set_title("MPD and its alternatives: accuracy against length, per round (± s.e.)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


def write_report(
    root: Path,
    *,
    members: list[Any],
    budget: str,
    failures: dict[str, str],
    minutes: float,
    tuning: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """bench.parquet, bench_family.parquet, bench_paired.parquet, bench.md and bench.png in
    ``root``; the markdown is printed too."""
    bench, fams, paired, solve = catalog.internal_queries(
        root,
        "select * from bench",
        "select * from bench_family",
        "select * from bench_paired",
        "select avg(correct::double) as accuracy from solutions",
    )
    order = {m: i for i, m in enumerate(dict.fromkeys(x.method for x in members))}

    def ordered(table: pa.Table, name: str) -> list[dict[str, Any]]:
        rows = sorted(
            table.to_pylist(),
            key=lambda r: (order.get(r["method"], len(order)), r["seed"], r["round"], r["split"]),
        )
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=table.schema), root / name)
        return rows

    rows = ordered(bench, "bench.parquet")
    data = ReportData(
        rows=rows,
        families=ordered(fams, "bench_family.parquet"),
        paired=ordered(paired, "bench_paired.parquet"),
        members=members,
        budget=budget,
        minutes=minutes,
        failures=failures,
        solve_accuracy=solve.column("accuracy")[0].as_py(),
        tuning=tuning or [],
    )
    text = markdown(data)
    atomic_write_bytes(root / "bench.md", text.encode())
    if rows:
        plot(aggregate(rows), root / "bench.png")
    sys.stdout.write(text)  # the table, on stdout (print would become a log line in a flow)
    publish(text)
    log.info("bench: %s, %s, %s", root / "bench.md", root / "bench.parquet", root / "bench.png")
    return rows


def publish(text: str) -> None:
    """The report as a Prefect markdown artifact (``mpd-bench``), where the UI shows runs."""
    with best_effort("no bench artifact", log):  # visibility must never fail the bench
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is not None:
            create_markdown_artifact(markdown=text, key="mpd-bench", description="mpd bench")
