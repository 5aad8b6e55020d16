"""configs/smollm2-gsm8k.yaml in a reduced form: one MPD round of SmolLM2-135M-Instruct on
GSM8K, every stage on the real model, its tokenizer and chat template and its full vocabulary.

Reduced: 4 problems x 2 samples of 48 tokens, 2 training steps, 4 test problems. The filter
is the test fixture that keeps each problem's first rewrite (48-token rewrites of a 135M model
are rarely correct and shorter, and the built-in rule would keep none: this test is about every
stage running, not about what a weak model compresses).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_api")
KEEP_FIRST = Path(__file__).resolve().parent / "fixtures" / "keep_first_filter.sql"
REDUCED = {
    "sample.problems_per_round": 4,
    "sample.max_tokens": 48,
    "sample.shard_size": 4,
    "rewrite.max_tokens": 48,
    "rewrite.shard_size": 8,
    "score.shard_size": 8,
    "filter.sql": KEEP_FIRST,
    "train.steps": 2,
    "train.batch_size": 2,
    "train.checkpoint_every": 2,
    "evaluate.limit": 4,
    "evaluate.max_tokens": 48,
    "evaluate.shard_size": 4,
}


def test_one_round_of_the_smollm2_config_runs_every_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data.catalog import run_query
    from flows.cli import main

    monkeypatch.chdir(REPO)  # the config's GSM8K path is relative to the repository
    ws = tmp_path / "ws"
    sets = [a for k, v in REDUCED.items() for a in ("--set", f"{k}={v}")]
    assert main(["run", "-c", "configs/smollm2-gsm8k.yaml", "-w", str(ws), *sets]) == 0

    stages = json.loads((ws / ".mpd" / "last_run.json").read_text())["stages"]
    assert {w: o["state"] for w, o in stages.items()} == {
        w: "done"
        for w in ("0/eval", "1/sample", "1/rewrite", "1/score", "1/filter", "1/train", "1/eval")
    }
    info = json.loads((ws / "models" / "smollm2" / "IMPORT.json").read_text())
    assert info["vocab_size"] == 49152
    (row,) = run_query(
        ws,
        "select (select count(*) from samples) samples, (select count(*) from rewrites) rewrites,"
        " (select max(list_max(topk_ids)) from scores) top_id,"
        " (select count(*) from kept) kept, (select count(*) from train_log) steps,"
        " (select count(*) from evals where round = 1) evals,"
        " (select count(*) from problems where split = 'test') test_problems",
    ).to_pylist()
    assert row["samples"] == 8 and row["rewrites"] == 8 and row["evals"] == 4
    assert row["kept"] >= 1 and row["steps"] >= 2
    assert 1000 < row["top_id"] < 49152  # real-vocabulary ids, not the tiny world's
    assert row["test_problems"] == 1319  # GSM8K's own test split
    # no <think> tags: the whole reply counts as the trace
    (tags,) = run_query(ws, "select count(*) n from samples where answer_tokens > 0").to_pylist()
    assert tags["n"] == 0
