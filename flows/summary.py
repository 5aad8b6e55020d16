"""The end-of-run report: a round summary table and a plot of accuracy and tokens."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data import catalog
from data.fsutil import atomic_write_bytes
from data.store import StageStore
from flows.sqlout import format_table
from tasks.registry import campaign_stages

log = logging.getLogger("mpd")

# Accuracy's change against round 0 is paired by problem, with its standard error beside it:
# "did the student get worse?" is the question, and one number without its noise cannot say.
QUERY = """
select round, eval_n, round(accuracy, 3) as accuracy,
       printf('%+.1f ± %.1f', 100 * accuracy_change, 100 * coalesce(accuracy_change_se, 0))
           as "Δacc pts ± se",
       round(mean_think_tokens, 1) as think, printf('%+.0f%%', 100 * think_change) as "Δthink",
       heldout_n, round(heldout_accuracy, 3) as heldout_acc,
       round(truncation_rate, 3) as truncated, kept, dropped
from round_summary order by round
"""


def stage_times(workspace: Path) -> dict[int, str]:
    """Per round, the wall time of each stage (from the manifests), as one string."""
    out: dict[int, list[str]] = {}
    for man in StageStore(workspace).committed():
        if man.stage in campaign_stages():  # once per campaign: no round's time
            continue
        out.setdefault(man.round, []).append(f"{man.stage} {man.duration_s:.0f}s")
    return {r: ", ".join(v) for r, v in out.items()}


def plot(table: dict[str, list], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6, 3.6), dpi=120)
    rounds = table["round"]
    ax1.plot(rounds, table["accuracy"], "o-", color="tab:blue", label="accuracy (test)")
    held = [float("nan") if a is None else a for a in table.get("heldout_acc", [])]
    if held and any(a == a for a in held):
        ax1.plot(rounds, held, "o:", color="tab:cyan", label="accuracy (held-out family)")
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy", color="tab:blue")
    ax1.set_ylim(0, 1)
    ax2 = ax1.twinx()
    ax2.plot(rounds, table["think"], "s--", color="tab:red", label="mean think tokens")
    ax2.set_ylabel("mean think tokens", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax1.set_xticks(rounds)
    ax1.set_title("accuracy and reasoning length per round")
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_png(fig, out)


def save_png(fig: Any, out: Path) -> Path:
    """Write ``fig`` to ``out`` atomically (a reader never sees half a PNG) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def print_summary(workspace: Path, *, replot: bool = True) -> None:
    """Print the round table; redraw ``summary.png`` unless nothing changed (``replot``)."""
    (table,) = catalog.internal_queries(workspace, QUERY)
    times = stage_times(workspace)
    rows = table.to_pydict()
    rows["stage times"] = [times.get(r, "") for r in rows["round"]]
    import pyarrow as pa

    print(format_table(pa.table(rows), "table"))
    path = workspace / "summary.png"
    if rows["round"] and (replot or not path.exists()):
        plot(rows, path)
        log.info("plot: %s", path)
