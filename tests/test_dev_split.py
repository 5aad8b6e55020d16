"""The dev split: problems to choose a recipe on, disjoint from train and test.

Built-in world: ``problems.n_dev`` more problems of the training families from the same
generators, drawn after every other split (so no other split moves) and new to all of them.
Any source: ``problems.dev_fraction`` moves a seeded-hash share of the train split to dev.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.problems import ProblemsConfig, carve_dev, problem_records
from world import build_problems


def test_builtin_dev_is_new_and_moves_no_other_split() -> None:
    without = build_problems(0, 60, 20, 8, (1, 2))
    with_dev = build_problems(0, 60, 20, 8, (1, 2), n_dev=30)
    assert with_dev[: len(without)] == without  # train, test and held-out unchanged
    dev = [r for r in with_dev if r["split"] == "dev"]
    assert len(dev) == 30 and len(with_dev) == len(without) + 30
    others = {r["prompt"] for r in without}
    assert not {r["prompt"] for r in dev} & others, "a dev question is in another split"
    train_families = {r["family"] for r in without if r["split"] == "train"}
    assert {r["family"] for r in dev} == train_families  # the same generators, all of them
    assert len({r["problem_id"] for r in with_dev}) == len(with_dev)


def test_dev_fraction_carves_train_only_by_a_seeded_hash() -> None:
    records = [
        {"problem_id": f"p{i}", "split": "test" if i % 5 == 0 else "train"} for i in range(400)
    ]
    carved = carve_dev(records, 0.25, seed=3)
    dev = {r["problem_id"] for r in carved if r["split"] == "dev"}
    train_before = {r["problem_id"] for r in records if r["split"] == "train"}
    assert dev <= train_before and 0.15 < len(dev) / len(train_before) < 0.35
    assert [r for r in carved if r["split"] == "test"] == [
        r for r in records if r["split"] == "test"
    ]
    again = carve_dev(list(reversed(records[:200])), 0.25, seed=3)  # fewer, reordered
    assert {r["problem_id"] for r in again if r["split"] == "dev"} == {
        p for p in dev if int(p[1:]) < 200
    }
    assert carve_dev(records, 0.0, seed=3) == records


def test_a_user_file_gets_a_dev_split(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "answer": "{i}"}}\n' for i in range(200)))
    cfg = ProblemsConfig.model_validate(
        {"source": "file", "file": {"path": str(path)}, "dev_fraction": 0.2}
    )
    splits = [r["split"] for r in problem_records(cfg, seed=0)]
    assert {"train", "test", "dev"} == set(splits) and splits.count("dev") > 10
    with pytest.raises(ValueError, match="less than 1"):
        ProblemsConfig.model_validate({"dev_fraction": 1.0})
