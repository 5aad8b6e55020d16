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
from typing import TYPE_CHECKING, Any

from data.digests import cache_dir, tree_digest
from data.errors import UserError
from data.store import StageStore
from engines.config import EngineConfig
from tasks.common import StageResult, read_stage, run_stage
from tasks.stagekey import StageKey, derive

if TYPE_CHECKING:
    from tasks.stage import Stage

log = logging.getLogger("mpd")

# How a stage run is executed: (workspace, stage, round, key, go) -> its result; ``go`` runs it
# on the store (a cache hit when committed with that key).
Executor = Callable[[str, str, int, str, Callable[[], StageResult]], StageResult]

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
    e.g. ``packaged:smollm2``) in ``<workspace>/models/NAME``, where the campaign imports it
    before any stage runs (``flows/bootstrap.py``: importing is no stage's code, so a change
    to the importer recomputes nothing whose model did not change); anything else is a path."""
    if name.startswith("packaged:"):
        path = Path(workspace) / "models" / name.removeprefix("packaged:")
        if not (path / "IMPORT.json").is_file():
            raise UserError(f"{name} is not imported into {workspace} yet; `mpd run` imports it")
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


@dataclass(frozen=True)
class Recipe:
    """What a method's round trains on (``flows/modes.py`` makes it from the method and config).

    The stages a round runs follow from it and the stages' declarations
    (:func:`tasks.registry.round_plan`): train reads ``targets`` (the stage whose rows it
    trains on: sample, solve, rewrite, truncate), the filter's decisions when ``kept_only``, the
    teacher's stored top-k when ``scored``; whatever those read runs before them.
    """

    targets: str = "sample"
    kept_only: bool = False  # train reads only the rows the filter kept
    scored: bool = False  # the loss reads the teacher's stored top-k (the score stage)
    self_teacher: bool = False  # the teacher is a frozen copy of the student (self_distill)
    start: bool = False  # round 0: the starting student's evaluation, nothing else


@dataclass
class Round:
    """One round in progress: what the method trains on, and the stages it has run so far.

    ``student`` is the round's student: the one it started from until ``train`` replaces it
    with the one it trained (which ``eval`` then evaluates).
    """

    r: int
    student: ModelRef
    recipe: Recipe = field(default_factory=Recipe)
    teacher: ModelRef | None = None  # self_distill's frozen student; None: models.teacher
    instruction: str | None = None  # the frozen student's "be concise" context
    done: dict[str, StageResult] = field(default_factory=dict)

    @property
    def targets(self) -> str:
        return self.recipe.targets

    @property
    def kept_only(self) -> bool:
        return self.recipe.kept_only

    def result(self, stage: str, needed_by: str) -> StageResult:
        """The result of an earlier stage of this round (a plan that omits it is a bug)."""
        if stage not in self.done:
            raise RuntimeError(f"round {self.r}: {needed_by} needs {stage}, which has not run")
        return self.done[stage]


# The campaign-level stages (bootstrap, problems) run before any student is known.
NO_STUDENT = ModelRef("", "")


def direct(
    workspace: str, stage: str, r: int, key: str, go: Callable[[], StageResult]
) -> StageResult:
    """Run a stage in this thread (outside a Prefect flow: tests, a benchmark)."""
    return go()


class Context:
    """What every stage of a campaign reads: the config (``flows.config.RunConfig``), the
    store, the problems, and what this run did.

    Engines and the grader are not here but in :mod:`tasks.engines` and :mod:`tasks.generation`:
    a stage's key covers what its module imports, and a stage that runs no engine (the filter,
    the problems) must not recompute when an engine's code changes. For the same reason the
    Prefect task a stage runs through is handed in (``execute``: the flows pass
    :func:`tasks.prefect_stage.execute`), not imported: orchestration shapes no row.
    """

    def __init__(self, cfg: Any, execute: Executor = direct) -> None:
        self.cfg, self.execute = cfg, execute
        self.store = StageStore(cfg.workspace)
        self.cache = cache_dir(cfg.workspace)  # content digests and interpreter versions
        self.setup = Round(0, NO_STUDENT)  # the campaign-level stages' results (problems)
        self.outcomes: dict[str, dict[str, Any]] = {}  # "round/stage" -> what this run did
        self.students: dict[int, ModelRef] = {}  # round -> the student that round produced

    @cached_property
    def problems(self) -> dict[str, dict]:
        table = read_stage(self.store, "problems", 0)
        return {r["problem_id"]: r for r in table.to_pylist()}

    def model_path(self, name: str | None) -> Path:
        return resolve_model(name or self.cfg.models.teacher, self.cfg.workspace)

    def model(self, name: str | None) -> ModelRef:
        """A configured model (default: the teacher) with its identity."""
        path = self.model_path(name)
        return ModelRef(str(path), tree_digest(path, self.cache))

    def role_model(self, role: str, rnd: Round) -> ModelRef:
        """The model of ``role`` in round ``rnd``: the round's student; its teacher (the
        configured one, or self_distill's frozen student); the rewriter (default: the teacher)."""
        m = self.cfg.models
        if role == "student":
            return rnd.student
        if role == "teacher":
            return rnd.teacher or self.model(m.teacher)
        return self.model(m.rewriter or m.teacher)

    def engine_role(self, role: str, rnd: Round | None = None) -> str:
        """Whose engine settings serve ``role``: self_distill's frozen teacher is a student."""
        return "student" if role == "teacher" and rnd is not None and rnd.teacher else role

    def engine_config(self, role: str) -> EngineConfig:
        engines = self.cfg.engines
        if role == "rewriter":
            return engines.rewriter or engines.teacher
        return {"student": engines.student, "teacher": engines.teacher}[role]

    def workers(self, role: str) -> int:
        """Shards of a stage in flight at once on the flow's task runner (``tasks/shards.py``)."""
        return self.engine_config(role).shard_workers

    def key(self, stage: Stage, rnd: Round) -> StageKey:
        """The key of ``stage`` in round ``rnd``, derived from its declaration
        (:func:`tasks.stagekey.derive`)."""
        return derive(stage, self, rnd)

    def read_key(self, stage: str, rnd: Round, needed_by: str) -> str:
        """The key of a stage this round reads: one of the round's, or a campaign-level one."""
        if stage in rnd.done or stage not in self.setup.done:
            return rnd.result(stage, needed_by).key
        return self.setup.done[stage].key

    def record(self, stage: Stage, rnd: Round, result: StageResult) -> None:
        """A stage's result joins its round; train's output becomes the round's student."""
        rnd.done[stage.name] = result
        if stage.makes_student:
            rnd.student = self.students[rnd.r] = ModelRef(
                str(Path(result.path) / "model"), result.key
            )

    def run(
        self, stage: Stage, rnd: Round, key: StageKey, body: Callable[[Any], Any]
    ) -> StageResult:
        """Run a stage (through ``execute``: the Prefect stage task inside a flow), cached on
        the store by its key; the result joins the round."""
        r, name = rnd.r, stage.name

        def go() -> StageResult:
            self.share(name, r, key.key)
            return run_stage(self.store, name, r, key.key, body, code=key.code)

        where = f"{r}/{name}"
        try:
            execute = self.execute if stage.per_round else direct
            result = execute(str(self.store.workspace), name, r, key.key, go)
        except Exception as exc:  # boundary: any failure recorded for mpd status, re-raised
            self.outcomes[where] = {"state": "failed", "key": key.key[:12], "error": str(exc)}
            raise
        self.outcomes[where] = {
            "state": "cached" if result.cached else "done",
            "key": key.key[:12],
            "rows": result.rows,
            "seconds": round(result.seconds, 3),
        }
        self.record(stage, rnd, result)
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
