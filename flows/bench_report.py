"""The bench's outputs: bench.parquet (the ``bench`` view), bench.md, bench.png.

bench.parquet is ``select * from bench`` over the bench root, one row per
(method, seed, round, split), so every number in it can be recomputed in SQL
from the members' ``evals`` (tests/test_bench.py does). bench.md and bench.png
show the mean over seeds (± the sample standard deviation when there are
several): the spread is what tells a real difference from noise.

Pareto front: among all (method, round) points of the test split, those that no
other point beats on both axes (at least as accurate with at most as many mean
total tokens, and strictly better on one).
"""

from __future__ import annotations

import logging
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from data import catalog
from data.errors import best_effort
from data.fsutil import atomic_write_bytes
from flows.sqlout import write_parquet_atomic
from flows.summary import save_png

log = logging.getLogger("mpd")

METRICS = (
    "accuracy",
    "accuracy_change",
    "mean_think_tokens",
    "mean_answer_tokens",
    "mean_total_tokens",
    "tokens_change",
    "truncation_rate",
    "train_tokens",
    "wall_s",
)
SPLITS = {"test": "Test split", "heldout": "Held-out family"}


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
        f"r{r['round']} acc {_pct(r['accuracy'])} think {_num(r['mean_think_tokens'])}"
        for r in rows
    ]
    log.info("%s: %s", where, " | ".join(parts) or "no evaluation")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd over seeds, per (method, round, split), in the rows' order."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["round"], r["split"]), []).append(r)
    out = []
    for (method, round_, split), group in groups.items():
        agg: dict[str, Any] = {"method": method, "round": round_, "split": split}
        agg["seeds"] = len(group)
        for name in METRICS:
            values = [g[name] for g in group if g[name] is not None]
            agg[name] = statistics.fmean(values) if values else None
            agg[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(agg)
    return out


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


def _pct(v: float | None, sd: float | None = None, *, signed: bool = False) -> str:
    if v is None:
        return ""
    text = f"{v * 100:+.1f}" if signed else f"{v * 100:.1f}%"
    return text + (f" ± {sd * 100:.1f}" if sd is not None else "")


def _num(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" + (f" ± {sd:.0f}" if sd is not None else "")


def _label(p: dict[str, Any]) -> str:
    return (
        "the starting student (round 0)" if p["round"] == 0 else f"{p['method']} round {p['round']}"
    )


def _cells(a: dict[str, Any]) -> list[str]:
    def sd(name: str) -> Any:
        return a.get(f"{name}_sd")

    first = a["round"] == 0
    return [
        a["method"],
        str(a["round"]),
        _pct(a["accuracy"], sd("accuracy")),
        "" if first else _pct(a["accuracy_change"], sd("accuracy_change"), signed=True),
        _num(a["mean_think_tokens"], sd("mean_think_tokens")),
        _num(a["mean_answer_tokens"], sd("mean_answer_tokens")),
        _num(a["mean_total_tokens"], sd("mean_total_tokens")),
        "" if first else _pct(a["tokens_change"], sd("tokens_change"), signed=True) + "%",
        _pct(a["truncation_rate"], sd("truncation_rate")),
        "" if first else _num(a["train_tokens"], sd("train_tokens")),
        "" if a["wall_s"] is None else f"{a['wall_s'] / 60:.1f}",
    ]


HEADER = [
    "method",
    "round",
    "accuracy",
    "Δ acc (points)",
    "think",
    "answer",
    "total",
    "Δ tokens",
    "truncated",
    "train tokens",
    "wall (min)",
]


def markdown(
    agg: list[dict[str, Any]],
    *,
    members: list[Any],
    budget: str,
    failures: dict[str, str],
    minutes: float,
) -> str:
    cfg = members[0].cfg
    methods = list(dict.fromkeys(m.method for m in members))
    per_method = {m: sorted(x.seed for x in members if x.method == m) for m in methods}
    seeds = sorted({m.seed for m in members})
    said = {", ".join(map(str, v)) for v in per_method.values()}
    seeds_text = (
        f"seeds {said.pop()}"
        if len(said) == 1
        else "seeds " + "; ".join(f"{m} {', '.join(map(str, v))}" for m, v in per_method.items())
    )
    ev = cfg.evaluate
    lines = [
        "# mpd bench",
        "",
        f"Methods {', '.join(methods)}; {seeds_text}; {cfg.rounds} "
        f"round(s) each, from the same starting student on the same problems "
        f"({minutes:.1f} minutes).",
        "",
        f"- Training budget, the same for every method: {budget}.",
        f"- Evaluation: at most {ev.limit or 'all'} problems per split, temperature "
        f"{ev.temperature:g}, {ev.max_tokens} tokens; round 0 is the starting student.",
        "- Δ acc: accuracy minus round 0's, in points; Δ tokens: mean total tokens against "
        "round 0's; wall: the round's stage durations summed (also for stages shared from "
        "another method's workspace).",
    ]
    if len(seeds) > 1:
        lines.append(
            "- Cells: mean ± sample standard deviation over a method's seeds (its `seeds` column)."
        )
    for split, title in SPLITS.items():
        rows = [a for a in agg if a["split"] == split]
        if not rows:
            continue
        lines += ["", f"## {title}", "", "| " + " | ".join(HEADER) + " |"]
        lines.append("|" + "---|" * len(HEADER))
        lines += ["| " + " | ".join(_cells(a)) + " |" for a in rows]
    front = pareto(a for a in agg if a["split"] == "test")
    lines += ["", "## Pareto front (test split: more accurate, fewer tokens)", ""]
    lines += [
        f"- {_label(p)}: {_pct(p['accuracy'])} at {_num(p['mean_total_tokens'])} mean total tokens"
        for p in front
    ]
    lines += ["", "![accuracy against mean total tokens](bench.png)"]
    if failures:
        lines += ["", "## Failed", ""] + [f"- {k}: {v}" for k, v in failures.items()]
    lines += [
        "",
        "Data: bench.parquet, one row per (method, seed, round, split); the same as "
        '`mpd sql -w <bench root> "select * from bench"`.',
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
        (line,) = ax.plot(xs, ys, "o-", label=method, alpha=0.85)
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
    ax.set_title("MPD and its alternatives: accuracy against length, per round")
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
) -> list[dict[str, Any]]:
    """bench.parquet, bench.md and bench.png in ``root``; the table is printed too."""
    table = catalog.run_query(root, "select * from bench")
    order = {m: i for i, m in enumerate(dict.fromkeys(x.method for x in members))}
    rows = sorted(
        table.to_pylist(),
        key=lambda r: (order.get(r["method"], len(order)), r["seed"], r["round"], r["split"]),
    )
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=table.schema), root / "bench.parquet")
    agg = aggregate(rows)
    text = markdown(agg, members=members, budget=budget, failures=failures, minutes=minutes)
    atomic_write_bytes(root / "bench.md", text.encode())
    if agg:
        plot(agg, root / "bench.png")
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
