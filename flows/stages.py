"""One function per stage: build the stage key, then run the stage body on the store.

Keys chain, so one changed knob recomputes only what depends on it:

    sample(r)   <- problems, student(r-1), sample config, round
    solve(r)    <- problems, teacher, sample config, round            (off_policy)
    rewrite(r)  <- sample(r), rewriter, rewrite config
    score(r)    <- the targets' stage run, teacher, score config
    filter(r)   <- rewrite(r), filter config + SQL text
    truncate(r) <- sample(r), rewrite(r), filter(r)                    (truncation)
    train(r)    <- the targets' stage run, filter(r), score(r), student(r-1), train config
    eval(r)     <- problems, student(r), evaluate config
    student(r) = train(r)'s model; its identity is train(r)'s key

No key holds the method: which stages a round runs is the method's business
(``flows/modes.py``), and two methods that run the same stage on the same
inputs share it by key (in one workspace, or across ``cache_from:``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

import tasks.evaluate
import tasks.filter
import tasks.rewrite
import tasks.sample
import tasks.score
import tasks.train
from data.keys import code_version, directory_digest, stage_key
from data.store import StageStore
from engines.config import EngineConfig
from flows.bootstrap import resolve_model
from flows.config import RunConfig
from tasks.common import StageResult, engine_for, read_stage, run_stage, stage_files

log = logging.getLogger("mpd")


@dataclass(frozen=True)
class Student:
    """A student checkpoint: where it is, and what identifies it in stage keys."""

    path: str
    identity: str


@dataclass(frozen=True)
class Targets:
    """What a round trains on: a table of target traces, which of its rows, the teacher's view."""

    data: StageResult  # the stage holding the traces: sample, solve, rewrite or truncate
    filtered: StageResult | None = None  # filter decisions: train on kept rows only
    scored: StageResult | None = None  # the teacher's top-k for the rows (offline KL)
    teacher: Student | None = None  # self_distill's frozen student; None: models.teacher
    instruction: str | None = None  # the frozen student's "be concise" context


class Context:
    """What every stage of a campaign reads: the config, the store, the problems."""

    def __init__(self, cfg: RunConfig, problems_key: str) -> None:
        self.cfg, self.problems_key = cfg, problems_key
        self.store = StageStore(cfg.workspace)
        self.outcomes: dict[str, dict[str, Any]] = {}  # "round/stage" -> what this run did
        self.students: dict[int, Student] = {}  # round -> the student that round produced

    @cached_property
    def problems(self) -> dict[str, dict]:
        table = read_stage(self.store, "problems", 0)
        return {r["problem_id"]: r for r in table.to_pylist()}

    @cached_property
    def grader(self) -> Callable[[str | None, str], bool]:
        file = self.cfg.problems.file
        if self.cfg.problems.source == "file" and file is not None:
            from data.mathscore import grade

            return lambda pred, gold: grade(pred, gold, file.scorer)
        from data.answers import answers_match

        return answers_match

    def model_path(self, name: str | None) -> Path:
        return resolve_model(name or self.cfg.models.teacher, self.cfg.workspace)

    def identity(self, name: str | None) -> str:
        return directory_digest(self.model_path(name))

    def engine_config(self, role: str) -> EngineConfig:
        engines = self.cfg.engines
        if role == "rewriter":
            return engines.rewriter or engines.teacher
        return {"student": engines.student, "teacher": engines.teacher}[role]

    def workers(self, role: str) -> int:
        """Shards of a stage in flight at once on the flow's task runner (``tasks/shards.py``)."""
        return self.engine_config(role).shard_workers

    def engine(self, role: str, path: Path | str, *, slot: str | None = None) -> Any:
        """The engine for ``role`` over ``path``; ``slot`` (default: the role) is what it
        replaces when the model changes: each round's student closes the last round's."""
        ecfg, m = self.engine_config(role), self.cfg.models
        # a served endpoint keeps finished requests, so a restarted stage resends only the rest
        journal = self.store.workspace / ".requests" if ecfg.kind == "openai" else None
        return engine_for(
            ecfg, path, dtype=m.dtype, device=m.device, journal_dir=journal, role=slot or role
        )

    def run(
        self, stage: str, r: int, key: str, code: str, body: Callable[[Any], Any]
    ) -> StageResult:
        """Run a stage through the Prefect stage task when inside a flow, else directly."""
        from prefect.context import FlowRunContext

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
        except Exception as exc:
            self.outcomes[where] = {"state": "failed", "key": key[:12], "error": str(exc)}
            raise
        self.outcomes[where] = {
            "state": "cached" if cached else "done",
            "key": key[:12],
            "rows": result.rows,
            "seconds": round(result.seconds, 3),
        }
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

    def key(
        self, stage: str, module: Any, *, wiring: str = __name__, **parts: Any
    ) -> tuple[str, str]:
        # The stage's module and all it imports, and the file that wires its inputs and holds
        # its body (this one, or flows.modes for a method's own stage): data.keys.code_version.
        code = code_version(module, shallow=(wiring,))
        return stage_key(stage, seed=self.cfg.seed, code=code, **parts), code


def starting_student(ctx: Context) -> Student:
    path = ctx.model_path(ctx.cfg.models.student)
    ctx.students[0] = Student(str(path), directory_digest(path))
    return ctx.students[0]


def evaluate(ctx: Context, r: int, student: Student) -> StageResult:
    cfg = ctx.cfg.evaluate
    key, code = ctx.key(
        "eval",
        tasks.evaluate,
        config=cfg,
        inputs={"problems": ctx.problems_key},
        models={"student": student.identity},
    )
    records = tasks.evaluate.eval_problems(list(ctx.problems.values()), cfg)
    return ctx.run(
        "eval",
        r,
        key,
        code,
        lambda w: tasks.evaluate.evaluate_body(
            w,
            cfg,
            engine=ctx.engine("student", student.path),
            records=records,
            round_=r,
            seed=ctx.cfg.seed,
            model=student.identity[:12],
            grader=ctx.grader,
            workers=ctx.workers("student"),
        ),
    )


def sample(ctx: Context, r: int, student: Student) -> StageResult:
    return generate_answers(ctx, r, "sample", "student", student, student.identity[:12])


def generate_answers(
    ctx: Context, r: int, stage: str, role: str, model: Student, label: str
) -> StageResult:
    """``cfg.sample`` traces of round r's problems by ``model`` in ``role``: the student's
    ``sample`` stage, and off_policy's ``solve`` (the teacher answering as a student would)."""
    cfg = ctx.cfg.sample
    key, code = ctx.key(
        stage,
        tasks.sample,
        config={"sample": cfg, "round": r},
        inputs={"problems": ctx.problems_key},
        models={role: model.identity},
    )
    records = tasks.sample.round_problems(
        list(ctx.problems.values()), cfg.problems_per_round, ctx.cfg.seed, r
    )
    return ctx.run(
        stage,
        r,
        key,
        code,
        lambda w: tasks.sample.sample_body(
            w,
            cfg,
            engine=ctx.engine(role, model.path),
            records=records,
            round_=r,
            seed=ctx.cfg.seed,
            model=label,
            grader=ctx.grader,
            workers=ctx.workers(role),
            stage=stage,
        ),
    )


def rewrite(ctx: Context, r: int, sampled: StageResult, student: Student) -> StageResult:
    cfg, name = ctx.cfg.rewrite, ctx.cfg.models.rewriter
    path = ctx.model_path(name)
    key, code = ctx.key(
        "rewrite",
        tasks.rewrite,
        config=cfg,
        inputs={"sample": sampled.key},
        models={"rewriter": ctx.identity(name)},
    )
    from train.models import load_tokenizer

    return ctx.run(
        "rewrite",
        r,
        key,
        code,
        lambda w: tasks.rewrite.rewrite_body(
            w,
            cfg,
            engine=ctx.engine("rewriter", path),
            workers=ctx.workers("rewriter"),
            samples=read_stage(ctx.store, "sample", r).to_pylist(),
            problems=ctx.problems,
            round_=r,
            seed=ctx.cfg.seed,
            model=str(name or ctx.cfg.models.teacher),
            grader=ctx.grader,
            student_tokenizer=load_tokenizer(student.path),
        ),
    )


def score(
    ctx: Context,
    r: int,
    targets: StageResult,
    *,
    teacher: Student | None = None,
    instruction: str | None = None,
) -> StageResult:
    """The teacher's top-k for every row of ``targets`` (any stage holding traces).

    ``teacher`` + ``instruction``: self-distillation's frozen student reading the
    problem inside the "be concise" template. The teacher's own solutions are
    scored under the plain problem, the context they were generated in.
    """
    cfg = ctx.cfg.score
    if targets.stage == "solve":
        cfg = cfg.model_copy(update={"context": "problem"})
    name = ctx.cfg.models.teacher
    role, path, identity, label = (
        ("teacher", ctx.model_path(name), ctx.identity(name), name)
        if teacher is None
        else ("student", Path(teacher.path), teacher.identity, f"self:{teacher.identity[:12]}")
    )
    # the frozen self-distillation teacher has its own slot: it must not evict the student's
    slot = "teacher" if teacher is None else "self_teacher"
    config: dict[str, Any] = {"score": cfg, "template": ctx.cfg.rewrite.prompt}
    if instruction is not None:
        config["instruction"] = instruction
    key, code = ctx.key(
        "score",
        tasks.score,
        config=config,
        inputs={targets.stage: targets.key},
        models={"teacher": identity},
    )

    def body(w: Any) -> dict:
        samples = [] if targets.stage == "solve" else read_stage(ctx.store, "sample", r).to_pylist()
        return tasks.score.score_body(
            w,
            cfg,
            engine=ctx.engine(role, path, slot=slot),
            workers=ctx.workers(role),
            rewrites=read_stage(ctx.store, targets.stage, r).to_pylist(),
            samples={(s["problem_id"], s["sample_idx"]): s for s in samples},
            problems=ctx.problems,
            rewrite_template=ctx.cfg.rewrite.prompt,
            round_=r,
            model=label,
            instruction=instruction,
        )

    return ctx.run("score", r, key, code, body)


def filter_(ctx: Context, r: int, rewritten: StageResult) -> StageResult:
    cfg = ctx.cfg.filter
    sql = tasks.filter.filter_sql(cfg)
    key, code = ctx.key(
        "filter",
        tasks.filter,
        config={"filter": cfg, "sql": hashlib.sha256(sql.encode()).hexdigest()},
        inputs={"rewrite": rewritten.key},
    )
    return ctx.run(
        "filter",
        r,
        key,
        code,
        lambda w: tasks.filter.filter_body(
            w,
            cfg,
            rewrites=read_stage(ctx.store, "rewrite", r),
            # what the rewrites were made from (an input of the rewrite's key already)
            samples=read_stage(ctx.store, "sample", r),
            round_=r,
        ),
    )


def kept_count(ctx: Context, r: int) -> tuple[int, dict[str, int]]:
    decisions = read_stage(ctx.store, "filter", r)
    reasons = pc.value_counts(decisions.column("reason")).to_pylist()
    return int(pc.sum(decisions.column("kept")).as_py() or 0), {
        x["values"]: x["counts"] for x in reasons
    }


def kept_pairs(ctx: Context, r: int) -> set[tuple[str, int]]:
    """(problem_id, sample_idx) of the round's kept rewrites."""
    return {
        (d["problem_id"], d["sample_idx"])
        for d in read_stage(ctx.store, "filter", r).to_pylist()
        if d["kept"]
    }


def train(ctx: Context, r: int, targets: Targets, student: Student) -> tuple[StageResult, Student]:
    """Train the student on ``targets``; its output is round ``r``'s student."""
    cfg, m = ctx.cfg.train, ctx.cfg.models
    data, filtered, scored = targets.data, targets.filtered, targets.scored
    inputs = {
        data.stage: data.key,
        **({"filter": filtered.key} if filtered else {}),
        **({"score": scored.key} if scored else {}),
    }
    models = {"student": student.identity}
    online = cfg.teacher_mode == "online" and cfg.loss != "ce"
    teacher_path = targets.teacher.path if targets.teacher else str(ctx.model_path(m.teacher))
    if online:
        models["teacher"] = targets.teacher.identity if targets.teacher else ctx.identity(m.teacher)
    config: Any = (
        cfg if targets.instruction is None else {"train": cfg, "teacher": targets.instruction}
    )
    key, code = ctx.key("train", tasks.train, config=config, inputs=inputs, models=models)

    def body(w: Any) -> dict:
        from train.models import load_tokenizer

        rows = tasks.train.training_rows(
            stage_files(ctx.store, data.stage, r),
            decisions=stage_files(ctx.store, "filter", r) if filtered else None,
            scores=stage_files(ctx.store, "score", r) if scored else None,
        )
        instruction = targets.instruction if online else None
        tokenizer = load_tokenizer(student.path)
        examples = list(
            tasks.train.build_examples(rows, ctx.problems, tokenizer, teacher_template=instruction)
        )
        return tasks.train.train_body(
            w,
            cfg,
            student_path=student.path,
            examples=examples,
            round_=r,
            seed=ctx.cfg.seed,
            dtype=m.dtype,
            device=m.device,
            teacher_path=teacher_path,
        )

    result = ctx.run("train", r, key, code, body)
    ctx.students[r] = Student(str(Path(result.path) / "model"), result.key)
    return result, ctx.students[r]
