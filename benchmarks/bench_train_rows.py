"""Assembling a round's training data: DuckDB join + streamed Arrow batches vs a bare scan.

The train stage joins the kept targets with the teacher's stored top-k in DuckDB and turns
Arrow record batches into training examples (``tasks/train.py``: ``training_rows``,
``build_examples``). This writes a synthetic round (``--rows`` kept targets x ``--tokens``
target tokens x top-``--k`` scores, in shards, half of a decisions table kept), then, each in a
fresh process:

- ``scan``: a bare pyarrow scan of the same columns of the same files (the floor);
- ``assemble``: ``training_rows`` + ``build_examples``, every example built then dropped.

Prints rows/s of each, their ratio (target >= 0.5) and each process's peak RSS (target < 2 GB,
flat in the row count: the data streams). The issue's 1,000,000 x 512 x 32 round is 65 GB of
top-k ids; run it where the disk holds it (``--rows 1000000``); the default is a size this
2-core machine writes in a minute, and ``--rows`` twice shows that RSS does not grow with it.

    python benchmarks/bench_train_rows.py [--rows 20000] [--tokens 512] [--k 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARD_ROWS = 2000


def write_round(root: Path, rows: int, tokens: int, k: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"targets": [], "decisions": [], "scores": []}
    n_kept = rows
    total = 2 * n_kept  # the filter keeps half
    for shard, start in enumerate(range(0, total, SHARD_ROWS)):
        n = min(SHARD_ROWS, total - start)
        pids = pa.array([f"p{i % 5000:05d}" for i in range(start, start + n)])
        idx = pa.array(np.arange(start, start + n, dtype=np.int32))
        off = pa.array(np.arange(0, (n + 1) * tokens, tokens, dtype=np.int32))
        tok = pa.ListArray.from_arrays(off, pa.array(rng.integers(0, 150000, n * tokens, np.int32)))
        koff = pa.array(np.arange(0, (n + 1) * tokens * k, tokens * k, dtype=np.int32))
        ids = pa.ListArray.from_arrays(
            koff, pa.array(rng.integers(0, 150000, n * tokens * k, np.int32))
        )
        lps = pa.ListArray.from_arrays(
            koff, pa.array(rng.integers(0, 2000, n * tokens * k).astype(np.int16))
        )
        kept = pa.array(np.arange(start, start + n) % 2 == 0)
        tables = {
            "targets": pa.table({"problem_id": pids, "sample_idx": idx, "token_ids": tok}),
            "decisions": pa.table({"problem_id": pids, "sample_idx": idx, "kept": kept}),
            "scores": pa.table(
                {
                    "problem_id": pids,
                    "sample_idx": idx,
                    "k": pa.array(np.full(n, k, np.int32)),
                    "num_tokens": pa.array(np.full(n, tokens, np.int32)),
                    "topk_ids": ids,
                    "topk_logprob_gaps": lps,
                }
            ),
        }
        for name, table in tables.items():
            path = root / name / f"part-{shard:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, compression="zstd")
            out[name].append(path)
    return out


def _scan(files: dict[str, list[Path]], queue: mp.Queue) -> None:
    started, rows = time.perf_counter(), 0
    for name in ("targets", "decisions", "scores"):
        for path in files[name]:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
                if name == "targets":
                    rows += batch.num_rows
    rows //= 2  # the same number of kept rows the assembly yields
    queue.put((rows, time.perf_counter() - started, _rss_mb()))


def _assemble(files: dict[str, list[Path]], queue: mp.Queue) -> None:
    from tasks.train import build_examples, training_rows
    from train.models import load_tokenizer

    tok = load_tokenizer(ROOT / "world" / "assets" / "tokenizer")
    problems = {f"p{i:05d}": {"prompt": f"What is {i} + {i}?"} for i in range(5000)}
    started, rows = time.perf_counter(), 0
    batches = training_rows(files["targets"], decisions=files["decisions"], scores=files["scores"])
    for example in build_examples(batches, problems, tok):
        rows += example.topk_ids.shape[0] > 0
    queue.put((rows, time.perf_counter() - started, _rss_mb()))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(target, files: dict[str, list[Path]]) -> tuple[int, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(files, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            files = write_round(Path(tmp), rows, args.tokens, args.k)
            size = sum(p.stat().st_size for fs in files.values() for p in fs) / 1e9
            print(f"{rows} kept rows x {args.tokens} tokens x top-{args.k}: {size:.2f} GB "
                  f"written in {time.perf_counter() - started:.0f} s")  # fmt: skip
            n_scan, t_scan, rss_scan = measure(_scan, files)
            n_asm, t_asm, rss_asm = measure(_assemble, files)
            assert n_scan == n_asm == rows, (n_scan, n_asm, rows)
            print(f"  scan      {n_scan / t_scan:9.0f} rows/s  peak RSS {rss_scan:6.0f} MB")
            print(f"  assemble  {n_asm / t_asm:9.0f} rows/s  peak RSS {rss_asm:6.0f} MB")
            print(f"  ratio assemble/scan {t_scan / t_asm:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
