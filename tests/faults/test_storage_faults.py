"""Storage faults a workspace meets on a bad night, from one table: what SQL and `mpd status`
show after each. A new case is one line.

The workspace is written by the real store (``StageWriter``: shards, markers, the manifest, the
rename), two committed stage runs: ``sample`` round 1 in two shards (2 + 1 rows) and ``eval``
round 0 (one row). Each fault damages it the way a person or a crash would; then SQL must never
serve the damaged run as if it were whole, must keep serving the undamaged one, must say in one
line what it left out, and `mpd status` (``--verify`` for damage that kept a file's size) must
name the damaged run. The kill -9 / resume cases of the round DAG are in
``tests/test_campaign.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from data.catalog import run_query
from data.schemas import EVALS, SAMPLES
from data.store import StageStore
from flows.status import collect


def _row(round_: int, pid: str, **extra: object) -> dict:
    return {
        "round": round_, "problem_id": pid, "sample_idx": 0,
        "completion": "<think>\n1 + 1 = 2\n</think>\n\nAnswer: 2", "token_ids": [5, 7],
        "prompt_tokens": 4, "think_tokens": 3, "answer_tokens": 2, "total_tokens": 5,
        "finish_reason": "stop", "truncated": False, "correct": True, "pred_answer": "2",
        "model": "student", **extra,
    }  # fmt: skip


def _workspace(root: Path) -> Path:
    store = StageStore(root)
    w = store.writer("sample", 1, "s" * 64, code_version="test")
    w.write_shard(0, pa.Table.from_pylist([_row(1, "a"), _row(1, "b")]), SAMPLES)
    w.write_shard(1, pa.Table.from_pylist([_row(1, "c")]), SAMPLES)
    w.commit(expected_shards=2)
    w = store.writer("eval", 0, "e" * 64, code_version="test")
    w.write_shard(0, pa.Table.from_pylist([_row(0, "p", split="test", family="arith")]), EVALS)
    w.commit(expected_shards=1)
    return root


def _shard(ws: Path, i: int) -> Path:
    return ws / "sample" / "round=1" / f"part-{i:05d}.parquet"


def _truncate(ws: Path) -> None:
    path = _shard(ws, 1)
    path.write_bytes(path.read_bytes()[:50])


def _overwrite_same_size(ws: Path) -> None:
    path = _shard(ws, 1)
    path.write_bytes(b"x" * path.stat().st_size)


def _stray_file(ws: Path) -> None:
    shutil.copy(_shard(ws, 0), ws / "sample" / "round=1" / "part-00009.parquet")


def _garble_manifest(ws: Path) -> None:
    (ws / "sample" / "round=1" / "_manifest.json").write_text("{not json")


def _drop_manifest_entry(ws: Path) -> None:
    man_path = ws / "sample" / "round=1" / "_manifest.json"
    man = json.loads(man_path.read_text())
    man["files"] = man["files"][:1]  # a hand-edited manifest: the shard on disk is not listed
    man_path.write_text(json.dumps(man))


def _delete_catalog(ws: Path) -> None:
    (ws / "catalog.duckdb").unlink(missing_ok=True)


# (case, fault, sample rows SQL serves, a warning names it, `mpd status` state, needs --verify)
CASES: list[tuple[str, Callable[[Path], None], int, bool, str, bool]] = [
    ("no fault", lambda ws: None, 3, False, "done", False),
    ("a shard deleted", lambda ws: _shard(ws, 1).unlink(), 0, True, "corrupt", False),
    ("a shard truncated", _truncate, 0, True, "corrupt", False),
    ("a shard overwritten at its size", _overwrite_same_size, 0, True, "corrupt", True),
    ("a stray Parquet file added", _stray_file, 3, False, "done", False),
    ("the manifest garbled", _garble_manifest, 0, True, "missing", False),
    ("a file dropped from the manifest", _drop_manifest_entry, 2, False, "done", False),
    ("the catalog file deleted", _delete_catalog, 3, False, "done", False),
]


@pytest.mark.parametrize(
    ("fault", "rows", "warned", "state", "deep"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_storage_fault(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: Callable[[Path], None],
    rows: int,
    warned: bool,
    state: str,
    deep: bool,
) -> None:
    ws = _workspace(tmp_path / "ws")
    fault(ws)
    caplog.set_level(logging.WARNING, logger="mpd.catalog")
    got = run_query(ws, "select count(*) as n from samples").to_pylist()
    assert got == [{"n": rows}]
    # the undamaged stage run answers whatever happened to the other one
    assert run_query(ws, "select count(*) as n from evals").to_pylist() == [{"n": 1}]
    warnings = [r.getMessage() for r in caplog.records if r.name == "mpd.catalog"]
    assert bool(warnings) == warned, warnings
    assert all("\n" not in w and "mpd" in w for w in warnings)
    states = {(s.round, s.stage): s.state for s in collect(ws, 1, ["sample"], deep=deep)}
    assert states[(1, "sample")] == state
    if deep:  # the cheap check cannot see it; --verify must
        shallow = {(s.round, s.stage): s.state for s in collect(ws, 1, ["sample"])}
        assert shallow[(1, "sample")] == "done"
