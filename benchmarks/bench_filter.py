"""The filter stage over a million traces against a naive full-row COPY, side by side.

Synthetic ``samples`` and ``rewrites`` stage outputs of ``--rows`` traces each (realistic
widths: ~1.4 KB of trace text and its token ids per trace; committed through the stage store in
16 shards, as a round writes them) are filtered two ways in one run:

- **mpd**: the filter stage end to end (``filter_body``: DuckDB reads the committed files,
  decides on the numeric columns with the shipped rule, writes ``decisions``, the stage
  commits), then the kept rewrites' full rows exported as a user does,
  ``mpd sql --out kept.parquet "select r.* from rewrites r semi join kept using (...)"``
  (``catalog.run_query`` with the Parquet sink: DuckDB's batches streamed into the writer).
  The text is read only for what is kept.
- **naive**: one ``COPY (SELECT * … WHERE …)`` of the same kept rows, the same rule evaluated
  over full-width rows.

Both write the same kept rows (checked), zstd-compressed. The ratio is mpd / naive; the target
is <= 0.5. For the record, the naive query streamed into mpd's writer is timed too (it shows
how much of the gain is the writer and how much deciding on the numeric columns).

    python benchmarks/bench_filter.py [--rows 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARDS = 16
TEXT_BYTES = 1400
TOKENS = 350

# The shipped rule (data/sql/filter.sql) with faithful off, written as one query over full rows.
NAIVE = """
COPY (
    WITH judged AS (
        SELECT *,
            CASE
                WHEN truncated THEN 'truncated'
                WHEN pred_answer IS NULL THEN 'no_answer'
                WHEN NOT correct THEN 'wrong'
                WHEN think_tokens > {ratio} * orig_think_tokens THEN 'not_shorter'
            END AS drop_reason
        FROM read_parquet({files}, hive_partitioning = false)
    ),
    ranked AS (
        SELECT *, row_number() OVER (
            PARTITION BY problem_id, drop_reason IS NULL ORDER BY think_tokens, sample_idx
        ) AS rank_in_problem
        FROM judged
    )
    SELECT * EXCLUDE (drop_reason, rank_in_problem) FROM ranked
    WHERE drop_reason IS NULL AND rank_in_problem = 1
) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
"""

# What a user runs to get the kept traces' full rows: `mpd sql --out kept.parquet "<this>"`.
KEPT_ROWS = (
    "SELECT r.* FROM rewrites AS r SEMI JOIN kept AS k USING (round, problem_id, sample_idx)"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.9)
    args = p.parse_args()

    from data.catalog import SINK_BATCH_ROWS, run_query
    from data.store import StageStore
    from flows.sqlout import write_parquet_atomic
    from tasks.common import stage_files
    from tasks.filter import FilterConfig, filter_body

    with tempfile.TemporaryDirectory(dir=os.environ.get("MPD_BENCH_DIR")) as tmp:
        ws = Path(tmp) / "ws"
        started = time.perf_counter()
        write_inputs(StageStore(ws), args.rows)
        made = time.perf_counter() - started
        store = StageStore(ws)
        rewrites, samples = stage_files(store, "rewrite", 1), stage_files(store, "sample", 1)
        on_disk = sum(f.stat().st_size for f in rewrites + samples) / 1e9
        files = "[" + ", ".join(f"'{f}'" for f in rewrites) + "]"
        times: dict[str, list[float]] = {"mpd": [], "decide": [], "naive": [], "streamed": []}
        kept: dict[str, int] = {}
        for rep in range(args.repeats):  # interleaved: the machine's noise hits both alike
            out = Path(tmp) / f"naive-{rep}.parquet"
            t0 = time.perf_counter()
            duckdb.sql(NAIVE.format(ratio=args.ratio, files=files, out=out))
            times["naive"].append(time.perf_counter() - t0)
            kept["naive"] = duckdb.sql(f"select count(*) from '{out}'").fetchall()[0][0]
            naive_keys = key_set(out)
            out.unlink()

            t0 = time.perf_counter()
            cfg = FilterConfig(ratio=args.ratio)
            writer = store.writer("filter", 1, f"{rep:064d}")
            filter_body(writer, cfg, rewrites=rewrites, samples=samples, round_=1)
            writer.commit()
            decided = time.perf_counter()
            out = Path(tmp) / f"kept-{rep}.parquet"
            kept["mpd"] = run_query(ws, KEPT_ROWS, sink=partial(write_parquet_atomic, path=out))
            times["mpd"].append(time.perf_counter() - t0)
            times["decide"].append(decided - t0)
            assert key_set(out) == naive_keys, "mpd and the naive COPY kept different rows"
            out.unlink()

            select = NAIVE.format(ratio=args.ratio, files=files, out="")
            select = select.strip().removeprefix("COPY (").rsplit(") TO", 1)[0]
            t0 = time.perf_counter()
            write_parquet_atomic(duckdb.sql(select).to_arrow_reader(SINK_BATCH_ROWS), out)
            times["streamed"].append(time.perf_counter() - t0)
            out.unlink()
    m, d, n, st = (statistics.median(times[k]) for k in ("mpd", "decide", "naive", "streamed"))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{args.rows} rewrites + {args.rows} samples ({on_disk:.2f} GB of Parquet, made in "
        f"{made:.0f} s); kept {kept['mpd']} rows, the same on both sides"
    )
    print(f"  naive COPY (SELECT * ... WHERE ...):          {n:6.2f} s")
    print(f"  mpd filter stage (decisions, committed):      {d:6.2f} s")
    print(f"  mpd filter stage + kept rows (mpd sql --out): {m:6.2f} s")
    print(f"  (naive SELECT streamed into mpd's writer:     {st:6.2f} s)")
    print(f"ratio mpd / naive: {m / n:.2f}x (target <= 0.5; the stage alone {d / n:.2f}x)")


def key_set(path: Path) -> set[tuple[str, int]]:
    return set(duckdb.sql(f"select problem_id, sample_idx from '{path}'").fetchall())


def write_inputs(store, rows: int) -> None:
    """``rows`` samples and their rewrites, committed as stage outputs (16 shards each)."""
    from data.schemas import REWRITES, SAMPLES

    rng = np.random.default_rng(0)
    per = -(-rows // SHARDS)
    writers = {
        "sample": store.writer("sample", 1, "s" * 64),
        "rewrite": store.writer("rewrite", 1, "r" * 64),
    }
    for shard in range(SHARDS):
        lo, hi = shard * per, min(rows, (shard + 1) * per)
        if lo >= hi:
            break
        n = hi - lo
        # 8 samples per problem, so the rule's duplicate ranking has work to do
        problem = pa.array([f"gsm8k-train-{i // 8:07d}" for i in range(lo, hi)])
        sample_idx = pa.array(np.arange(lo, hi) % 8, pa.int32())
        think = rng.integers(150, 400, n).astype(np.int32)
        orig = rng.integers(200, 450, n).astype(np.int32)
        common = {
            "round": pa.array(np.ones(n, np.int32)),
            "problem_id": problem,
            "sample_idx": sample_idx,
            "prompt_tokens": pa.array(np.full(n, 60, np.int32)),
            "answer_tokens": pa.array(np.full(n, 8, np.int32)),
            "finish_reason": pa.array(["stop"] * n),
            "model": pa.array(["student"] * n),
        }
        for stage, schema in (("sample", SAMPLES), ("rewrite", REWRITES)):
            truncated = rng.random(n) < 0.05
            correct = rng.random(n) < 0.7
            answer = np.where(rng.random(n) < 0.03, None, "42")
            columns = {
                **common,
                "completion": text(rng, n),
                "token_ids": token_ids(rng, n),
                "think_tokens": pa.array(think if stage == "rewrite" else orig),
                "total_tokens": pa.array((think if stage == "rewrite" else orig) + 8),
                "truncated": pa.array(truncated),
                "correct": pa.array(correct),
                "pred_answer": pa.array(answer.tolist(), pa.string()),
            }
            if stage == "rewrite":
                columns |= {
                    "orig_think_tokens": pa.array(orig),
                    "orig_total_tokens": pa.array(orig + 8),
                    "orig_correct": pa.array(rng.random(n) < 0.7),
                    "orig_truncated": pa.array(rng.random(n) < 0.05),
                }
            table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
            writers[stage].write_shard(shard, table, schema)
    for writer in writers.values():
        writer.commit()


def text(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` traces of ~1.4 KB: random words of lower-case letters (text-like entropy)."""
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz     \n", np.uint8)
    data = letters[rng.integers(0, len(letters), n * TEXT_BYTES)]
    offsets = np.arange(0, (n + 1) * TEXT_BYTES, TEXT_BYTES, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))


def token_ids(rng: np.random.Generator, n: int) -> pa.Array:
    """``n`` token id lists of ``TOKENS`` ids from a 50k vocabulary."""
    values = pa.array(rng.integers(0, 50_000, n * TOKENS).astype(np.int32))
    offsets = pa.array(np.arange(0, (n + 1) * TOKENS, TOKENS, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


if __name__ == "__main__":
    main()
