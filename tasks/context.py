"""What a stage's ``run`` is handed: the campaign's context and the round it is part of.

:class:`Context` is the campaign (config, store, problems, grader, engines, what this run did);
:class:`Round` is one round in progress (its starting student, the stages done so far, and how
the method trains: on which table, filtered or not, with whose teacher). A stage declaration
(:mod:`tasks.stage`) reads its inputs from both and adds its result to the round; the flows
build them and decide which stages run (``flows/modes.py``), so tasks never import flows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from data.errors import UserError
from data.keys import code_version, directory_digest, stage_key
from data.store import StageStore
from engines.config import EngineConfig
from tasks.common import StageResult, read_stage, run_stage

log = logging.getLogger("mpd")

# The reference world's models, installed into a workspace's bootstrap stage by the flows.
BUILTIN_MODELS = {"builtin:tiny-student": "student", "builtin:tiny-teacher": "teacher"}


def check_model_dir(name: str) -> Path:
    """A model given as a path: it must be a directory (a saved model or adapter)."""
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"model path does not exist: {name}")
    if not path.is_dir():
        raise UserError(f"model path is not a directory (a saved model or adapter): {name}")
    return path


def resolve_model(name: str, workspace: Path) -> Path:
    """A model name from the config as a directory: ``builtin:`` names live in the
    workspace's bootstrap stage; ``packaged:NAME`` (a GGUF model shipped in a Python package,
    e.g. ``packaged:smollm2``) is imported into ``<workspace>/models/NAME`` on first use
    (``train/gguf.py``); anything else is a path."""
    if name.startswith("packaged:"):
        from train.gguf import import_gguf, packaged_gguf

        short = name.removeprefix("packaged:")
        path = Path(workspace) / "models" / short
        if not (path / "IMPORT.json").is_file():
            source = packaged_gguf(short)  # an unknown name is one line
            log.info("importing %s into %s (once per workspace)", name, path)
            import_gguf(source, path)
        return path
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        path = StageStore(workspace).stage_dir("bootstrap", 0) / BUILTIN_MODELS[name]
        if not path.is_dir():
            raise UserError(f"{name} is not built yet in {workspace}; run `mpd bootstrap` first")
        return path
    return check_model_dir(name)


@dataclass(frozen=True)
class ModelRef:
    """A model a stage uses (a round's student, the teacher, self_distill's frozen copy):
    where it is, and what identifies it in stage keys (a digest of its files, or for a trained
    student the key of the train stage that made it)."""

    path: str
    identity: str


@dataclass
class Round:
    """One round in progress: what the method trains on, and the stages it has run so far.

    ``student`` is the round's student: the one it started from until ``train`` replaces it
    with the one it trained (which ``eval`` then evaluates).
    """

    r: int
    student: ModelRef
    targets: str = "sample"  # the stage whose rows train reads: sample, solve, rewrite, truncate
    kept_only: bool = False  # train reads only the rows the filter kept
    teacher: ModelRef | None = None  # self_distill's frozen student; None: models.teacher
    instruction: str | None = None  # the frozen student's "be concise" context
    done: dict[str, StageResult] = field(default_factory=dict)

    def result(self, stage: str, needed_by: str) -> StageResult:
        """The result of an earlier stage of this round (a plan that omits it is a bug)."""
        if stage not in self.done:
            raise RuntimeError(f"round {self.r}: {needed_by} needs {stage}, which has not run")
        return self.done[stage]


class Context:
    """What every stage of a campaign reads: the config (``flows.config.RunConfig``), the
    store, the problems.

    Engines and the grader are not here but in :mod:`tasks.engines` and :mod:`tasks.generation`:
    a stage's key covers what its module imports, and a stage that runs no engine (the filter,
    the problems) must not recompute when an engine's code changes."""

    def __init__(self, cfg: Any, problems_key: str) -> None:
        self.cfg, self.problems_key = cfg, problems_key
        self.store = StageStore(cfg.workspace)
        self.outcomes: dict[str, dict[str, Any]] = {}  # "round/stage" -> what this run did
        self.students: dict[int, ModelRef] = {}  # round -> the student that round produced

    @cached_property
    def problems(self) -> dict[str, dict]:
        table = read_stage(self.store, "problems", 0)
        return {r["problem_id"]: r for r in table.to_pylist()}

    def model_path(self, name: str | None) -> Path:
        return resolve_model(name or self.cfg.models.teacher, self.cfg.workspace)

    def identity(self, name: str | None) -> str:
        return directory_digest(self.model_path(name))

    def model(self, name: str | None) -> ModelRef:
        """A configured model (default: the teacher) with its identity."""
        path = self.model_path(name)
        return ModelRef(str(path), directory_digest(path))

    def engine_config(self, role: str) -> EngineConfig:
        engines = self.cfg.engines
        if role == "rewriter":
            return engines.rewriter or engines.teacher
        return {"student": engines.student, "teacher": engines.teacher}[role]

    def workers(self, role: str) -> int:
        """Shards of a stage in flight at once on the flow's task runner (``tasks/shards.py``)."""
        return self.engine_config(role).shard_workers

    def key(self, stage: str, module: str, **parts: Any) -> tuple[str, str]:
        """The stage key and code version of a stage declared in ``module`` (its ``__name__``):
        its source and every module of this package it imports, transitively
        (:func:`data.keys.code_version`), so its wiring, body, trainer, losses, engines and
        grader are all in the key."""
        code = code_version(module)
        return stage_key(stage, seed=self.cfg.seed, code=code, **parts), code

    def run(
        self, stage: str, rnd: Round, key: str, code: str, body: Callable[[Any], Any]
    ) -> StageResult:
        """Run a stage through the Prefect stage task when inside a flow, else directly; the
        result joins the round's ``done``."""
        from prefect.context import FlowRunContext

        r = rnd.r

        def go() -> StageResult:
            self.share(stage, r, key)
            return run_stage(self.store, stage, r, key, body, code=code)

        where = f"{r}/{stage}"
        try:
            if FlowRunContext.get() is None:
                result = go()
                cached = result.cached
            else:
                from tasks.prefect_stage import stage_task

                state = stage_task(
                    workspace=str(self.store.workspace),
                    stage=stage,
                    round_=r,
                    key=key,
                    run=go,
                    return_state=True,
                )
                result = state.result()  # raises the stage's exception if it failed
                # A Prefect cache hit hands back the result of the run that computed it.
                cached = result.cached or state.name == "Cached"
        except Exception as exc:  # boundary: any failure recorded for mpd status, re-raised
            self.outcomes[where] = {"state": "failed", "key": key[:12], "error": str(exc)}
            raise
        self.outcomes[where] = {
            "state": "cached" if cached else "done",
            "key": key[:12],
            "rows": result.rows,
            "seconds": round(result.seconds, 3),
        }
        rnd.done[stage] = result
        return result

    def share(self, stage: str, r: int, key: str) -> None:
        """Adopt this stage run from a ``cache_from`` workspace that has it (same key).

        Then ``run_stage`` finds it committed: a cache hit, as if computed here.
        A peer that cannot be read is skipped: sharing saves time, never fails a run.
        """
        if not self.cfg.cache_from or self.store.lookup(stage, r, key, deep=False):
            return
        for other in self.cfg.cache_from:
            try:
                man = self.store.adopt(StageStore(other), stage, r, key)
            except OSError as exc:
                log.warning("round %d %-8s not shared from %s: %s", r, stage, other, exc)
                continue
            if man is not None:
                log.info("round %d %-8s shared from %s (key %s)", r, stage, other, key[:12])
                return

    def computed(self, r: int) -> bool:
        """Whether this run computed (not only reused) any stage of round ``r``."""
        return any(
            where.split("/")[0] == str(r) and o["state"] == "done"
            for where, o in self.outcomes.items()
        )

    def starting_student(self) -> ModelRef:
        """Round 0's student: the configured ``models.student``."""
        self.students[0] = self.model(self.cfg.models.student)
        return self.students[0]
