"""Scale-out costs, side by side: Dask against threads, and object storage against local disk.

**Sample stage on a 2-worker Dask LocalCluster against the flow's threads.**

Both runners generate the same shards of the tiny student (same problems, per-shard seeds, so
the same rows); the ratio is cluster time / thread time. On 2 cores no speed-up is expected
(threads already use both through torch): the number is what the cluster costs, i.e. worker
start-up, each worker loading its own engine, and shipping shards and rows. A cluster's start
is timed apart (``start``), since a campaign pays it once, not per stage.

**The model from the store.** The same stage on the same cluster, its model given the way a
campaign gives a model a stage made: by workspace URL and content key (``data/model_fetch.py``;
the student committed to an ``s3://`` workspace on the S3 server), never a path. Each worker
fetches it into its own cache on its first shard and reuses it after: ``first`` runs on freshly
restarted workers with an empty cache (fetch + engine load), ``reused`` right after on the same
workers. Ratios are to the cluster with the model at a path, first to first (fresh workers
each, so both load the engine: the difference is the fetch) and reused to reused, all in one
run, interleaved.

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
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    from engines.config import EngineConfig
    from tasks import cluster
    from tasks.cluster import RunnerConfig
    from tasks.common import read_stage, run_stage
    from tasks.engines import EngineHandle, close_engines
    from tasks.sample import SampleConfig, sample_body
    from world import build_problems

    torch.set_num_threads(2)
    student = ROOT / "world" / "assets" / "student"
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

    def stage(ws: Path, engine: EngineHandle) -> tuple[float, list]:
        started = time.perf_counter()
        run_stage(
            StageStore(ws),
            "sample",
            1,
            "bench",
            lambda w: sample_body(
                w,
                cfg,
                engine=engine,
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

    # "dask": the model at a path; "store": by content key. "dask" and "store-first" on freshly
    # restarted workers (each engine loaded again; for the store, an empty cache too).
    variants = ("threads", "dask", "dask-reused", "store-first", "store-reused")
    times: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    with tempfile.TemporaryDirectory() as tmp, s3_server(Path(tmp)):
        os.environ["MPD_CACHE_DIR"] = str(Path(tmp) / "worker-cache")  # the workers' machine
        stored, fetch = stored_student(Path(tmp), student, handle)
        started = time.perf_counter()
        cluster.use(RunnerConfig(kind="dask", n_workers=2, threads_per_worker=1))
        client = cluster.client()
        start = time.perf_counter() - started
        fetches = []
        for rep in range(args.repeats):  # interleaved: the machine's noise hits each alike
            for name in variants:
                if name in ("dask", "store-first"):  # fresh worker processes, empty cache
                    shutil.rmtree(Path(tmp) / "worker-cache", ignore_errors=True)
                    client.restart()
                with cluster.suspended() if name == "threads" else contextlib.nullcontext():
                    seconds, rows = stage(
                        Path(tmp) / f"{name}-{rep}", stored if "store" in name else handle
                    )
                times[name].append(seconds)
                results[name] = rows
                if name.startswith("store"):
                    fetches.append(client.run(fetched_models))
        cluster.close()
        close_engines()
        report_runners(times, results, fetches, fetch, start, len(records) // args.shard_size)
        object_storage_round_trip(sample, args.s3_rows, args.repeats)


def report_runners(
    times: dict[str, list[float]],
    results: dict[str, list],
    fetches: list[dict],
    fetch: tuple[float, int],
    start: float,
    n_shards: int,
) -> None:
    """Threads against the cluster, and the cluster with the model from the store: its first
    stage against the first with the model at a path (both on fresh workers, each loading its
    engine), the next against the next (engines loaded, nothing fetched)."""
    n = len(results["threads"])
    t, d, warm, first, reused = (
        statistics.median(times[k])
        for k in ("threads", "dask", "dask-reused", "store-first", "store-reused")
    )
    rate = {
        k: f"{statistics.median(v):6.2f} s  {n / statistics.median(v):6.1f} traces/s"
        for k, v in times.items()
    }
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"sample stage, {n} traces in {n_shards} shards:")
    print(f"  threads (flow process, torch on 2 threads):      {rate['threads']}")
    print(f"  dask (LocalCluster, 2 workers x 1 thread), fresh: {rate['dask']}")
    print(f"  dask again, engines loaded:                       {rate['dask-reused']}")
    print(f"  cluster start (once per campaign):                {start:6.2f} s")
    print(
        f"ratio dask / threads: {d / t:.2f}x   same rows: {results['threads'] == results['dask']}"
    )
    same = all(
        results[k] == results["dask"] for k in ("dask-reused", "store-first", "store-reused")
    )
    once = all(set(f.values()) == {1} for f in fetches)
    mb, one = fetch[1] / 1e6, fetch[0]
    print(f"the model from the store (s3://, by content key; {mb:.1f} MB, one fetch {one:.2f} s):")
    print(f"  dask, fresh workers, empty cache (fetch, load):   {rate['store-first']}")
    print(f"  dask again, the fetched model reused:             {rate['store-reused']}")
    print(
        f"ratio to the model at a path: first {first / d:.2f}x, reused {reused / warm:.2f}x"
        f"   one fetch per worker process: {once}   same rows: {same}"
    )


@contextlib.contextmanager
def s3_server(base: Path) -> Iterator[None]:
    """The S3 server (scripts/s3-server.sh, moto) with bucket ``bench``, its exports set here
    (the local cluster's workers inherit them)."""
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
        yield
    finally:
        subprocess.run(["bash", script, "stop"], env=env, check=False)


def stored_student(base: Path, student: Path, flows: Any) -> tuple[Any, tuple[float, int]]:
    """The student committed to ``s3://bench/models`` (as the bootstrap stage commits the
    built-in one) and a handle naming it by key; with the seconds and bytes of one fetch."""
    from data.model_fetch import fetch, forget, stored_model
    from data.objstore import attach
    from data.store import StageStore

    copy = base / "flow-copy"  # the flow's working copy of the workspace
    copy.mkdir()
    attach(copy, "s3://bench/models")
    store = StageStore(copy)
    writer = store.writer("bootstrap", 0, "b" * 64)
    shutil.copytree(student, writer.path("student"), dirs_exist_ok=True)
    writer.commit()
    path = copy / "bootstrap" / "round=0" / "student"
    stored = stored_model(copy, store.remote, str(path))
    handle = dataclasses.replace(flows, path=str(path), stored=stored)
    handle.get()  # the flow's own engine over its working copy: loaded before timing
    started = time.perf_counter()
    got = fetch(stored)  # here, into the workers' (empty) cache: what one fetch costs
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in got.iterdir())
    forget()
    shutil.rmtree(got.parent)
    return handle, (seconds, size)


def fetched_models() -> int:
    """On a worker: how many models this process fetched."""
    from data import model_fetch

    return len(model_fetch._FETCHED)


def object_storage_round_trip(sample: pa.Table, n_rows: int, repeats: int) -> None:
    """Commit a stage and read it back elsewhere: local disk against the S3 server."""
    from data.objstore import attach
    from data.schemas import SAMPLES
    from data.store import StageStore
    from tasks.common import read_stage

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
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
