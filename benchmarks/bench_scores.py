"""Teacher scores on disk: bytes per target token at k = 32, as stored and re-encoded.

Scores a round's worth of the built-in world's traces for real (the shipped student samples
``--problems`` training problems, the shipped teacher scores every trace at top-32 through the
score stage's own body, committed through the stage store), then reports the committed shards'
bytes per target token (logprobs stored as rank-order gaps, data/schemas.py) against the same
values stored as absolute int16 (the layout before), side by side; the two decode to each other
exactly, so the loss the trainer computes from them is unchanged. ``--workspace WS`` adds the committed score
stages of other workspaces (e.g. ``runs/smollm2-gsm8k``: a 49,152-token vocabulary).

    python benchmarks/bench_scores.py [--problems 64] [--n 4] [--workspace runs/smollm2-gsm8k]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per problem")
    p.add_argument("--workspace", type=Path, action="append", default=[])
    args = p.parse_args()

    from data.store import StageStore
    from tasks.common import stage_files

    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        world_scores(StageStore(ws), args.problems, args.n)
        report("built-in world (805-token vocabulary)", stage_files(StageStore(ws), "score", 1))
    for other in args.workspace:
        store = StageStore(other)
        rounds = sorted({m.round for m in store.committed() if m.stage == "score"})
        files = [f for r in rounds for f in stage_files(store, "score", r)]
        report(f"{other} (rounds {rounds})", files)


def world_scores(store, problems: int, n: int) -> None:
    """Sample the shipped student on world problems, score the traces with the shipped teacher."""
    import torch

    from data.answers import answers_match
    from data.world import build_problems
    from engines.config import EngineConfig
    from tasks.common import read_stage, run_stage
    from tasks.engines import EngineHandle
    from tasks.sample import SampleConfig, sample_body
    from tasks.score import ScoreConfig, score_body

    torch.set_num_threads(2)
    assets = ROOT / "assets" / "world"
    records = build_problems(11, problems, 0, 0, difficulty=1)
    student = EngineHandle(EngineConfig(kind="hf"), str(assets / "student"), "float32", "cpu")
    teacher = EngineHandle(EngineConfig(kind="hf"), str(assets / "teacher"), "float32", "cpu")
    cfg = SampleConfig(problems_per_round=problems, n=n, max_tokens=512, shard_size=16)
    run_stage(
        store,
        "sample",
        1,
        "s" * 64,
        lambda w: sample_body(
            w,
            cfg,
            engine=student,
            records=records,
            round_=1,
            seed=0,
            model="s",
            grader=answers_match,
        ),
    )
    samples = read_stage(store, "sample", 1).to_pylist()
    run_stage(
        store,
        "score",
        1,
        "t" * 64,
        lambda w: score_body(
            w,
            ScoreConfig(top_k=32, context="problem"),  # the default shards: 64 traces
            engine=teacher.get(),
            rewrites=samples,
            samples={(s["problem_id"], s["sample_idx"]): s for s in samples},
            problems={r["problem_id"]: r for r in records},
            rewrite_template="{problem}\n{trace}",
            round_=1,
            model="t",
        ),
    )


def report(name: str, files: list[Path]) -> None:
    """Bytes per target token as committed, and the same values as absolute int16 (the layout
    before rank-order gaps), side by side; each layout decodes to the other exactly."""
    from data.schemas import logprob_gaps

    table = pa.concat_tables([pq.read_table(f) for f in files])
    tokens = int(pc.sum(table.column("num_tokens")).as_py())
    k = int(table.column("k")[0].as_py())
    stored = sum(f.stat().st_size for f in files)
    ids = table.column("topk_ids").combine_chunks()
    if "topk_logprob_gaps" in table.column_names:
        gaps = table.column("topk_logprob_gaps").combine_chunks()
    else:  # a shard committed before the gaps: its absolute values, re-encoded here
        old = table.column("topk_logprobs_q").combine_chunks()
        flat = logprob_gaps(old.values.to_numpy().reshape(-1, k)).reshape(-1)
        gaps = pa.ListArray.from_arrays(old.offsets, pa.array(flat, pa.int16()))
    g = gaps.values.to_numpy().reshape(-1, k)
    absolute = (-np.cumsum(g.astype(np.int32), axis=1)).astype(np.int16)
    assert np.array_equal(logprob_gaps(absolute), g), "the layouts must decode to each other"
    values = pa.ListArray.from_arrays(gaps.offsets, pa.array(absolute.reshape(-1), pa.int16()))
    now, before = nbytes([ids, gaps]), nbytes([ids, values])
    print(f"{name}: {table.num_rows} traces, {tokens} target tokens, k = {k}")
    print(f"  as committed (every column, zstd):        {stored / tokens:6.1f} B/token")
    print(f"  ids + logprob gaps (as stored):           {now / tokens:6.1f} B/token")
    print(f"    of which ids {nbytes([ids]) / tokens:.1f}, gaps {nbytes([gaps]) / tokens:.1f}")
    print(f"  ids + absolute int16 logprobs (before):   {before / tokens:6.1f} B/token")
    print(f"ratio stored / before: {now / before:.2f}x (target: <= 80 B/token at k = 32)")


def nbytes(columns: list[pa.Array]) -> int:
    """Bytes of these columns alone in a zstd Parquet file (as the store writes)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({f"c{i}": c for i, c in enumerate(columns)}), buf, compression="zstd")
    return buf.getbuffer().nbytes


if __name__ == "__main__":
    main()
