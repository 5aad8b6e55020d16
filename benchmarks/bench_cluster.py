"""The sample stage on a 2-worker Dask LocalCluster against the flow's threads, side by side.

Both runners generate the same shards of the tiny student (same problems, per-shard seeds, so
the same rows); the ratio is cluster time / thread time. On 2 cores no speed-up is expected
(threads already use both through torch): the number is what the cluster costs, i.e. worker
start-up, each worker loading its own engine, and shipping shards and rows. A cluster's start
is timed apart (``start``), since a campaign pays it once, not per stage.

    python benchmarks/bench_cluster.py [--problems 32] [--shard-size 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import torch

    from data.answers import answers_match
    from data.store import StageStore
    from data.world import build_problems
    from engines.config import EngineConfig
    from tasks import cluster
    from tasks.cluster import RunnerConfig
    from tasks.common import read_stage, run_stage
    from tasks.engines import EngineHandle, close_engines
    from tasks.sample import SampleConfig, sample_body

    torch.set_num_threads(2)
    student = ROOT / "assets" / "world" / "student"
    cfg = SampleConfig(
        problems_per_round=args.problems,
        n=1,
        temperature=1.0,
        max_tokens=args.max_tokens,
        shard_size=args.shard_size,
    )
    records = build_problems(11, args.problems, 0, 0, difficulty=1)
    handle = EngineHandle(EngineConfig(kind="hf"), str(student), "float32", "cpu")
    handle.get()  # the flow's own engine (tokenizer, prompts): loaded before timing

    def stage(ws: Path) -> tuple[float, list]:
        started = time.perf_counter()
        run_stage(
            StageStore(ws),
            "sample",
            1,
            "bench",
            lambda w: sample_body(
                w,
                cfg,
                engine=handle,
                records=records,
                round_=1,
                seed=0,
                model="s",
                grader=answers_match,
            ),
        )
        seconds = time.perf_counter() - started
        rows = read_stage(StageStore(ws), "sample", 1).to_pylist()
        return seconds, sorted((r["problem_id"], r["token_ids"]) for r in rows)

    times: dict[str, list[float]] = {"threads": [], "dask": []}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cluster.use(RunnerConfig(kind="dask", n_workers=2, threads_per_worker=1))
        cluster.client()
        start = time.perf_counter() - started
        for rep in range(args.repeats):  # interleaved: the machine's noise hits both alike
            for name in ("threads", "dask"):
                with cluster.suspended() if name == "threads" else contextlib.nullcontext():
                    seconds, rows = stage(Path(tmp) / f"{name}-{rep}")
                times[name].append(seconds)
                results[name] = rows
        cluster.close()
        close_engines()
    n = len(results["threads"])
    t, d = statistics.median(times["threads"]), statistics.median(times["dask"])
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"sample stage, {n} traces in {len(records) // args.shard_size} shards:")
    print(f"  threads (flow process, torch on 2 threads): {t:6.2f} s  {n / t:6.1f} traces/s")
    print(f"  dask (LocalCluster, 2 workers x 1 thread):  {d:6.2f} s  {n / d:6.1f} traces/s")
    print(f"  cluster start (once per campaign):          {start:6.2f} s")
    print(
        f"ratio dask / threads: {d / t:.2f}x   same rows: {results['threads'] == results['dask']}"
    )


if __name__ == "__main__":
    main()
