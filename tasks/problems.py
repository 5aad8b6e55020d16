"""Problems stage: the problem set of a campaign (built-in world or the user's file).

It runs once per campaign, before any round, and every stage that reads problems has its key
among its inputs. Its key (declared below): the problems section, the run's seed where the
problem set takes it, and the problem file's content (a file, or a directory's files): edit
the file in place and the problem set is rebuilt. A Hugging Face dataset named by its hub id
(no local path) is keyed by that id and its config only.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from data.configbase import StrictModel
from data.gym import GymConfig, gym_records
from data.schemas import PROBLEMS
from data.sources import ProblemSourceConfig, load_problems
from data.tables import PROBLEMS as PROBLEMS_TABLE
from tasks.common import StageResult
from tasks.context import Context, Round
from tasks.stage import Stage
from world import build_problems

log = logging.getLogger("mpd")


class ProblemsConfig(StrictModel):
    source: Literal["builtin", "file", "reasoning_gym"] = Field(
        "builtin",
        description="builtin: the procedural reference world; file: your problems; "
        "reasoning_gym: one procedural family of the reasoning-gym package.",
    )
    n_train: int = Field(2000, ge=1, description="builtin: training problems.")
    n_test: int = Field(200, ge=1, description="builtin: test problems (training families).")
    n_heldout: int = Field(100, ge=0, description="builtin: problems of the held-out family.")
    n_dev: int = Field(
        0,
        ge=0,
        description="builtin: development problems (split dev: the training families, disjoint "
        "from train and test, from the same generators). `mpd bench --tune` chooses on them, so "
        "that the test split is read once, after every choice.",
    )
    dev_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of the training problems moved to split dev by a seeded hash of the "
        "problem id (any source; your own problems get their dev split this way). Test is never "
        "touched.",
    )
    difficulty: int | tuple[int, int] = Field(
        (1, 2),
        description="builtin: 1 (short, small numbers) to 5 (long chains), or an inclusive "
        "[lo, hi] range drawn per problem. The shipped models were trained on [1, 2].",
    )
    seed: int | None = Field(
        0,
        description="Seed of the problem set and its splits; null = the run's seed. The "
        "built-in models never trained on seed 0's test and held-out problems, so keep 0 with "
        "them: the run's `seed` varies sampling and training, not what is evaluated.",
    )
    file: ProblemSourceConfig | None = Field(
        None, description="source=file: where your problems are and which columns to read."
    )
    reasoning_gym: GymConfig | None = Field(
        None, description="source=reasoning_gym: the family, how many problems, its options."
    )

    def seed_for(self, run_seed: int) -> int:
        """The seed of the problem set: ``seed``, or the run's when it is null."""
        return run_seed if self.seed is None else self.seed

    @model_validator(mode="after")
    def _file_given(self) -> ProblemsConfig:
        lo, hi = (
            (self.difficulty, self.difficulty)
            if isinstance(self.difficulty, int)
            else (self.difficulty)
        )
        if not 1 <= lo <= hi <= 5:
            raise ValueError(f"difficulty must be within 1..5 (lo <= hi), got {self.difficulty}")
        if self.source == "file" and self.file is None:
            raise ValueError("source: file needs a problems.file section (path, columns)")
        if self.source == "reasoning_gym" and self.reasoning_gym is None:
            raise ValueError(
                "source: reasoning_gym needs a problems.reasoning_gym section (dataset)"
            )
        return self


def problem_records(cfg: ProblemsConfig, seed: int) -> list[dict]:
    """The campaign's problems as plain records (round 0), from the world or a file.

    ``seed`` is the run's; ``cfg.seed``, when set, takes its place for the problem set.
    """
    seed = cfg.seed_for(seed)
    if cfg.source == "file":
        assert cfg.file is not None  # guaranteed by the validator
        records = load_problems(cfg.file, seed)
    elif cfg.source == "reasoning_gym":
        assert cfg.reasoning_gym is not None  # guaranteed by the validator
        records = gym_records(cfg.reasoning_gym, seed)
    else:
        records = [
            {**r, "source": "builtin"}
            for r in build_problems(
                seed, cfg.n_train, cfg.n_test, cfg.n_heldout, cfg.difficulty, n_dev=cfg.n_dev
            )
        ]
    records = carve_dev(records, cfg.dev_fraction, seed)
    return [{"round": 0, **r} for r in records]


def carve_dev(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """Move a share ``fraction`` of the train split to split dev, chosen by a seeded hash of
    each problem id: the same problems whatever the order or number of the others, never one
    of test. Why a hash and not a draw: adding problems to a file must not reshuffle dev."""
    if fraction <= 0:
        return records

    def in_dev(pid: str) -> bool:
        digest = hashlib.sha256(f"{seed}\0dev\0{pid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < fraction

    return [
        {**r, "split": "dev"} if r["split"] == "train" and in_dev(r["problem_id"]) else r
        for r in records
    ]


def run(ctx: Context, rnd: Round) -> StageResult:
    """Commit the problem set (round 0) unless a valid one with the same key exists."""
    import pyarrow as pa

    cfg, store, key = ctx.cfg, ctx.store, ctx.key(STAGE, rnd)
    path = str(store.stage_dir("problems", 0))
    if man := store.lookup("problems", 0, key.key):
        log.info("problems: cached (%d rows, key %s)", man.rows, key.key[:12])
        result = StageResult("problems", 0, key.key, man.rows, True, 0.0, path)
    else:
        records = problem_records(cfg.problems, cfg.seed)
        writer = store.writer("problems", 0, key.key, code_version=key.code)
        writer.write_shard(0, pa.Table.from_pylist(records), PROBLEMS)
        man = writer.commit({"config": cfg.problems.model_dump(mode="json")}, expected_shards=1)
        log.info(
            "problems: wrote %d rows in %.1fs (key %s)", man.rows, man.duration_s, key.key[:12]
        )
        result = StageResult("problems", 0, key.key, man.rows, False, man.duration_s, path)
    ctx.record(STAGE, rnd, result)
    return result


def problems_config(cfg: Any, rnd: Round) -> dict[str, Any]:
    """The problems section, and the run's seed only where the problem set takes it."""
    config: dict[str, Any] = {"problems": cfg.problems}
    if cfg.problems.seed is None:
        config["seed"] = cfg.seed
    return config


def problem_files(cfg: Any) -> dict[str, Path]:
    """The user's problem file (or directory), where it is a local path."""
    file = cfg.problems.file
    if cfg.problems.source != "file" or file is None:
        return {}
    path = Path(file.path).expanduser()
    if file.format == "hf_dataset" and not path.exists():
        return {}  # a hub dataset id: keyed by its id (in the config)
    return {"problems.file": path}


STAGE = Stage(
    name="problems",
    summary="the campaign's problem set: the built-in world's, or your file's (once, round 0)",
    run=run,
    tables=(PROBLEMS_TABLE,),
    config=problems_config,
    files=problem_files,
    per_round=False,
)
