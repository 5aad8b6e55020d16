"""Peak memory of the rewrite, score and truncate stages over a round: whole tables vs streamed.

One synthetic round of ``--rows`` traces (~1.4 KB of text and 350 token ids each, the shapes of
``benchmarks/bench_filter.py``; committed as the stages commit them, in shards of 256 rows) is
written once. Each (stage, path) then runs in a fresh subprocess, so peaks do not mix:

- **whole**: 4c4a540's bodies (``tests/whole_table_stages.py``): every input table read whole
  into Python lists before the first shard;
- **streamed**: the stage as it is (``tasks/<stage>.py``): each shard's input rows read when the
  shard runs (``tasks/stream.py``).

Both write their shards through the stage store and commit. The rewriter and the teacher are a
stand-in engine (``tests.stream_world.StandInEngine``: not a model, it answers and scores
instantly), so what is measured is the data path, not inference. Reported per run: the process's
resident memory when the stage starts (interpreter, libraries, tokenizer, problems) and its peak
during the stage (Linux VmHWM), and the ratio of what the stage added, streamed / whole.

    python benchmarks/bench_stage_memory.py [--rows 50000] [--stages rewrite score truncate]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.store import StageStore  # noqa: E402  (after the path: run as a script from anywhere)

STAGES = ("rewrite", "score", "truncate")
INPUTS = {
    "rewrite": ["sample"],
    "score": ["sample", "rewrite"],
    "truncate": ["sample", "rewrite", "filter"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--shard-size", type=int, default=64, help="rewrite and score shards")
    p.add_argument("--top-k", type=int, default=4, help="score: candidates per token")
    p.add_argument("--score-context", choices=["problem", "rewrite"], default="rewrite")
    p.add_argument("--child", nargs=4, metavar=("STAGE", "PATH", "INPUTS", "OUT"), help="internal")
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args, *args.child)))
        return

    from tests.stream_world import write_round

    with tempfile.TemporaryDirectory(dir=os.environ.get("MPD_BENCH_DIR")) as tmp:
        inputs = Path(tmp) / "inputs"
        started = time.perf_counter()
        write_round(inputs, args.rows)
        made = time.perf_counter() - started
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{args.rows} samples and rewrites ({made:.0f} s to write), half of them kept")
        print(
            f"{'stage':9} {'path':9} {'rows':>7} {'at start':>9} {'peak':>9} {'added':>9} {'s':>6}"
        )
        for stage in args.stages:
            added = {}
            for path in ("whole", "streamed"):
                out = Path(tmp) / f"{stage}-{path}"
                got = child(args, stage, path, inputs, out)
                added[path] = got["peak_mb"] - got["start_mb"]
                print(
                    f"{stage:9} {path:9} {got['rows']:7d} {got['start_mb']:7.0f}MB "
                    f"{got['peak_mb']:7.0f}MB {added[path]:7.0f}MB {got['seconds']:6.1f}"
                )
            same = same_rows(Path(tmp), stage)
            ratio = added["streamed"] / max(added["whole"], 1.0)
            print(f"{stage:9} streamed / whole (added): {ratio:.3f}; rows identical: {same}")


def child(args: argparse.Namespace, stage: str, path: str, inputs: Path, out: Path) -> dict:
    """One (stage, path) in a fresh interpreter; its measurements."""
    cmd = [sys.executable, __file__, "--rows", str(args.rows), "--shard-size",
           str(args.shard_size), "--top-k", str(args.top_k), "--score-context", args.score_context,
           "--child", stage, path, str(inputs), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{stage} {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(args: argparse.Namespace, stage: str, path: str, inputs: str, out: str) -> dict:
    """Link the stage's inputs into a workspace of its own, then run it there and measure."""
    import tasks.rewrite
    import tasks.score
    import tasks.truncate
    from tasks.common import run_stage
    from tests.stream_world import StandInEngine, context, new_round
    from tests.whole_table_stages import (
        whole_table_rewrite,
        whole_table_score,
        whole_table_truncate,
    )
    from train.models import load_tokenizer

    source, store = StageStore(inputs), StageStore(out)
    for name, r in [("problems", 0), *((s, 1) for s in INPUTS[stage])]:
        man = source.manifest(name, r)
        assert man is not None and store.adopt(source, name, r, man.key) is not None
    shard = {"shard_size": args.shard_size}
    score = {**shard, "top_k": args.top_k, "context": args.score_context}
    ctx = context(Path(out), rewrite=shard, score=score)
    rnd = new_round(ctx)
    engine = StandInEngine(load_tokenizer(rnd.student.path))
    tasks.rewrite.stage_engine = tasks.score.stage_engine = lambda *a, **k: engine
    # Loaded before measuring, as in a campaign by then: the problems, Prefect (the shard loop),
    # DuckDB (the filter's, here the streamed stages' joins).
    import duckdb  # noqa: F401

    import tasks.shards

    assert ctx.problems
    whole = {
        "rewrite": lambda w: whole_table_rewrite(ctx, rnd, w, engine),
        "score": lambda w: whole_table_score(ctx, rnd, w, engine, model=ctx.cfg.models.teacher),
        "truncate": lambda w: whole_table_truncate(ctx, rnd, w),
    }
    start_mb = _status_mb("VmRSS")
    started = time.perf_counter()
    if path == "whole":
        result = run_stage(store, stage, 1, "w" * 64, whole[stage])
    else:
        result = getattr(tasks, stage).run(ctx, rnd)
    seconds = time.perf_counter() - started
    return {"rows": result.rows, "start_mb": start_mb, "peak_mb": _status_mb("VmHWM"),
            "seconds": seconds}  # fmt: skip


def same_rows(tmp: Path, stage: str) -> bool:
    """Whether both paths committed the same rows in the same order (compared 256 rows at a
    time, one Parquet file read at a time on each side)."""
    from itertools import zip_longest

    import pyarrow.parquet as pq

    from tasks.common import stage_files

    def batches(path: str) -> Iterator[pa.RecordBatch]:
        for f in stage_files(StageStore(tmp / f"{stage}-{path}"), stage, 1):
            yield from pq.read_table(f).to_batches()

    pairs = zip_longest(_rebatch(batches("whole")), _rebatch(batches("streamed")))
    return all(a is not None and b is not None and a.equals(b) for a, b in pairs)


def _rebatch(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.Table]:
    """Tables of exactly 256 rows (the last shorter), whatever the files' sizes."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= 256:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, 256).combine_chunks()
            rest = table.slice(256)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks()


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
