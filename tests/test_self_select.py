"""self_train's selection (``data/sql/self_train.sql``) against a naive Python reference.

The rule keeps, per problem, the student's own correct untruncated sample with the fewest
think tokens (ties: fewer total tokens, then the lower sample_idx). Random rounds of samples,
many ties and all-wrong problems included, are checked row for row against a loop that says
the same in plain Python; then the stage body on committed Parquet files.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from data.schemas import SAMPLES, conform
from data.store import StageStore
from flows.config import load_config
from flows.configfile import ConfigError
from tasks.common import read_stage
from tasks.self_select import select_body, select_shortest


def sample_rows(rng: random.Random, problems: int, n: int) -> list[dict]:
    rows = []
    for p in range(problems):
        for i in range(n):
            think = rng.randint(1, 6)  # a narrow range: ties on think tokens are common
            answer = rng.randint(1, 3)
            rows.append(
                {
                    "round": 1,
                    "problem_id": f"fam-train-{p:06d}",
                    "sample_idx": i,
                    "completion": f"trace {p}/{i}",
                    "token_ids": list(range(think + answer)),
                    "prompt_tokens": 7,
                    "think_tokens": think,
                    "answer_tokens": answer,
                    "total_tokens": think + answer,
                    "finish_reason": "stop",
                    "truncated": rng.random() < 0.2,
                    "correct": rng.random() < 0.5,
                    "pred_answer": "1",
                    "model": "student",
                }
            )
    rng.shuffle(rows)  # the rule must not depend on the files' order
    return rows


def naive_shortest_correct(rows: list[dict]) -> list[dict]:
    """The reference: for each problem in id order, scan its samples and keep the best."""
    best: dict[str, dict] = {}
    for row in rows:
        if not row["correct"] or row["truncated"]:
            continue
        old = best.get(row["problem_id"])
        rank = (row["think_tokens"], row["total_tokens"], row["sample_idx"])
        if old is None or rank < (old["think_tokens"], old["total_tokens"], old["sample_idx"]):
            best[row["problem_id"]] = row
    return [best[p] for p in sorted(best)]


@pytest.mark.parametrize("seed", range(20))
def test_the_rule_keeps_the_shortest_correct_of_n(seed: int) -> None:
    rng = random.Random(seed)
    rows = sample_rows(rng, problems=rng.randint(1, 12), n=rng.choice([4, 5, 8]))
    got = select_shortest(conform(pa.Table.from_pylist(rows), SAMPLES)).to_pylist()
    assert got == naive_shortest_correct(rows)


def test_no_sample_is_kept_when_none_is_correct() -> None:
    rows = [{**r, "correct": False} for r in sample_rows(random.Random(1), 3, 4)]
    assert select_shortest(conform(pa.Table.from_pylist(rows), SAMPLES)).num_rows == 0
    assert select_shortest([]).num_rows == 0


def test_the_stage_body_selects_over_committed_files(tmp_path: Path) -> None:
    """The body reads the round's sample shards in DuckDB and commits one row per problem."""
    rows = sample_rows(random.Random(7), problems=9, n=4)
    store = StageStore(tmp_path)
    writer = store.writer("sample", 1, "k" * 64)
    for i, part in enumerate((rows[:13], rows[13:])):
        writer.write_shard(i, pa.Table.from_pylist(part), SAMPLES)
    writer.commit({}, expected_shards=2)
    files = sorted(store.stage_dir("sample", 1).glob("*.parquet"))
    select = store.writer("self_select", 1, "s" * 64)
    extra = select_body(select, samples=files, round_=1)
    select.commit(extra)
    got = read_stage(store, "self_select", 1).to_pylist()
    assert got == naive_shortest_correct(rows) and extra["selected"] == len(got) > 0


def test_self_train_refuses_fewer_than_four_samples_per_problem() -> None:
    """n >= 4 is part of the method: a shortest-of-one is no selection, and says so in one line."""
    assert load_config(None, ["method=self_train", "sample.n=4"]).sample.n == 4
    with pytest.raises(ConfigError, match=r"self_train .* needs sample.n >= 4, got 2") as err:
        load_config(None, ["method=self_train", "sample.n=2"])
    assert "\n" not in str(err.value)
