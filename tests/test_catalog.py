"""The DuckDB catalog on real Parquet in a temp workspace: views, visibility, moves, output."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.catalog import (
    CATALOG_FILE,
    ReadOnlyError,
    SqlError,
    committed_files,
    connect,
    run_query,
    views,
    write_catalog,
)
from data.schemas import conform
from data.tables import tables
from data.view_sources import duckdb_type, round_summary_sql
from flows.sqlout import format_table, write_parquet_atomic
from tests.conftest import write_manifest

TABLES = {name: t.schema for name, t in tables().items()}
STAGE_OF = {name: t.stage for name, t in tables().items()}


# -- building a workspace ----------------------------------------------------


def trace(round_: int, pid: str, idx: int = 0, **over: Any) -> dict[str, Any]:
    """A samples/evals/rewrites row with plausible defaults; ``over`` overrides."""
    row: dict[str, Any] = {
        "round": round_,
        "problem_id": pid,
        "sample_idx": idx,
        "completion": "<think>\n1 + 1 = 2\n</think>\n\nAnswer: 2",
        "token_ids": [5, 7, 9],
        "prompt_tokens": 10,
        "think_tokens": 20,
        "answer_tokens": 3,
        "total_tokens": 23,
        "finish_reason": "stop",
        "truncated": False,
        "correct": True,
        "pred_answer": "2",
        "model": "student",
    }
    row.update(over)
    return row


def eval_row(round_: int, pid: str, split: str, **over: Any) -> dict[str, Any]:
    return {**trace(round_, pid, **over), "split": split, "family": "arith"}


def decision(round_: int, pid: str, reason: str, think: int = 10) -> dict[str, Any]:
    return {
        "round": round_,
        "problem_id": pid,
        "sample_idx": 0,
        "kept": reason == "kept",
        "reason": reason,
        "think_tokens": think,
        "orig_think_tokens": 20,
        "ratio": think / 20,
    }


def write_rows(path: Path, table: str, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as a Parquet file conforming to ``table``'s schema."""
    schema = TABLES[table]
    columns = {f.name: [r[f.name] for r in rows] for f in schema}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(pa.table(columns), schema, name=table), path)


def commit(ws: Path, table: str, round_: int, rows: list[dict[str, Any]], name: str = "") -> Path:
    """Write a committed round: the file, then the manifest (the commit marker) listing every
    committed file of the round so far, as the store writes it."""
    default = {"decisions": "decisions.parquet", "train_log": "log.parquet"}
    round_dir = ws / STAGE_OF[table] / f"round={round_}"
    path = round_dir / (name or default.get(table, "part-00000.parquet"))
    write_rows(path, table, rows)
    write_manifest(round_dir, STAGE_OF[table], round_)
    return path


def count(con: duckdb.DuckDBPyConnection, view: str) -> int:
    return int(con.sql(f"SELECT count(*) FROM {view}").fetchall()[0][0])


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


# -- views -------------------------------------------------------------------


def test_empty_workspace_has_every_view_typed_and_empty(ws: Path) -> None:
    con = connect(ws)
    names = {
        r[0] for r in con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    assert names == set(views())
    for table, schema in TABLES.items():
        described = con.sql(f"DESCRIBE {table}").fetchall()
        assert [(r[0], r[1]) for r in described] == [(f.name, duckdb_type(f.type)) for f in schema]
        assert count(con, table) == 0
    assert count(con, "kept") == 0
    assert count(con, "round_summary") == 0
    scores = {r[0]: r[1] for r in con.sql("DESCRIBE scores").fetchall()}
    assert scores["topk_ids"] == "INTEGER[]" and scores["topk_logprob_gaps"] == "SMALLINT[]"


def test_committed_views_have_the_schema_types(ws: Path) -> None:
    """A view over real files has the same column types as the typed empty one."""
    commit(ws, "evals", 0, [eval_row(0, "p1", "test")])
    commit(ws, "decisions", 1, [decision(1, "p1", "kept")])
    con = connect(ws)
    for table in ("evals", "decisions"):
        described = [(r[0], r[1]) for r in con.sql(f"DESCRIBE {table}").fetchall()]
        assert described == [(f.name, duckdb_type(f.type)) for f in TABLES[table]]


def test_only_committed_files_are_visible(ws: Path) -> None:
    commit(ws, "samples", 1, [trace(1, "a"), trace(1, "b")])
    commit(ws, "samples", 2, [trace(2, "c")], name="part-00001.parquet")
    # Work in progress, replaced versions and an unfinished commit (no manifest).
    write_rows(ws / ".staging/sample/round=3/abcd/part-00000.parquet", "samples", [trace(3, "x")])
    write_rows(ws / ".trash/sample-round=1-0001/part-00000.parquet", "samples", [trace(1, "y")])
    write_rows(ws / "sample/round=4/part-00000.parquet", "samples", [trace(4, "z")])
    # Files a view must not even open: if read, they would fail as Parquet.
    (ws / "sample/round=1/.part-00009.parquet.tmp.parquet").write_bytes(b"not parquet")
    (ws / "sample/round=1/_partial.parquet").write_bytes(b"not parquet")
    commit(ws, "train_log", 1, [_log_row(1, 0)])
    (ws / "train/round=1/model").mkdir()
    (ws / "train/round=1/model/model.safetensors").write_bytes(b"\0" * 64)
    (ws / "train/round=1/model/extra.parquet").write_bytes(b"not parquet")

    con = connect(ws)
    assert sorted(con.sql("SELECT problem_id FROM samples").fetchall()) == [("a",), ("b",), ("c",)]
    assert con.sql("SELECT DISTINCT round FROM samples ORDER BY 1").fetchall() == [(1,), (2,)]
    assert count(con, "train_log") == 1
    files = committed_files(ws, "samples")
    assert [f.relative_to(ws).as_posix() for f in files] == [
        "sample/round=1/part-00000.parquet",
        "sample/round=2/part-00001.parquet",
    ]
    assert all(f.is_absolute() for f in files)


def test_round_column_comes_from_the_file_not_the_path(ws: Path) -> None:
    """hive_partitioning is off: a file's own ``round`` wins over its directory name."""
    commit(ws, "evals", 5, [eval_row(0, "p", "test")])
    assert connect(ws).sql("SELECT round FROM evals").fetchall() == [(0,)]


def test_kept_view_is_decisions_where_kept(ws: Path) -> None:
    rows = [decision(1, "a", "kept"), decision(1, "b", "wrong"), decision(1, "c", "kept")]
    commit(ws, "decisions", 1, rows)
    con = connect(ws)
    assert sorted(r[0] for r in con.sql("SELECT problem_id FROM kept").fetchall()) == ["a", "c"]


def _log_row(round_: int, step: int) -> dict[str, Any]:
    return {
        "round": round_,
        "step": step,
        "loss": 1.5,
        "tokens": 100,
        "grad_norm": 0.3,
        "lr": 1e-3,
        "skipped": False,
        "elapsed_s": 0.1,
    }


# -- round_summary -----------------------------------------------------------


def _summary_dataset(ws: Path) -> tuple[list[dict], list[dict], list[dict]]:
    evals = [
        eval_row(0, "t1", "test", think_tokens=30, answer_tokens=4, total_tokens=34),
        eval_row(0, "t2", "test", think_tokens=50, answer_tokens=2, total_tokens=52, correct=False),
        eval_row(0, "t3", "test", think_tokens=64, total_tokens=67, truncated=True, correct=False),
        eval_row(0, "h1", "heldout", think_tokens=40, correct=True),
        eval_row(0, "h2", "heldout", think_tokens=41, correct=False),
        eval_row(1, "t1", "test", think_tokens=12, answer_tokens=3, total_tokens=15),
        eval_row(1, "t2", "test", think_tokens=18, answer_tokens=5, total_tokens=23),
        eval_row(1, "h1", "heldout", think_tokens=1000, correct=True, truncated=True),
    ]
    samples = [
        trace(1, "s1", 0, think_tokens=40, correct=True),
        trace(1, "s1", 1, think_tokens=60, correct=False),
        trace(1, "s2", 0, think_tokens=80, correct=True),
    ]
    decisions = [
        decision(1, "s1", "kept"),
        decision(1, "s2", "kept"),
        decision(1, "s3", "wrong"),
        decision(1, "s4", "wrong"),
        decision(1, "s5", "not_shorter"),
        decision(1, "s6", "truncated"),
        decision(1, "s7", "duplicate"),
        decision(1, "s8", "no_answer"),
        decision(1, "s9", "too_long_custom"),  # a reason outside the standard five
    ]
    commit(ws, "evals", 0, [e for e in evals if e["round"] == 0])
    commit(ws, "evals", 1, [e for e in evals if e["round"] == 1])
    commit(ws, "samples", 1, samples)
    commit(ws, "decisions", 1, decisions)
    return evals, samples, decisions


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _paired(evals: list[dict], rnd: int, split: str) -> tuple[float | None, float | None]:
    """Mean and standard error of correct(rnd) - correct(0) over problems in both rounds."""
    base = {e["problem_id"]: e["correct"] for e in evals if e["round"] == 0 and e["split"] == split}
    d = [
        float(e["correct"]) - float(base[e["problem_id"]])
        for e in evals
        if e["round"] == rnd and e["split"] == split and e["problem_id"] in base
    ]
    if not d:
        return None, None
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, (var / len(d)) ** 0.5


def _expected_summary(evals: list[dict], samples: list[dict], decisions: list[dict]) -> list[dict]:
    """round_summary recomputed the naive way, one loop per column."""
    rounds = sorted({r["round"] for r in [*evals, *samples, *decisions]})
    out = []
    for rnd in rounds:
        test = [e for e in evals if e["round"] == rnd and e["split"] == "test"]
        held = [e for e in evals if e["round"] == rnd and e["split"] == "heldout"]
        samp = [s for s in samples if s["round"] == rnd]
        dec = [d for d in decisions if d["round"] == rnd]
        dropped = [d["reason"] for d in dec if not d["kept"]]
        row = {
            "round": rnd,
            "eval_n": len(test),
            "accuracy": _mean([float(e["correct"]) for e in test]),
            "heldout_n": len(held),
            "heldout_accuracy": _mean([float(e["correct"]) for e in held]),
            "mean_think_tokens": _mean([e["think_tokens"] for e in test]),
            "mean_answer_tokens": _mean([e["answer_tokens"] for e in test]),
            "mean_total_tokens": _mean([e["total_tokens"] for e in test]),
            "truncation_rate": _mean([float(e["truncated"]) for e in test]),
            "samples_n": len(samp),
            "sample_accuracy": _mean([float(s["correct"]) for s in samp]),
            "sample_mean_think_tokens": _mean([s["think_tokens"] for s in samp]),
            "accuracy_change": _paired(evals, rnd, "test")[0],
            "accuracy_change_se": _paired(evals, rnd, "test")[1],
            "heldout_accuracy_change": _paired(evals, rnd, "heldout")[0],
            "heldout_accuracy_change_se": _paired(evals, rnd, "heldout")[1],
            "think_change": None
            if not test
            else _mean([e["think_tokens"] for e in test])
            / _mean([e["think_tokens"] for e in evals if e["round"] == 0 and e["split"] == "test"])
            - 1,
            "kept": sum(d["kept"] for d in dec),
            "dropped": len(dropped),
            "dropped_by_reason": {r: dropped.count(r) for r in sorted(set(dropped))},
        }
        for reason in ("wrong", "truncated", "not_shorter", "duplicate", "no_answer"):
            row[f"dropped_{reason}"] = dropped.count(reason)
        out.append(row)
    return out


def test_round_summary_equals_a_naive_recomputation(ws: Path) -> None:
    evals, samples, decisions = _summary_dataset(ws)
    got = run_query(ws, "SELECT * FROM round_summary").to_pylist()
    expected = _expected_summary(evals, samples, decisions)
    assert [r["round"] for r in got] == [0, 1]
    for got_row, want in zip(got, expected, strict=True):
        got_row["dropped_by_reason"] = dict(got_row["dropped_by_reason"])
        assert set(want) <= set(got_row)
        for column, value in want.items():
            assert got_row[column] == pytest.approx(value), (want["round"], column)
    # Spot checks that the recomputation itself is what we mean.
    assert expected[0]["accuracy"] == pytest.approx(1 / 3)
    # round 1 against round 0 on t1, t2: d = (0, +1): mean 0.5, sd 0.707, se 0.5
    assert expected[1]["accuracy_change"] == 0.5
    assert expected[1]["accuracy_change_se"] == pytest.approx(0.5)
    assert expected[1]["think_change"] == pytest.approx(15 / 48 - 1)
    assert expected[1]["dropped_by_reason"]["too_long_custom"] == 1
    assert expected[1]["dropped"] == 7 and expected[1]["kept"] == 2


def test_round_summary_map_is_queryable(ws: Path) -> None:
    _summary_dataset(ws)
    row = run_query(
        ws, "SELECT dropped_by_reason['wrong'] AS w FROM round_summary WHERE round = 1"
    ).to_pylist()
    assert row == [{"w": 2}]


def _family_dataset(ws: Path) -> list[dict]:
    """Three rounds of evals over three training families (test) and one held-out family,
    families of unequal size, correctness and lengths drawn at random (seeded)."""
    import random

    rng = random.Random(3)
    sizes = {("test", "arith"): 5, ("test", "lists"): 3, ("test", "modular"): 7}
    sizes[("heldout", "transfer")] = 4
    evals = []
    for rnd in range(3):
        for (split, family), n in sizes.items():
            for i in range(n):
                think = rng.randint(5, 90)
                row = eval_row(
                    rnd, f"{family}-{split}-{i}", split, correct=rng.random() < 0.6,
                    think_tokens=think, total_tokens=think + 3,
                )  # fmt: skip
                evals.append({**row, "family": family})
        commit(ws, "evals", rnd, [e for e in evals if e["round"] == rnd])
    return evals


def test_family_summary_is_a_naive_per_family_recomputation(ws: Path) -> None:
    evals = _family_dataset(ws)
    got = run_query(ws, "SELECT * FROM family_summary").to_pylist()
    keys = sorted({(e["round"], e["split"], e["family"]) for e in evals})
    assert [(g["round"], g["split"], g["family"]) for g in got] == keys
    base = {e["problem_id"]: e for e in evals if e["round"] == 0}
    for g, key in zip(got, keys, strict=True):
        rows = [e for e in evals if (e["round"], e["split"], e["family"]) == key]
        d = [float(e["correct"]) - float(base[e["problem_id"]]["correct"]) for e in rows]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        think0 = _mean([base[e["problem_id"]]["think_tokens"] for e in rows])
        assert g["eval_n"] == len(rows)
        assert g["accuracy"] == pytest.approx(_mean([float(e["correct"]) for e in rows]))
        assert g["mean_think_tokens"] == pytest.approx(_mean([e["think_tokens"] for e in rows]))
        assert g["accuracy_change"] == pytest.approx(mean)
        assert g["accuracy_change_se"] == pytest.approx(se)
        assert g["think_change"] == pytest.approx(g["mean_think_tokens"] / think0 - 1)


def test_family_summary_sums_to_round_summary(ws: Path) -> None:
    """Weighted by eval_n, a round's family rows give round_summary's test and held-out numbers:
    per-family results hide nothing the aggregate shows, and add nothing it does not."""
    _family_dataset(ws)
    families = run_query(ws, "SELECT * FROM family_summary").to_pylist()
    summary = {r["round"]: r for r in run_query(ws, "SELECT * FROM round_summary").to_pylist()}
    column = {
        "test": ("eval_n", "accuracy", "accuracy_change"),
        "heldout": ("heldout_n", "heldout_accuracy", "heldout_accuracy_change"),
    }
    checked = 0
    for (rnd, split), (n_col, acc_col, change_col) in (
        ((r, s), cols) for r in summary for s, cols in column.items()
    ):
        rows = [f for f in families if f["round"] == rnd and f["split"] == split]
        n = sum(f["eval_n"] for f in rows)
        assert n == summary[rnd][n_col] > 0
        for mine, theirs in (("accuracy", acc_col), ("accuracy_change", change_col)):
            weighted = sum(f[mine] * f["eval_n"] for f in rows) / n
            assert weighted == pytest.approx(summary[rnd][theirs]), (rnd, split, mine)
        if split == "test":
            think = sum(f["mean_think_tokens"] * f["eval_n"] for f in rows) / n
            assert think == pytest.approx(summary[rnd]["mean_think_tokens"])
        checked += 1
    assert checked == 6 and len({f["family"] for f in families}) == 4


def test_round_summary_sql_is_a_readable_file() -> None:
    sql = round_summary_sql()
    assert sql.lstrip().startswith("--") and "FROM rounds" in sql and not sql.endswith(";")


# -- connections, moves, the persisted catalog --------------------------------


def test_connection_is_hardened(ws: Path) -> None:
    con = connect(ws)
    settings = dict(
        con.sql(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('lock_configuration', "
            "'autoload_known_extensions', 'autoinstall_known_extensions', 'enable_external_access')"
        ).fetchall()
    )
    assert settings == {
        "lock_configuration": "true",
        "autoload_known_extensions": "false",
        "autoinstall_known_extensions": "false",
        "enable_external_access": "false",  # the sandbox: only the committed files
    }
    for statement in ("SET threads = 1", "SET lock_configuration = false", "RESET threads"):
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute(statement)


def test_missing_workspace_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SqlError, match="does not exist"):
        connect(tmp_path / "nope")


def test_moved_workspace_still_works(ws: Path, tmp_path: Path) -> None:
    commit(ws, "evals", 0, [eval_row(0, "p1", "test"), eval_row(0, "p2", "heldout")])
    write_catalog(ws)
    moved = Path(shutil.move(str(ws), str(tmp_path / "elsewhere" / "moved")))
    assert not ws.exists()
    assert count(connect(moved), "evals") == 2
    assert run_query(moved, "SELECT eval_n FROM round_summary").to_pylist() == [{"eval_n": 1}]

    # The persisted catalog: relative paths, resolved through file_search_path ...
    con = duckdb.connect(str(moved / CATALOG_FILE), read_only=True)
    try:
        con.execute(f"SET file_search_path = '{moved}'")
        assert count(con, "evals") == 2
        assert con.sql("SELECT heldout_n FROM round_summary").fetchall() == [(1,)]
    finally:
        con.close()
    # ... or through the working directory, as `cd ws && duckdb catalog.duckdb` does.
    code = (
        "import duckdb; c = duckdb.connect('catalog.duckdb', read_only=True); "
        "print(c.sql('SELECT count(*) FROM evals').fetchall()[0][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=moved, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "2"


def test_write_catalog_has_every_view_and_no_leftovers(ws: Path) -> None:
    commit(ws, "decisions", 1, [decision(1, "a", "kept"), decision(1, "b", "wrong")])
    path = write_catalog(ws)
    assert path == ws.resolve() / CATALOG_FILE
    assert sorted(p.name for p in ws.iterdir()) == [CATALOG_FILE, "filter"]
    con = duckdb.connect(str(path), read_only=True)
    try:
        con.execute(f"SET file_search_path = '{ws}'")
        found = con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
        assert {v[0] for v in found} == set(views())
        assert count(con, "kept") == 1
        sqls = " ".join(r[0] for r in con.sql("SELECT sql FROM duckdb_views()").fetchall())
        assert str(ws) not in sqls, "persisted views must use workspace-relative paths"
    finally:
        con.close()


def test_a_bench_root_stacks_its_members_in_both_connections(tmp_path: Path) -> None:
    """A bench root's tables (stage_runs too) carry each member's method and seed, in the
    sandboxed connection and in the persisted catalog, so ``bench`` answers in both."""
    root = tmp_path / "it's a bench"
    members = [("mpd", 0, "mpd-0"), ("sft_compressed", 1, "sft-1")]
    for method, _seed, path in members:
        commit(
            root / path, "evals", 0, [eval_row(0, "p1", "test"), eval_row(0, f"{method}", "test")]
        )
    (root / "bench.json").write_text(
        json.dumps({"members": [{"method": m, "seed": s, "path": p} for m, s, p in members]})
    )
    query = "SELECT method, seed, count(*) AS n FROM {} GROUP BY ALL ORDER BY ALL"
    want = [("mpd", 0, 1), ("sft_compressed", 1, 1)]
    con = connect(root)
    try:
        assert con.sql(query.format("stage_runs")).fetchall() == want
        assert con.sql(query.format("bench")).fetchall() == want
    finally:
        con.close()
    persisted = duckdb.connect(str(write_catalog(root)), read_only=True)
    try:
        persisted.execute("SET file_search_path = ?", [str(root)])
        assert persisted.sql(query.format("stage_runs")).fetchall() == want
        assert persisted.sql(query.format("bench")).fetchall() == want
        assert persisted.sql("SELECT count(*) FROM evals").fetchall() == [(4,)]
    finally:
        persisted.close()


def test_write_catalog_is_rebuilt_with_new_commits(ws: Path) -> None:
    write_catalog(ws)
    commit(ws, "samples", 1, [trace(1, "a")])
    write_catalog(ws)
    con = duckdb.connect(str(ws / CATALOG_FILE), read_only=True)
    try:
        con.execute(f"SET file_search_path = '{ws}'")
        assert count(con, "samples") == 1
    finally:
        con.close()


# -- run_query ---------------------------------------------------------------


def test_run_query_errors_are_one_line_sql_errors(ws: Path) -> None:
    with pytest.raises(SqlError) as err:
        run_query(ws, "SELECT no_such_column FROM evals")
    assert "\n" not in str(err.value) and "no_such_column" in str(err.value)
    with pytest.raises(SqlError, match="syntax error"):
        run_query(ws, "SELEC 1")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mpd.catalog"]


def test_a_stage_run_missing_a_shard_is_left_out_not_counted_short(
    ws: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's case: one shard of a committed 2-shard stage deleted. The view used to glob
    the files present and count 1 of 2 rows; now the run is left out, with one warning line
    naming it and the repair, and the other tables and rounds keep working."""
    commit(ws, "samples", 1, [trace(1, "a")])
    lost = commit(ws, "samples", 1, [trace(1, "b")], name="part-00001.parquet")
    commit(ws, "samples", 2, [trace(2, "c")])
    commit(ws, "evals", 0, [eval_row(0, "p1", "test")])
    assert run_query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 3}]
    lost.unlink()
    caplog.clear()
    assert run_query(ws, "SELECT round, problem_id FROM samples").to_pylist() == [
        {"round": 2, "problem_id": "c"}
    ]
    assert run_query(ws, "SELECT count(*) AS n FROM evals").to_pylist() == [{"n": 1}]
    (line,) = set(_warnings(caplog))
    assert "sample round 1 is left out of SQL" in line and "part-00001.parquet" in line
    assert "mpd rerun --round 1 --from sample" in line and "\n" not in line


def test_a_truncated_shard_no_longer_breaks_every_query(
    ws: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated shard (its size no longer the manifest's) used to make every query fail."""
    path = commit(ws, "samples", 1, [trace(1, "a")])
    commit(ws, "decisions", 1, [decision(1, "a", "kept")])
    path.write_bytes(path.read_bytes()[:40])
    assert run_query(ws, "SELECT count(*) AS n FROM kept").to_pylist() == [{"n": 1}]
    assert run_query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 0}]
    assert any("wrong size" in w for w in _warnings(caplog))


def test_a_shard_damaged_at_its_size_empties_its_table_only(
    ws: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Damage the size check cannot see (same length, not Parquet): that table is empty, with
    a warning that points at `mpd status`; the other tables answer."""
    path = commit(ws, "samples", 1, [trace(1, "a")])
    commit(ws, "evals", 0, [eval_row(0, "p1", "test")])
    path.write_bytes(b"x" * path.stat().st_size)
    assert run_query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 0}]
    assert run_query(ws, "SELECT count(*) AS n FROM evals").to_pylist() == [{"n": 1}]
    assert any("table samples is empty here" in w and "mpd status" in w for w in _warnings(caplog))


def test_views_read_the_files_the_manifest_lists_not_the_files_present(ws: Path) -> None:
    """A valid Parquet file dropped into a committed round (a copy, a stray tool) is not data."""
    commit(ws, "samples", 1, [trace(1, "a")])
    write_rows(ws / "sample/round=1/part-00007.parquet", "samples", [trace(1, "stray")])
    assert run_query(ws, "SELECT problem_id FROM samples").to_pylist() == [{"problem_id": "a"}]


def test_run_query_runs_exactly_one_statement(ws: Path) -> None:
    assert run_query(ws, "SELECT 2 AS b;").to_pylist() == [{"b": 2}]
    with pytest.raises(ReadOnlyError, match="2 statements"):
        run_query(ws, "SELECT 1 AS a; SELECT 2 AS b")


# -- output ------------------------------------------------------------------


def _sample_result() -> pa.Table:
    return pa.table(
        {
            "round": pa.array([1, 2], pa.int32()),
            "name": ["plain", 'has "quotes", a comma\nand a newline'],
            "acc": [0.5, None],
            "ok": [True, False],
            "ids": pa.array([[1, 2, 3, 4, 5, 6, 7, 8, 9], []], pa.list_(pa.int32())),
            "reasons": pa.array([[("wrong", 2)], []], pa.map_(pa.string(), pa.int64())),
        }
    )


def test_csv_round_trips() -> None:
    table = _sample_result()
    rows = list(csv.DictReader(io.StringIO(format_table(table, "csv"))))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert [r["name"] for r in rows] == table.column("name").to_pylist()
    assert [r["acc"] for r in rows] == ["0.5", ""]  # NULL is an empty cell
    assert [r["ok"] for r in rows] == ["true", "false"]
    assert [json.loads(r["ids"]) for r in rows] == table.column("ids").to_pylist()
    assert [json.loads(r["reasons"]) for r in rows] == [{"wrong": 2}, {}]


def test_json_round_trips() -> None:
    table = _sample_result()
    rows = json.loads(format_table(table, "json"))
    expected = table.to_pylist()
    for row in expected:
        row["reasons"] = dict(row["reasons"])
    assert rows == expected
    assert json.loads(format_table(table.slice(0, 0), "json")) == []


def test_json_writes_nan_as_null() -> None:
    table = pa.table({"x": [float("nan"), 1.0]})
    assert json.loads(format_table(table, "json")) == [{"x": None}, {"x": 1.0}]


def test_text_table_is_aligned_and_shortened() -> None:
    text = format_table(_sample_result(), "table")
    lines = text.splitlines()
    assert lines[0].split() == ["round", "name", "acc", "ok", "ids", "reasons"]
    assert "[1, 2, 3, 4, 5, 6, … +3]" in text
    assert "{wrong: 2}" in text and "NULL" in text and "\\n" in text
    assert lines[-1] == "(2 rows)"
    assert set(lines[1]) == {"-", " "}
    assert all(len(line) <= len(lines[1]) for line in lines[:-1])  # every row within the rule
    many = format_table(pa.table({"i": list(range(250))}), "table", max_rows=10)
    assert "(10 of 250 rows shown" in many


def test_write_parquet_atomic(tmp_path: Path) -> None:
    table = _sample_result()
    out = tmp_path / "sub" / "result.parquet"
    assert write_parquet_atomic(table, out) == table.num_rows
    assert pq.read_table(out).equals(table)
    assert os.listdir(out.parent) == ["result.parquet"]
    with pytest.raises(SqlError, match=r"\.parquet"):
        write_parquet_atomic(table, tmp_path / "result.csv")
    assert not (tmp_path / "result.csv").exists()


def test_write_parquet_atomic_streams_a_reader_and_a_broken_stream_leaves_nothing(
    tmp_path: Path,
) -> None:
    """``mpd sql --out`` hands the writer DuckDB's batches as they come: each is written as it
    arrives, and a stream that fails half-way (an interrupt, a DuckDB error) leaves neither the
    file nor a temporary."""
    table = _sample_result()
    batches = table.to_batches(max_chunksize=1)
    assert len(batches) > 1
    out = tmp_path / "streamed.parquet"
    reader = pa.RecordBatchReader.from_batches(table.schema, batches)
    assert write_parquet_atomic(reader, out) == table.num_rows
    assert pq.read_table(out).equals(table)

    def broken():
        yield batches[0]
        raise ValueError("the query was interrupted")

    with pytest.raises(ValueError, match="interrupted"):
        write_parquet_atomic(
            pa.RecordBatchReader.from_batches(table.schema, broken()), tmp_path / "half.parquet"
        )
    assert os.listdir(tmp_path) == ["streamed.parquet"]
