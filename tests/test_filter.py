"""The filter SQL against a naive Python reference; user SQL that breaks fails clearly."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from data.schemas import REWRITES, conform
from tasks.filter import DEFAULT_SQL, FilterError, run_filter


def rewrite_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        truncated = rng.random() < 0.1
        answered = rng.random() > 0.1
        orig = rng.randint(20, 200)
        rows.append(
            {
                "round": 2,
                "problem_id": f"p{rng.randint(0, n // 3):03d}",
                "sample_idx": i,
                "completion": "x",
                "token_ids": [1],
                "prompt_tokens": 5,
                "think_tokens": rng.randint(5, 220),
                "answer_tokens": 3,
                "total_tokens": 9,
                "finish_reason": "length" if truncated else "stop",
                "truncated": truncated,
                "correct": answered and rng.random() < 0.7,
                "pred_answer": "7" if answered else None,
                "model": "t",
                "orig_think_tokens": orig,
                "orig_total_tokens": orig + 3,
                "orig_correct": True,
                "orig_truncated": False,
            }
        )
    return rows


def naive(rows: list[dict], ratio: float) -> dict[tuple[str, int], tuple[bool, str]]:
    reason = {}
    for r in rows:
        if r["truncated"]:
            why = "truncated"
        elif r["pred_answer"] is None:
            why = "no_answer"
        elif not r["correct"]:
            why = "wrong"
        elif r["think_tokens"] > ratio * r["orig_think_tokens"]:
            why = "not_shorter"
        else:
            why = None
        reason[(r["problem_id"], r["sample_idx"])] = why
    out = {}
    for pid in {r["problem_id"] for r in rows}:
        ok = sorted(
            (r["think_tokens"], r["sample_idx"])
            for r in rows
            if r["problem_id"] == pid and reason[(pid, r["sample_idx"])] is None
        )
        for rank, (_, s) in enumerate(ok):
            out[(pid, s)] = (rank == 0, "kept" if rank == 0 else "duplicate")
    for key, why in reason.items():
        if why is not None:
            out[key] = (False, why)
    return out


@pytest.mark.parametrize(("seed", "ratio"), [(0, 0.9), (1, 0.5), (2, 1.0), (3, 0.1)])
def test_default_filter_equals_naive_reference(tmp_path: Path, seed: int, ratio: float) -> None:
    rows = rewrite_rows(60, seed)
    table = conform(pa.Table.from_pylist(rows), REWRITES)
    got = run_filter(
        table, DEFAULT_SQL.read_text(), ratio=ratio, round_=2, out=tmp_path / "d.parquet"
    ).to_pylist()
    assert len(got) == len(rows), "every candidate stays as a row"
    assert {(d["problem_id"], d["sample_idx"]): (d["kept"], d["reason"]) for d in got} == naive(
        rows, ratio
    )
    by_key = {(r["problem_id"], r["sample_idx"]): r for r in rows}
    for d in got:
        r = by_key[(d["problem_id"], d["sample_idx"])]
        assert d["ratio"] == pytest.approx(r["think_tokens"] / r["orig_think_tokens"])
        assert d["round"] == 2


def test_filter_that_keeps_nothing_still_returns_every_reason(tmp_path: Path) -> None:
    rows = rewrite_rows(20, 5)
    for r in rows:
        r["correct"] = False
    got = run_filter(
        conform(pa.Table.from_pylist(rows), REWRITES),
        DEFAULT_SQL.read_text(),
        ratio=0.9,
        round_=2,
        out=tmp_path / "d.parquet",
    )
    assert not any(got.column("kept").to_pylist())
    assert set(got.column("reason").to_pylist()) <= {"wrong", "truncated", "no_answer"}


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("select problem_id from rewrites", "missing column(s)"),
        ("select * from rewritez", "filter SQL failed"),
        (
            "select round, problem_id, sample_idx, 'yes' as kept, 'x' as reason, think_tokens, "
            "orig_think_tokens, 1.0 as ratio from rewrites",
            "column 'kept'",
        ),
    ],
)
def test_broken_user_sql_fails_clearly(tmp_path: Path, sql: str, message: str) -> None:
    table = conform(pa.Table.from_pylist(rewrite_rows(5, 0)), REWRITES)
    with pytest.raises(FilterError) as err:
        run_filter(table, sql, ratio=0.9, round_=1, out=tmp_path / "d.parquet")
    assert message in str(err.value) and "\n" not in str(err.value)
