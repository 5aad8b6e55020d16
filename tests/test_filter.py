"""The filter SQL against a naive Python reference; user SQL that breaks fails clearly."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from data.schemas import DECISIONS, REWRITES, SAMPLES, conform
from tasks.filter import DEFAULT_SQL, FilterError, check_decisions, run_filter

EQUATIONS = ["2 + 3 = 5", "5 * 4 = 20", "20 - 7 = 13", "13 mod 5 = 3"]


def equation_text(rng: random.Random, lines: list[str]) -> str:
    return "<think>\n" + "\n".join(rng.sample(lines, rng.randint(0, len(lines)))) + "\n</think>"


def rewrite_rows(n: int, seed: int) -> list[dict]:
    """Rewrites whose reasoning holds a few equation lines, some the student never wrote."""
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
                "completion": equation_text(rng, [*EQUATIONS, "20 - 7 = 12"])
                + "\n\nAnswer: 7 = 7",  # an '=' after </think> is not reasoning
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


def sample_rows(rewrites: list[dict], seed: int) -> list[dict]:
    """The student samples the rewrites came from (one is missing: no check for it)."""
    rng = random.Random(seed + 100)
    return [
        {
            **{k: v for k, v in r.items() if not k.startswith("orig_")},
            "completion": "<think>\nSo:\n" + equation_text(rng, EQUATIONS) + " padding",
        }
        for r in rewrites[1:]
    ]


def faithful_naive(rewrite: str, sample: str | None) -> bool:
    if sample is None:
        return True
    think = rewrite.split("</think>")[0]
    return all(line.strip() in sample for line in think.splitlines() if "=" in line)


def naive(
    rows: list[dict], ratio: float, samples: list[dict] | None = None, faithful: bool = False
) -> dict[tuple[str, int], tuple[bool, str]]:
    originals = {(s["problem_id"], s["sample_idx"]): s["completion"] for s in samples or []}
    reason = {}
    for r in rows:
        key = (r["problem_id"], r["sample_idx"])
        if r["truncated"]:
            why = "truncated"
        elif r["pred_answer"] is None:
            why = "no_answer"
        elif not r["correct"]:
            why = "wrong"
        elif faithful and not faithful_naive(r["completion"], originals.get(key)):
            why = "unfaithful"
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


@pytest.mark.parametrize(
    ("seed", "ratio", "faithful"),
    [
        (0, 0.9, False),
        (1, 0.5, False),
        (2, 1.0, False),
        (3, 0.1, False),
        (4, 1.0, True),
        (5, 0.7, True),
    ],
)
def test_default_filter_equals_naive_reference(
    tmp_path: Path, seed: int, ratio: float, faithful: bool
) -> None:
    rows = rewrite_rows(60, seed)
    samples = sample_rows(rows, seed)
    table = conform(pa.Table.from_pylist(rows), REWRITES)
    got = run_filter(
        table,
        DEFAULT_SQL.read_text(),
        ratio=ratio,
        round_=2,
        samples=conform(pa.Table.from_pylist(samples), SAMPLES),
        faithful=faithful,
    ).to_pylist()
    assert len(got) == len(rows), "every candidate stays as a row"
    reasons = {(d["problem_id"], d["sample_idx"]): (d["kept"], d["reason"]) for d in got}
    assert reasons == naive(rows, ratio, samples, faithful)
    if faithful:
        assert any(why == "unfaithful" for _, why in reasons.values()), "the rule was exercised"
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
        run_filter(table, sql, ratio=0.9, round_=1)
    assert message in str(err.value) and "\n" not in str(err.value)


def _naive_check(decisions: list[dict], candidates: list[tuple[str, int]], round_: int) -> str:
    """The rule of data/sql/decisions_check.sql, in plain Python: which fault comes first, and
    at which key (sorted)."""
    if other := sorted(d["round"] for d in decisions if d["round"] != round_):
        return f"rows of round {other[0]}"
    counts: dict[tuple[str, int], int] = {}
    for d in decisions:
        key = (d["problem_id"], d["sample_idx"])
        counts[key] = counts.get(key, 0) + 1
    if repeated := sorted(k for k, n in counts.items() if n > 1):
        return f"returned {counts[repeated[0]]} rows for candidate {_key(repeated[0])}"
    if unknown := sorted(set(counts) - set(candidates)):
        return f"a row for {_key(unknown[0])}, which is not a rewrite"
    if missing := sorted(set(candidates) - set(counts)):
        return f"no row for candidate {_key(missing[0])}"
    return "ok"


def _key(key: tuple[str, int]) -> str:
    return f"(problem_id={key[0]!r}, sample_idx={key[1]})"


@pytest.mark.parametrize("seed", range(40))
def test_decisions_check_equals_a_naive_reference(seed: int) -> None:
    """Random filter outputs (a few rows repeated, made up, left out, of another round) against
    the naive rule: the same verdict and the same first key."""
    rng = random.Random(seed)
    candidates = sorted({(f"p{rng.randint(0, 9)}", rng.randint(0, 3)) for _ in range(15)})
    rows = [{"problem_id": p, "sample_idx": s, "round": 2} for p, s in candidates]
    faults = [] if seed % 5 == 0 else rng.sample(["repeat", "unknown", "missing", "round"], 2)
    for fault in faults:
        if fault == "repeat":
            rows += [dict(rng.choice(rows)) for _ in range(rng.randint(1, 3))]
        elif fault == "unknown":
            rows.append({"problem_id": f"q{rng.randint(0, 3)}", "sample_idx": 0, "round": 2})
        elif fault == "missing" and len(rows) > 1:
            rows.pop(rng.randrange(len(rows)))
        elif fault == "round":
            rows[rng.randrange(len(rows))]["round"] = rng.choice([1, 3])
    rng.shuffle(rows)
    full = [
        {**r, "kept": False, "reason": "wrong", "think_tokens": 1, "orig_think_tokens": 2}
        for r in rows
    ]
    decisions = pa.Table.from_pylist([{**r, "ratio": 0.5} for r in full], schema=DECISIONS)
    keys = pa.Table.from_pylist(
        [{"problem_id": p, "sample_idx": s} for p, s in candidates],
        schema=pa.schema([("problem_id", pa.string()), ("sample_idx", pa.int32())]),
    )
    expected = _naive_check(rows, candidates, 2)
    if expected == "ok":
        check_decisions(decisions, keys, 2)
        return
    with pytest.raises(FilterError) as err:
        check_decisions(decisions, keys, 2)
    assert expected in str(err.value), (expected, str(err.value))
