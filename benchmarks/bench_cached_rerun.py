"""Overhead of a fully cached campaign re-run, as a ratio to a bare Prefect flow.

A nightly run that finds nothing to do must cost about what Prefect itself
costs. This builds a small 3-round campaign once (tiny settings), then times,
interleaved in one process against one Prefect API:

- ``cached``: ``campaign_flow`` on the finished workspace (every stage
  validated on disk and reported cached, summary, catalog and artifacts written);
- ``bare``: a Prefect flow with the same number of no-op tasks (one per stage).

Prints the median of each and the ratio (target <= 1.5x).

    python benchmarks/bench_cached_rerun.py [--repeats 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = [
    "problems.n_train=40",
    "problems.n_test=8",
    "problems.n_heldout=4",
    "sample.problems_per_round=8",
    "sample.shard_size=4",
    "sample.max_tokens=48",
    "rewrite.max_tokens=48",
    "score.context=rewrite",
    "filter.ratio=10",
    f"filter.sql={ROOT / 'tests' / 'fixtures' / 'keep_first_filter.sql'}",
    "train.steps=2",
    "train.batch_size=2",
    "evaluate.limit=2",
    "evaluate.max_tokens=16",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each (interleaved)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mpd-bench-rerun-"))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    import logging

    from prefect import flow, task

    from flows.campaign import campaign_flow

    ws = home / "ws"
    stages = 1 + 6 * args.rounds  # eval(0) + six stages per round

    @task(name="noop")
    def noop(i: int) -> int:
        return i

    @flow(name="bare-flow")
    def bare(n: int) -> None:
        for i in range(n):
            noop(i)

    def cached() -> None:
        campaign_flow(config=None, rounds=args.rounds, workspace=str(ws), overrides=TINY)

    print(f"building a {args.rounds}-round tiny campaign in {ws} (not timed) ...", flush=True)
    t0 = time.perf_counter()
    cached()
    print(f"  built in {time.perf_counter() - t0:.1f}s; warming the bare flow", flush=True)
    bare(stages)
    logging.getLogger("prefect").setLevel(logging.WARNING)  # keep the timed loop's output short
    logging.getLogger("mpd").setLevel(logging.WARNING)
    times: dict[str, list[float]] = {"cached": [], "bare": []}
    for _ in range(args.repeats):
        for name, fn in (("cached", cached), ("bare", lambda: bare(stages))):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the summary table, each run
                fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nfully cached {args.rounds}-round re-run vs bare Prefect flow with {stages} no-op tasks"
    )
    for k, v in times.items():
        print(f"  {k:7s} median {med[k]:.2f}s  runs {', '.join(f'{x:.2f}' for x in v)}")
    print(f"  ratio cached / bare = {med['cached'] / med['bare']:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
