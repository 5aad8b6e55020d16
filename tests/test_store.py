"""The stage store: atomic commits, shard resume, corruption, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from data.schemas import DECISIONS
from data.stage_writer import CorruptShardError
from data.store import StageStore


def decisions(round_: int, lo: int, hi: int) -> pa.Table:
    n = hi - lo
    return pa.table(
        {
            "round": [round_] * n,
            "problem_id": [f"p{i:04d}" for i in range(lo, hi)],
            "sample_idx": [0] * n,
            "kept": [i % 2 == 0 for i in range(lo, hi)],
            "reason": ["kept" if i % 2 == 0 else "wrong" for i in range(lo, hi)],
            "think_tokens": list(range(lo, hi)),
            "orig_think_tokens": [100] * n,
            "ratio": [i / 100 for i in range(lo, hi)],
        }
    )


def visible_rows(ws: Path, stage: str) -> int:
    """Rows SQL can see for a stage: committed partitions only, as the catalog globs them."""
    files = list(ws.glob(f"{stage}/round=*/*.parquet"))
    if not files:
        return 0
    paths = [str(f) for f in files]
    return duckdb.sql(f"select count(*) from read_parquet({paths})").fetchall()[0][0]


def test_commit_lookup_roundtrip(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    w = store.writer("filter", 1, "k" * 64, code_version="test")
    w.write_shard(0, decisions(1, 0, 10), DECISIONS)
    w.write_shard(1, decisions(1, 10, 15), DECISIONS)
    assert visible_rows(tmp_path, "filter") == 0, "staging must be invisible before commit"
    man = w.commit({"note": "x"}, expected_shards=2)
    assert man.rows == 15 and [f.rows for f in man.files] == [10, 5]
    assert store.lookup("filter", 1, "k" * 64) is not None
    assert store.lookup("filter", 1, "z" * 64) is None, "another key is a miss"
    assert visible_rows(tmp_path, "filter") == 15
    assert not any((tmp_path / ".staging").iterdir()), "empty staging is pruned after commit"
    assert store.manifest("filter", 1).extra == {"note": "x"}


def test_corrupt_and_missing_files_are_not_done(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    w = store.writer("filter", 1, "a" * 64)
    w.write_shard(0, decisions(1, 0, 20), DECISIONS)
    w.write_shard(1, decisions(1, 20, 40), DECISIONS)
    w.commit(expected_shards=2)
    shard = store.stage_dir("filter", 1) / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    assert any("corrupt" in p for p in store.validate("filter", 1))
    assert store.lookup("filter", 1, "a" * 64) is None
    (store.stage_dir("filter", 1) / "part-00001.parquet").unlink()
    assert any("missing file part-00001" in p for p in store.validate("filter", 1))
    (store.stage_dir("filter", 1) / "_manifest.json").write_text("{not json")
    assert store.manifest("filter", 1) is None
    assert store.lookup("filter", 1, "a" * 64) is None


def test_resume_same_key_reuses_shards_other_key_starts_clean(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    w = store.writer("filter", 2, "b" * 64)
    w.write_shard(0, decisions(2, 0, 5), DECISIONS)
    w.write_shard(3, decisions(2, 15, 20), DECISIONS)
    again = store.writer("filter", 2, "b" * 64)
    assert again.resumed == {0, 3}
    with pytest.raises(CorruptShardError, match=r"\[1, 2\]"):
        again.commit(expected_shards=4)
    other = store.writer("filter", 2, "c" * 64)
    assert other.resumed == set()
    assert not (tmp_path / ".staging" / "filter" / "round=2" / ("b" * 16)).exists()


def test_corrupt_shard_in_staging_is_redone(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    w = store.writer("filter", 1, "d" * 64)
    w.write_shard(0, decisions(1, 0, 5), DECISIONS)
    w.write_shard(1, decisions(1, 5, 10), DECISIONS)
    (w.dir / "part-00001.parquet").write_bytes(b"garbage")
    assert store.writer("filter", 1, "d" * 64).resumed == {0}
    assert not (w.dir / "part-00001.parquet").exists()


def test_recommit_replaces_previous_version(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    w = store.writer("filter", 1, "e" * 64)
    w.write_shard(0, decisions(1, 0, 3), DECISIONS)
    w.write_shard(1, decisions(1, 3, 6), DECISIONS)
    w.commit()
    w = store.writer("filter", 1, "f" * 64)
    w.write_shard(0, decisions(1, 0, 4), DECISIONS)
    w.commit()
    assert visible_rows(tmp_path, "filter") == 4
    assert sorted(p.name for p in store.stage_dir("filter", 1).iterdir()) == [
        "_manifest.json",
        "part-00000.parquet",
    ]
    assert not any((tmp_path / ".trash").iterdir())


def test_non_parquet_outputs_are_in_the_manifest(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    w = store.writer("train", 1, "g" * 64)
    w.path("model/config.json").write_text("{}")
    w.path("model/weights.bin").write_bytes(os.urandom(1000))
    man = w.commit()
    assert {f.path for f in man.files} == {"model/config.json", "model/weights.bin"}
    assert man.rows == 0 and store.validate("train", 1) == []


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from data.schemas import DECISIONS
    from data.store import StageStore
    from tests.test_store import decisions

    store = StageStore({ws!r})
    w = store.writer("filter", 1, "k" * 64)
    print("resumed", sorted(w.resumed), flush=True)
    for i in range(8):
        if i in w.resumed:
            continue
        w.write_shard(i, decisions(1, i * 10, i * 10 + 10), DECISIONS)
        time.sleep({pause})
    w.commit(expected_shards=8)
    print("committed", flush=True)
    """
)


def _writer(ws: Path, pause: float) -> list[str]:
    repo = str(Path(__file__).resolve().parents[1])
    return ["python", "-c", WRITER.format(repo=repo, ws=str(ws), pause=pause)]


def test_kill_9_mid_stage_then_resume(tmp_path: Path, python: str) -> None:
    ws, ref = tmp_path / "ws", tmp_path / "ref"
    cmd = _writer(ws, pause=0.4)
    cmd[0] = python
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    markers = ws / ".staging" / "filter" / "round=1" / ("k" * 16) / "_shards"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert visible_rows(ws, "filter") == 0, "a killed stage must show no rows to SQL"
    finished = len(list(markers.glob("*.json")))
    assert 3 <= finished < 8

    out = subprocess.run([python, *cmd[1:]], capture_output=True, text=True, check=True).stdout
    resumed = eval(out.splitlines()[0].removeprefix("resumed "))
    assert resumed == list(range(finished)), "finished shards are reused, the rest redone"

    ref_cmd = _writer(ref, pause=0)
    subprocess.run([python, *ref_cmd[1:]], check=True, capture_output=True)
    q = "select * from read_parquet('{}/filter/round=*/*.parquet') order by problem_id"
    assert duckdb.sql(q.format(ws)).fetchall() == duckdb.sql(q.format(ref)).fetchall()
    assert visible_rows(ws, "filter") == 80


def test_adopt_links_a_valid_commit_of_the_same_key_and_nothing_else(tmp_path: Path) -> None:
    """How workspaces share a stage (cache_from): the same key, a valid commit, hard links;
    a different key or a corrupt source is a miss, and nothing appears in the target."""
    source, target = StageStore(tmp_path / "a"), StageStore(tmp_path / "b")
    key = "k" * 64
    writer = source.writer("filter", 1, key)
    writer.write_table("decisions.parquet", decisions(1, 0, 10), DECISIONS)
    writer.path("model/weights.bin").write_bytes(b"w" * 100)
    writer.commit({"kept": 5})

    assert target.adopt(source, "filter", 1, "x" * 64) is None
    assert not (tmp_path / "b" / "filter").exists()
    man = target.adopt(source, "filter", 1, key)
    assert man is not None and man.extra == {"kept": 5, "shared_from": str(source.workspace)}
    assert target.lookup("filter", 1, key) is not None
    for rel in ("decisions.parquet", "model/weights.bin"):
        a, b = source.stage_dir("filter", 1) / rel, target.stage_dir("filter", 1) / rel
        assert a.stat().st_ino == b.stat().st_ino, rel
    assert not [p for p in (tmp_path / "b" / ".staging").rglob("*") if p.is_file()]

    part = source.stage_dir("filter", 1) / "model" / "weights.bin"
    part.unlink()  # the source loses a file: adopting again is a miss, the copy stays whole
    assert StageStore(tmp_path / "c").adopt(source, "filter", 1, key) is None
    assert target.lookup("filter", 1, key) is not None


def test_fencing_a_local_writer_that_lost_its_lease_commits_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    """The local store's fenced steps, in one process: once another writer has taken the
    lease over (ours expired: we were paused) or the lease file is gone, our shard writes,
    commit (the rename under the lease file's flock), a new writer's staging clean-up, a rerun's
    delete and an abandon all refuse with the one line, and change nothing."""
    from data.fence import LeaseLostError
    from data.lock import FileLease, WorkspaceLock

    store = StageStore(tmp_path)
    lock = WorkspaceLock(tmp_path, command="writer A").acquire()
    try:
        w = store.writer("filter", 1, "k" * 64, code_version="test")
        w.write_shard(0, decisions(1, 0, 10), DECISIONS)
        ours = lock._file
        assert ours is not None
        ours.stop_heartbeat()  # paused: the lease runs out
        record = {"pid": os.getpid(), "host": "b", "command": "writer B", "expires": 0}
        (tmp_path / ".lock").write_text(json.dumps({**record, "generation": 1}))
        other = FileLease(tmp_path / ".lock", {**record, "command": "writer B"}).acquire()
        other.stop_heartbeat()
        for step in (
            lambda: w.write_shard(1, decisions(1, 10, 15), DECISIONS),
            lambda: w.commit(expected_shards=1),
            lambda: store.writer("filter", 1, "z" * 64),
            lambda: store.invalidate("filter", 1),
            w.abandon,
        ):
            with pytest.raises(LeaseLostError, match=r"lost the lease .*writer B"):
                step()
        assert (w.dir / "part-00000.parquet").exists(), "A's own staging left as it was"
        assert store.manifest("filter", 1) is None, "A committed nothing"
        assert lock.lost is not None
        (tmp_path / ".lock").unlink()  # the lease file gone: nobody's, ours neither
        with pytest.raises(LeaseLostError):
            ours.guard().__enter__()
    finally:
        lock.release()  # lost: writes nothing
    assert not (tmp_path / ".lock").exists()
