"""Score, rewrite and truncate read their inputs a shard at a time and write resumable shards.

- Their committed rows equal those of the whole-table bodies they replace (4c4a540's, kept as
  the reference in ``tests/whole_table_stages.py``), row for row and in order, on a small round
  of the shipped tiny models, with shard sizes that cut across the input files.
- Their memory is bounded by a shard: the Python heap's peak over a round of 4N traces is about
  that over N (the whole-table bodies': 2.5-4x). ``benchmarks/bench_stage_memory.py`` measures
  the process's peak RSS on rounds of 100k traces.
- A shard that fails (the served endpoint gives up: a transient error) or a stage killed with
  SIGKILL resumes with its finished shards reused as they were, and commits the rows of a run
  that never failed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.filter
import tasks.rewrite
import tasks.sample
import tasks.score
import tasks.truncate
from data.store import StageStore
from engines.hf import load_hf_engine
from engines.openai_http import EngineGaveUpError
from tasks.common import read_stage
from tasks.context import Context
from tasks.engines import close_engines
from tasks.stream import Rows, aligned
from tests.conftest import REPO
from tests.standin_server import StandInServer
from tests.stream_world import (
    STUDENT,
    StandInEngine,
    commit_problems,
    context,
    new_round,
    write_round,
)
from tests.whole_table_stages import whole_table_rewrite, whole_table_score, whole_table_truncate
from world import build_problems

KEEP_FIRST = REPO / "tests" / "fixtures" / "keep_first_filter.sql"
# Shards of 2 prompts x 2 samples, read by rewrite in shards of 5, scored in shards of 3,
# truncated in shards of 2: every reader's shards cut across its input's files.
ROUND = {
    "sample": {"problems_per_round": 6, "n": 2, "max_tokens": 40, "shard_size": 2},
    "rewrite": {"max_tokens": 40, "shard_size": 5},
    "score": {"shard_size": 3, "top_k": 8, "context": "rewrite"},
    "filter": {"sql": str(KEEP_FIRST)},
}
TRUNCATE_SHARD = 2


@pytest.fixture(scope="module")
def small_round(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A round of the tiny models, computed by the streamed stages: sample, rewrite, filter
    (keeps sample 0 of each problem), truncate; score is left to each test."""
    ws = tmp_path_factory.mktemp("round") / "ws"
    commit_problems(StageStore(ws), build_problems(11, 8, 0, 0, difficulty=1))
    ctx = context(ws, **ROUND)
    rnd = new_round(ctx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.truncate, "SHARD_ROWS", TRUNCATE_SHARD, raising=False)
        for stage in (tasks.sample, tasks.rewrite, tasks.filter, tasks.truncate):
            stage.run(ctx, rnd)
    yield ws
    close_engines()


def reference(ctx: Context, stage: str, compute: Callable[[Any], dict], tmp: Path) -> list[dict]:
    """The rows a whole-table body commits, in a workspace of their own."""
    writer = StageStore(tmp / "reference").writer(stage, 1, "w" * 64)
    compute(writer)
    writer.commit()
    return read_stage(StageStore(tmp / "reference"), stage, 1).to_pylist()


def committed(ws: Path, stage: str) -> list[dict]:
    return read_stage(StageStore(ws), stage, 1).to_pylist()


def shards(ws: Path, stage: str) -> int:
    man = StageStore(ws).manifest(stage, 1)
    assert man is not None
    return len([f for f in man.files if f.path.startswith("part-")])


def test_rewrite_commits_the_whole_table_rows(small_round: Path, tmp_path: Path) -> None:
    ctx = context(small_round, **ROUND)
    rnd = new_round(ctx)
    engine = tasks.rewrite.stage_engine(ctx, "rewriter", ctx.model(None).path)
    want = reference(ctx, "rewrite", lambda w: whole_table_rewrite(ctx, rnd, w, engine), tmp_path)
    assert committed(small_round, "rewrite") == want
    assert len(want) == 12 and shards(small_round, "rewrite") == 3


def test_truncate_commits_the_whole_table_rows(small_round: Path, tmp_path: Path) -> None:
    ctx = context(small_round, **ROUND)
    rnd = new_round(ctx)
    want = reference(ctx, "truncate", lambda w: whole_table_truncate(ctx, rnd, w), tmp_path)
    assert committed(small_round, "truncate") == want
    assert len(want) == 6 and shards(small_round, "truncate") == 3  # the kept sample 0s


@pytest.mark.parametrize(
    ("targets", "score_context"), [("rewrite", "rewrite"), ("truncate", "problem")]
)
def test_score_commits_the_whole_table_rows(
    small_round: Path, tmp_path: Path, targets: str, score_context: str
) -> None:
    ws = shutil.copytree(small_round, tmp_path / "ws")
    ctx = context(ws, **{**ROUND, "score": {**ROUND["score"], "context": score_context}})
    rnd = new_round(ctx, targets=targets)
    tasks.score.run(ctx, rnd)
    engine = tasks.score.stage_engine(ctx, "teacher", ctx.model(None).path)
    label = str(ctx.cfg.models.teacher)

    def compute(w: Any) -> dict:
        return whole_table_score(ctx, rnd, w, engine, model=label)

    want = reference(ctx, "score", compute, tmp_path)
    assert committed(ws, "score") == want
    assert {r["context"] for r in want} == {score_context}
    assert len(want) == len(committed(ws, targets)) > 3 and shards(ws, "score") >= 2


# -- tasks/stream.py ---------------------------------------------------------------------------
def test_rows_take_any_positions_across_files_and_row_groups(tmp_path: Path) -> None:
    """Positions in any order, repeated, across files of several row groups and an empty file:
    the rows a naive take over the concatenated files gives."""
    sizes, files = [7, 0, 12, 5], []
    for f, n in enumerate(sizes):
        start = sum(sizes[:f])
        columns = {"x": list(range(start, start + n)), "y": [f"r{i}" for i in range(n)]}
        table = pa.table(columns, pa.schema({"x": pa.int64(), "y": pa.string()}))
        files.append(tmp_path / f"part-{f}.parquet")
        pq.write_table(table, files[-1], row_group_size=3)
    rows = Rows(files, ["x", "y"], sizes)
    whole = pa.concat_tables([pq.read_table(f) for f in files])
    positions = np.random.default_rng(0).integers(0, len(rows), 60)
    assert len(rows) == whole.num_rows == 24
    assert rows.take(positions).to_pylist() == whole.take(positions).to_pylist()
    assert rows.take(np.arange(5, 20)).column("x").to_pylist() == list(range(5, 20))
    assert rows.take(np.zeros(0, np.int64)).num_rows == 0
    with pytest.raises(IndexError):
        rows.take(np.array([24]))


def test_a_target_without_its_sample_is_named(tmp_path: Path) -> None:
    """Targets and samples come from the same round: a target whose (problem_id, sample_idx)
    no sample has, or two have, is a bug, and says which."""

    def stage(name: str, keys: list[tuple[str, int]]) -> Rows:
        table = pa.table({"problem_id": [k[0] for k in keys], "sample_idx": [k[1] for k in keys]})
        pq.write_table(table, tmp_path / f"{name}.parquet")
        return Rows([tmp_path / f"{name}.parquet"], ["problem_id"], [len(keys)])

    samples = stage("samples", [("a", 0), ("a", 1), ("b", 0)])
    where, of_sample = aligned(stage("good", [("b", 0), ("a", 1)]), samples)
    assert where.tolist() == [0, 1] and of_sample.tolist() == [2, 1]
    with pytest.raises(RuntimeError, match="c sample 0: no sample row"):
        aligned(stage("orphan", [("a", 0), ("c", 0)]), samples)
    twice = stage("twice", [("a", 0), ("a", 0)])
    with pytest.raises(RuntimeError, match="matches two samples"):
        aligned(stage("dup", [("a", 0)]), twice)


# -- memory: a shard, not the round --------------------------------------------------------------
MEMORY_ROWS, MEMORY_SHARD = 128, 16


def heap_peak(stage: str, ws: Path, rows: int) -> float:
    """The Python heap's peak (MB, tracemalloc) while ``stage`` runs over ``rows`` traces."""
    write_round(ws, rows)
    shard = {"shard_size": MEMORY_SHARD}
    ctx = context(ws, rewrite=shard, score={**shard, "top_k": 4, "context": "rewrite"})
    rnd = new_round(ctx)
    assert ctx.problems  # read before measuring: the campaign holds the problems anyway
    tracemalloc.start()
    try:
        getattr(tasks, stage).run(ctx, rnd)
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("stage", ["rewrite", "score", "truncate"])
def test_a_stage_holds_a_shard_not_the_round(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole-table bodies held every input row as Python objects: their heap grew 2.5-4x
    with 4x the rows (measured at 4c4a540). Streamed, it stays within 1.5x."""
    from train.models import load_tokenizer

    engine = StandInEngine(load_tokenizer(STUDENT))  # a model would take minutes on 640 traces
    for module in (tasks.rewrite, tasks.score):
        monkeypatch.setattr(module, "stage_engine", lambda *a, **k: engine)
    monkeypatch.setattr(tasks.truncate, "SHARD_ROWS", MEMORY_SHARD, raising=False)
    heap_peak(stage, tmp_path / "warm", MEMORY_SHARD)  # first-use imports and caches
    small = heap_peak(stage, tmp_path / "small", MEMORY_ROWS)
    large = heap_peak(stage, tmp_path / "large", 4 * MEMORY_ROWS)
    assert large < 1.5 * small, (
        f"{stage}: {small:.1f} MB over {MEMORY_ROWS} traces, {large:.1f} MB over 4x"
    )


# -- resume ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[StandInServer]:
    srv = StandInServer(load_hf_engine(STUDENT, device="cpu")).start()
    yield srv
    srv.stop()


def served(ws: Path, url: str) -> Context:
    """``ROUND``'s campaign with the rewriter and teacher behind the stand-in server (which
    serves the tiny student; the rows need not be a teacher's, only the same on every run)."""
    engine = {"kind": "openai", "base_url": url, "served_model_name": "tiny", "max_retries": 0}
    engine["max_concurrency"] = 1  # one request at a time: which one fails is known
    return context(ws, **ROUND, engines={"teacher": engine})


def staged(ws: Path, stage: str) -> dict[str, int]:
    """The finished shards in staging: file name -> inode."""
    (keydir,) = (ws / ".staging" / stage / "round=1").iterdir()
    marked = {m.name.removesuffix(".json") for m in (keydir / "_shards").glob("*.json")}
    return {p.name: p.stat().st_ino for p in keydir.glob("part-*.parquet") if p.name in marked}


@pytest.mark.parametrize("stage", ["rewrite", "score"])
def test_a_failed_shard_resumes_with_the_finished_ones_reused(
    stage: str, small_round: Path, server: StandInServer, tmp_path: Path
) -> None:
    """The endpoint answers 7 requests and then only 500s: the engine gives up (a transient
    error) in the third shard. The next run reuses the two finished shards (the same files) and
    commits the rows of a run that never failed."""
    module = getattr(tasks, stage)
    clean, ws = (shutil.copytree(small_round, tmp_path / name) for name in ("clean", "ws"))
    for where in (clean, ws):  # computed anew (the fixture's rewrites are the teacher's)
        shutil.rmtree(where / stage / "round=1", ignore_errors=True)
    server.reset()
    ctx = served(clean, server.base_url)
    module.run(ctx, new_round(ctx))

    ctx = served(ws, server.base_url)
    server.reset(fail_after=7)
    with pytest.raises(EngineGaveUpError):
        module.run(ctx, new_round(ctx))
    finished = staged(ws, stage)
    assert len(finished) == 7 // ROUND[stage]["shard_size"]
    assert not (ws / stage / "round=1").exists(), "nothing half-done was committed"

    server.reset()
    result = module.run(ctx, new_round(ctx))
    man = StageStore(ws).manifest(stage, 1)
    assert man is not None and man.resumed_shards == len(finished) and not result.cached
    for name, inode in finished.items():
        assert (ws / stage / "round=1" / name).stat().st_ino == inode, name
    assert committed(ws, stage) == committed(clean, stage)
    close_engines()


KILL_SHARD = 16


def test_killed_truncate_resumes_with_the_finished_shards_reused(tmp_path: Path) -> None:
    """kill -9 in the middle of a truncate stage (256 kept rewrites, shards of 16): the next
    run reuses the finished shards as they are, and commits the whole-table body's rows."""
    ws = tmp_path / "ws"
    write_round(ws, 512)
    cmd = [sys.executable, "-m", "tests.stream_world", str(ws), str(KILL_SHARD)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((ws / ".staging").glob("truncate/round=1/*/_shards/*.json")):
            assert proc.poll() is None, "the stage ended before its first shard"
            assert time.monotonic() < deadline, "no shard in 2 minutes"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    finished = staged(ws, "truncate")
    print(f"killed after {len(finished)} of {256 // KILL_SHARD} shards")
    assert 1 <= len(finished) < 256 // KILL_SHARD, "the kill landed mid-stage"
    assert not (ws / "truncate" / "round=1").exists()

    ctx = context(ws)
    rnd = new_round(ctx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.truncate, "SHARD_ROWS", KILL_SHARD, raising=False)
        tasks.truncate.run(ctx, rnd)
    man = StageStore(ws).manifest("truncate", 1)
    assert man is not None and man.resumed_shards == len(finished)
    for name, inode in finished.items():
        assert (ws / "truncate" / "round=1" / name).stat().st_ino == inode, name
    want = reference(ctx, "truncate", lambda w: whole_table_truncate(ctx, rnd, w), tmp_path)
    assert committed(ws, "truncate") == want
    assert man.extra["target_tokens"] == sum(r["total_tokens"] for r in want)
