"""Scale-out costs, side by side: Dask against threads, and object storage against local disk.

**Sample stage on a 2-worker Dask LocalCluster against the flow's threads.**

Both runners generate the same shards of the tiny student (same problems, per-shard seeds, so
the same rows); the ratio is cluster time / thread time. On 2 cores no speed-up is expected
(threads already use both through torch): the number is what the cluster costs, i.e. worker
start-up, each worker loading its own engine, and shipping shards and rows. A cluster's start
is timed apart (``start``), since a campaign pays it once, not per stage.

**A committed stage's round trip on the S3 server against the local disk.** The sample rows
above, tiled to ``--s3-rows`` rows in 8 shards (a sample stage of a real round's size), are
written and committed by one store, then found and read back whole by another (``lookup``
with its sha256 check, then every row): on the local disk a second ``StageStore`` on the same
directory; on object storage (moto's S3 server on 127.0.0.1, started by scripts/s3-server.sh)
a working copy publishing to ``s3://…`` and a second, empty working copy (another machine)
downloading it. The ratio is S3 time / local time.

    python benchmarks/bench_cluster.py [--problems 32] [--shard-size 4] [--repeats 2]
                                       [--s3-rows 16384]
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

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--s3-rows", type=int, default=16384)
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

    sample = None

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
        nonlocal sample
        sample = read_stage(StageStore(ws), "sample", 1)
        rows = sample.to_pylist()
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
    object_storage_round_trip(sample, args.s3_rows, args.repeats)


def object_storage_round_trip(sample: pa.Table, n_rows: int, repeats: int) -> None:
    """Commit a stage and read it back elsewhere: local disk against the S3 server."""
    import socket
    import subprocess

    from data.objstore import attach
    from data.schemas import SAMPLES
    from data.store import StageStore
    from tasks.common import read_stage

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {
            **os.environ,
            "MPD_SERVICES_DIR": str(base / "services"),
            "S3_PORT": str(port),
            "PYTHON": sys.executable,
        }
        script = str(ROOT / "scripts" / "s3-server.sh")
        out = subprocess.run(
            ["bash", script, "start", "bench"], env=env, capture_output=True, text=True, check=True
        )
        os.environ.update(kv.split("=", 1) for kv in out.stdout.strip().split()[1:])
        try:
            rows = pa.concat_tables([sample] * (n_rows // sample.num_rows + 1)).slice(0, n_rows)
            shards = [rows.slice(i * len(rows) // 8, len(rows) // 8) for i in range(8)]
            times: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
            for rep in range(repeats):
                for where in ("local", "s3"):
                    writer_ws, reader_ws = base / f"{where}-{rep}-w", base / f"{where}-{rep}-r"
                    writer_ws.mkdir()
                    if where == "s3":
                        reader_ws.mkdir()
                        for ws in (writer_ws, reader_ws):
                            attach(ws, f"s3://bench/round-trip-{rep}")
                    else:
                        reader_ws = writer_ws
                    started = time.perf_counter()
                    writer = StageStore(writer_ws).writer("sample", 1, "k" * 64)
                    for i, shard in enumerate(shards):
                        writer.write_shard(i, shard, SAMPLES)
                    writer.commit(expected_shards=len(shards))
                    written = time.perf_counter()
                    reader = StageStore(reader_ws)
                    assert reader.lookup("sample", 1, "k" * 64) is not None
                    back = read_stage(reader, "sample", 1)
                    read = time.perf_counter()
                    assert back.num_rows == rows.num_rows
                    times[where].append((written - started, read - written))
        finally:
            subprocess.run(["bash", script, "stop"], env=env, check=False)
    (lw, lr), (sw, sr) = (
        tuple(statistics.median(x[i] for x in times[k]) for i in range(2)) for k in ("local", "s3")
    )
    mb = rows.nbytes / 1e6
    print(
        f"committed stage round trip, {rows.num_rows} sample rows in 8 shards ({mb:.1f} MB in memory):"
    )
    print(
        f"  local disk: write+commit {lw:6.2f} s, lookup+read elsewhere {lr:6.2f} s, total {lw + lr:6.2f} s"
    )
    print(
        f"  S3 server:  write+commit {sw:6.2f} s, lookup+read elsewhere {sr:6.2f} s, total {sw + sr:6.2f} s"
    )
    print(
        f"ratio S3 / local: {(sw + sr) / (lw + lr):.2f}x (write {sw / lw:.2f}x, read {sr / lr:.2f}x)"
    )


if __name__ == "__main__":
    main()
