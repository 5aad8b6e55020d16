"""reasoning-gym families as a problem source, graded by their own scorers (data/gym.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from data.errors import UserError
from data.gym import GymConfig, gym_grader, gym_records


def test_records_are_seeded_split_and_carry_the_gold_answer() -> None:
    cfg = GymConfig(dataset="chain_sum", size=50)
    recs = gym_records(cfg, 3)
    assert recs == gym_records(cfg, 3) and recs != gym_records(cfg, 4)
    assert len({r["problem_id"] for r in recs}) == 50
    assert set(Counter(r["split"] for r in recs)) == {"train", "test"}
    assert all(r["family"] == "chain_sum" and r["answer"] for r in recs)


def test_the_family_scorer_decides_and_partial_credit_is_wrong() -> None:
    cfg = GymConfig(dataset="gsm_symbolic", size=5)
    grade = gym_grader(cfg, 0)
    gold = gym_records(cfg, 0)[0]["answer"]
    assert grade(gold, gold)
    assert not grade(str(int(gold) + 1), gold)  # gsm_symbolic scores a wrong number 0.01
    assert not grade(None, gold)
    chain = GymConfig(dataset="chain_sum", size=5)
    gold = gym_records(chain, 0)[0]["answer"]
    assert gym_grader(chain, 0)(f"{gold}.0", gold)  # its scorer tolerates trailing decimals
    arith = GymConfig(dataset="basic_arithmetic", size=5)
    gold = gym_records(arith, 0)[0]["answer"]
    assert not gym_grader(arith, 0)(f"{gold}.0", gold)  # its scorer is exact


def test_an_unknown_family_is_one_line() -> None:
    with pytest.raises(UserError, match=r"reasoning_gym\.dataset 'no_such_family'"):
        gym_records(GymConfig(dataset="no_such_family", size=3), 0)
    with pytest.raises(UserError, match="did you mean chain_sum"):
        gym_records(GymConfig(dataset="chain_sums", size=3), 0)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"bogus": 1}, "TypeError: ChainSumConfig.__init__() got an unexpected keyword argument"),
        ({"min_terms": -3}, "AssertionError: min_terms must be positive"),
    ],
)
def test_options_the_family_refuses_are_the_users(options: dict, said: str) -> None:
    """An option the family does not take, or a value its own check refuses: the user's, in one
    line naming the option (the family's constructor is not inside this: its failure on options
    it accepted would be a bug, with its traceback)."""
    with pytest.raises(
        UserError, match=r"reasoning_gym\.dataset 'chain_sum': options refused"
    ) as exc:
        gym_records(GymConfig(dataset="chain_sum", size=3, options=options), 0)
    assert said in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.usefixtures("prefect_api")
def test_a_campaign_evaluates_a_gym_family(tmp_path: Path) -> None:
    """Round 0 of ``mpd run`` on chain_sum problems: problems and evals tables, graded."""
    from data.catalog import run_query
    from flows.cli import main

    ws = tmp_path / "ws"
    sets = {
        "problems.source": "reasoning_gym",
        "problems.reasoning_gym": "{dataset: chain_sum, size: 40}",
        "evaluate.limit": 4,
        "evaluate.max_tokens": 32,
        "evaluate.splits": "[test]",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(["run", "-w", str(ws), "--rounds", "0", *args]) == 0
    (row,) = run_query(
        ws,
        "select (select count(*) from problems where family = 'chain_sum') p, count(*) n, "
        "from evals",
    ).to_pylist()
    assert row["p"] == 40 and row["n"] == 4
