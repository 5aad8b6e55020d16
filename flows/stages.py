"""One function per stage: build the stage key, then run the stage body on the store.

Keys chain, so one changed knob recomputes only what depends on it:

    sample(r)  <- problems, student(r-1), sample config, round
    rewrite(r) <- sample(r), rewriter, rewrite config
    score(r)   <- rewrite(r), teacher, score config
    filter(r)  <- rewrite(r), filter config + SQL text
    train(r)   <- filter(r), score(r), student(r-1), train config
    eval(r)    <- problems, student(r), evaluate config
    student(r) = train(r)'s model; its identity is train(r)'s key
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

import tasks.common
import tasks.evaluate
import tasks.filter
import tasks.rewrite
import tasks.sample
import tasks.score
import tasks.train
from data.keys import code_version, directory_digest, stage_key
from data.store import StageStore
from flows.bootstrap import resolve_model
from flows.config import RunConfig
from tasks.common import StageResult, engine_for, read_stage, run_stage

log = logging.getLogger("mpd")


@dataclass(frozen=True)
class Student:
    """A student checkpoint: where it is, and what identifies it in stage keys."""

    path: str
    identity: str


class Context:
    """What every stage of a campaign reads: the config, the store, the problems."""

    def __init__(self, cfg: RunConfig, problems_key: str) -> None:
        self.cfg, self.problems_key = cfg, problems_key
        self.store = StageStore(cfg.workspace)
        self.outcomes: dict[str, dict[str, Any]] = {}  # "round/stage" -> what this run did

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

    def engine(self, role: str, path: Path | str) -> Any:
        engines = self.cfg.engines
        ecfg = {"student": engines.student, "teacher": engines.teacher}.get(role)
        if role == "rewriter":
            ecfg = engines.rewriter or engines.teacher
        m = self.cfg.models
        return engine_for(ecfg, path, dtype=m.dtype, device=m.device)

    def run(
        self, stage: str, r: int, key: str, code: str, body: Callable[[Any], Any]
    ) -> StageResult:
        """Run a stage through the Prefect stage task when inside a flow, else directly."""
        from prefect.context import FlowRunContext

        def go() -> StageResult:
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

    def key(self, stage: str, module: Any, **parts: Any) -> tuple[str, str]:
        code = code_version(module, tasks.common)
        return stage_key(stage, seed=self.cfg.seed, code=code, **parts), code


def starting_student(ctx: Context) -> Student:
    path = ctx.model_path(ctx.cfg.models.student)
    return Student(str(path), directory_digest(path))


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
        ),
    )


def sample(ctx: Context, r: int, student: Student) -> StageResult:
    cfg = ctx.cfg.sample
    key, code = ctx.key(
        "sample",
        tasks.sample,
        config={"sample": cfg, "round": r},
        inputs={"problems": ctx.problems_key},
        models={"student": student.identity},
    )
    records = tasks.sample.round_problems(
        list(ctx.problems.values()), cfg.problems_per_round, ctx.cfg.seed, r
    )
    return ctx.run(
        "sample",
        r,
        key,
        code,
        lambda w: tasks.sample.sample_body(
            w,
            cfg,
            engine=ctx.engine("student", student.path),
            records=records,
            round_=r,
            seed=ctx.cfg.seed,
            model=student.identity[:12],
            grader=ctx.grader,
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
            samples=read_stage(ctx.store, "sample", r).to_pylist(),
            problems=ctx.problems,
            round_=r,
            seed=ctx.cfg.seed,
            model=str(name or ctx.cfg.models.teacher),
            grader=ctx.grader,
            student_tokenizer=load_tokenizer(student.path),
        ),
    )


def score(ctx: Context, r: int, rewritten: StageResult) -> StageResult:
    cfg, teacher = ctx.cfg.score, ctx.cfg.models.teacher
    key, code = ctx.key(
        "score",
        tasks.score,
        config={"score": cfg, "template": ctx.cfg.rewrite.prompt},
        inputs={"rewrite": rewritten.key},
        models={"teacher": ctx.identity(teacher)},
    )
    return ctx.run(
        "score",
        r,
        key,
        code,
        lambda w: tasks.score.score_body(
            w,
            cfg,
            engine=ctx.engine("teacher", ctx.model_path(teacher)),
            rewrites=read_stage(ctx.store, "rewrite", r).to_pylist(),
            samples={
                (s["problem_id"], s["sample_idx"]): s
                for s in read_stage(ctx.store, "sample", r).to_pylist()
            },
            problems=ctx.problems,
            rewrite_template=ctx.cfg.rewrite.prompt,
            round_=r,
            model=teacher,
        ),
    )


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
            w, cfg, rewrites=read_stage(ctx.store, "rewrite", r), round_=r
        ),
    )


def kept_count(ctx: Context, r: int) -> tuple[int, dict[str, int]]:
    decisions = read_stage(ctx.store, "filter", r)
    reasons = pc.value_counts(decisions.column("reason")).to_pylist()
    return int(pc.sum(decisions.column("kept")).as_py() or 0), {
        x["values"]: x["counts"] for x in reasons
    }


def train(
    ctx: Context, r: int, filtered: StageResult, scored: StageResult | None, student: Student
) -> tuple[StageResult, Student]:
    cfg, m = ctx.cfg.train, ctx.cfg.models
    inputs = {"filter": filtered.key, **({"score": scored.key} if scored else {})}
    key, code = ctx.key(
        "train", tasks.train, config=cfg, inputs=inputs, models={"student": student.identity}
    )

    def body(w: Any) -> dict:
        from train.models import load_tokenizer

        kept = {
            (d["problem_id"], d["sample_idx"])
            for d in read_stage(ctx.store, "filter", r).to_pylist()
            if d["kept"]
        }
        targets = [
            t
            for t in read_stage(ctx.store, "rewrite", r).to_pylist()
            if (t["problem_id"], t["sample_idx"]) in kept
        ]
        scores = (
            None
            if scored is None
            else {
                (s["problem_id"], s["sample_idx"]): s
                for s in read_stage(ctx.store, "score", r).to_pylist()
                if (s["problem_id"], s["sample_idx"]) in kept
            }
        )
        examples = tasks.train.build_examples(
            targets, scores, ctx.problems, load_tokenizer(student.path)
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
            teacher_path=str(ctx.model_path(m.teacher)),
        )

    result = ctx.run("train", r, key, code, body)
    return result, Student(str(Path(result.path) / "model"), result.key)
