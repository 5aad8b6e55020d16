"""One sample stage over the tiny student, for tests that kill a stage and resume it.

As a script (the process a test kills with SIGKILL)::

    python -m tests.stage_runner WORKSPACE '{"kind": "vllm", ...}'

it builds the engine, prints ``engine-ready <worker pids>`` so the test knows
which processes must die with it, then runs the stage. A test resumes the
stage in-process with :func:`run_sample_stage` and its own engine: the stage
key is fixed, so the resumed run finds the killed run's finished shards.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tests.conftest import REPO

STUDENT = REPO / "world" / "assets" / "student"
PROBLEMS, SAMPLES_PER_PROBLEM, SHARD_SIZE, MAX_TOKENS = 8, 2, 2, 48


def records() -> list[dict]:
    from world import build_problems

    return build_problems(11, PROBLEMS, 0, 0, difficulty=1)


def run_sample_stage(workspace: Path, engine: Any) -> Any:
    """The stage, run or resumed; returns its :class:`tasks.common.StageResult`."""
    from data.answers import answers_match
    from data.store import StageStore
    from tasks.common import run_stage
    from tasks.sample import SampleConfig, sample_body

    cfg = SampleConfig(
        problems_per_round=PROBLEMS,
        n=SAMPLES_PER_PROBLEM,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        shard_size=SHARD_SIZE,
    )
    recs = records()

    def compute(writer: Any) -> dict:
        return sample_body(
            writer,
            cfg,
            engine=engine,
            records=recs,
            round_=1,
            seed=0,
            model="tiny-student",
            grader=answers_match,
        )

    return run_stage(StageStore(workspace), "sample", 1, "kill-test-key", compute)


def main(workspace: str, engine_json: str) -> int:
    from engines.config import EngineConfig
    from tasks.engines import engine_for

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = EngineConfig.model_validate(json.loads(engine_json))
    engine = engine_for(
        cfg, STUDENT, dtype="float32", device="cpu", journal_dir=Path(workspace) / ".requests"
    )
    pids = [w.proc.pid for w in getattr(engine, "workers", []) if w.proc is not None]
    print("engine-ready", *pids, flush=True)
    run_sample_stage(Path(workspace), engine)
    print("stage-done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
