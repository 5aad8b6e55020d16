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

from tests.conftest import GSM8K_FIXTURE, REPO

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

    monkeypatch.chdir(REPO)  # the config's GSM8K path (the fixture) is relative to the repository
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
    fixture_test = len((GSM8K_FIXTURE / "test.jsonl").read_text().splitlines())
    assert (
        row["test_problems"] == fixture_test == 50
    )  # the config's GSM8K: the fixture's test split
    # no <think> tags: the whole reply counts as the trace
    (tags,) = run_query(ws, "select count(*) n from samples where answer_tokens > 0").to_pylist()
    assert tags["n"] == 0

    # A Dask worker on another host gets the packaged model by name and content, never the
    # flow's path: it imports the packaged file into its own cache and checks the files.
    _a_worker_imports_the_packaged_model(ws, tmp_path)


WORKER = """
import pickle, sys
from tasks.packaged_fetch import weights_digest
handle = pickle.loads(sys.stdin.buffer.read())
try:
    path = handle.stored.fetch()
except Exception as exc:  # the test reads the error's one line
    print("error:", type(exc).__name__, exc)
else:
    print(path, weights_digest(path))
"""


def _a_worker_imports_the_packaged_model(ws: Path, tmp_path: Path) -> None:
    import os
    import pickle
    import shutil
    import subprocess
    import sys

    from engines.config import EngineConfig
    from tasks.engines import EngineHandle
    from tasks.packaged_fetch import PackagedModel, packaged_model

    flow_copy = ws / "models" / "smollm2"
    model = packaged_model(ws, str(flow_copy))
    assert isinstance(model, PackagedModel) and model.name == "smollm2"
    handle = EngineHandle(EngineConfig(), str(flow_copy), "float32", "cpu", None, "student", model)
    sent = pickle.dumps(handle)
    assert str(tmp_path).encode() not in sent, "a flow-host path travels to the worker"

    def worker() -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MPD_CACHE_DIR": str(tmp_path / "worker")}
        done = subprocess.run(
            [sys.executable, "-c", WORKER], input=sent, env=env, capture_output=True, timeout=600
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return done.stdout.decode().strip().splitlines()[-1]

    path, digest = worker().split()
    assert Path(path).is_relative_to(tmp_path / "worker") and digest == model.digest
    shutil.rmtree(ws / "models")  # the flow's copy is not what the worker reads
    (Path(path) / "config.json").write_text("{}")  # a damaged (or another version's) copy
    said = worker()
    assert said.startswith("error: UserError packaged:smollm2 imported on this host has other")
