"""Train stage: distil the student toward the teacher on the round's kept targets.

The trainer writes checkpoints into the stage's staging directory, which is
named by the stage key: a killed training stage restarted with the same key
resumes from its last checkpoint; checkpoints are removed before the commit.

Its key: the targets' stage run, the filter decisions and stored scores when the method uses
them, the round's starting student (and the online teacher), and the train config. Its output,
``train/round=<r>/model``, is the next student; its identity is this key.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from data.schemas import TRAIN_LOG, decode_topk
from data.stage_writer import StageWriter
from data.tables import TRAIN_LOG as TRAIN_LOG_TABLE
from tasks.common import StageResult, add_compute, stage_files
from tasks.context import Context, Recipe, Round
from tasks.generation import chat_prompts
from tasks.stage import Stage
from tasks.train_rows import training_rows
from train.config import TrainConfig
from train.launch import LAUNCH_DIR, RESULT, LaunchSpec, run_launched

log = logging.getLogger("mpd")


class ExamplePrompts:
    """problem id -> (the student's chat prompt, the online teacher's or None), each made once;
    :meth:`many` formats a record batch's new problems in one batched tokenizer call."""

    def __init__(
        self, problems: dict[str, dict], tokenizer: Any, teacher_template: str | None = None
    ) -> None:
        self.problems, self.tokenizer, self.teacher_template = problems, tokenizer, teacher_template
        self.vocab_size = len(tokenizer)  # the largest id + 1 a target of it can hold
        self._made: dict[str, tuple[list[int], list[int] | None]] = {}

    def __call__(self, pid: str) -> tuple[list[int], list[int] | None]:
        return self.many([pid])[0]

    def many(self, pids: list[str]) -> list[tuple[list[int], list[int] | None]]:
        new = list(dict.fromkeys(p for p in pids if p not in self._made))
        if new:
            questions = [self.problems[p]["prompt"] for p in new]
            student = chat_prompts(self.tokenizer, questions)
            teacher: list[list[int] | None] = [None] * len(new)
            if self.teacher_template is not None:
                template = self.teacher_template
                teacher = list(
                    chat_prompts(self.tokenizer, [template.format(problem=q) for q in questions])
                )
            self._made.update(zip(new, zip(student, teacher, strict=True), strict=True))
        return [self._made[p] for p in pids]


def example_prompts(
    problems: dict[str, dict], tokenizer: Any, *, teacher_template: str | None = None
) -> ExamplePrompts:
    """problem id -> (the student's chat prompt, the online teacher's or None), each made once."""
    return ExamplePrompts(problems, tokenizer, teacher_template)


def build_examples(
    batches: Iterable[pa.RecordBatch],
    problems: dict[str, dict],
    tokenizer: Any,
    *,
    teacher_template: str | None = None,
) -> Iterator[Any]:
    """ModelRef context (plain problem prompt) + target ids (+ the teacher's stored top-k), one
    Example per row of :func:`training_rows`' batches; arrays are cut from each batch's buffers.

    The stage itself writes these rows into a memory-mapped examples file instead
    (``train.example_file``, the same examples without a list of them); this is their reference,
    which tests and benchmarks compare with.

    ``teacher_template`` (self-distillation with an online teacher): the teacher
    reads the problem inside this "be concise" template while the student reads
    the plain problem; both score the same target ids.
    """
    # deferred: pulls in torch (mpd --help imports every stage module, via tasks.registry)
    from train.batching import Example

    prompt = example_prompts(problems, tokenizer, teacher_template=teacher_template)
    for batch in batches:
        pids = batch.column("problem_id").to_pylist()
        tok_off, tok = _flat(batch.column("token_ids"))
        scored = "k" in batch.schema.names
        if scored:
            ks = batch.column("k").to_numpy(zero_copy_only=False)
            unscored = batch.column("k").is_null().to_numpy(zero_copy_only=False)
            ids_off, ids = _flat(batch.column("topk_ids"))
            lp_off, lps = _flat(batch.column("topk_logprob_gaps"))
            counts = batch.column("topk_counts")
            fixed_k = counts.is_null().to_numpy(zero_copy_only=False)
            n_off, ns = _flat(counts)
        for i, pid in enumerate(pids):
            target = tok[tok_off[i] : tok_off[i + 1]]
            topk_ids = topk_lp = None
            if scored:
                if unscored[i]:
                    raise ValueError(f"{pid} sample {batch.column('sample_idx')[i]}: no score")
                topk_ids, topk_lp = decode_topk(
                    ids[ids_off[i] : ids_off[i + 1]],
                    lps[lp_off[i] : lp_off[i + 1]],
                    int(ks[i]),
                    None if fixed_k[i] else ns[n_off[i] : n_off[i + 1]],
                )
                if len(topk_ids) != len(target):
                    raise ValueError(
                        f"{pid} sample {batch.column('sample_idx')[i]}: scores cover "
                        f"{len(topk_ids)} tokens, the target has {len(target)}"
                    )
            student, teacher = prompt(pid)
            yield Example(
                prompt_ids=student,
                target_ids=target.tolist(),
                topk_ids=topk_ids,
                topk_logprobs=topk_lp,
                teacher_prompt_ids=teacher,
            )


def _flat(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets, values) numpy arrays: row i is values[off[i]:off[i + 1]]."""
    offsets = column.offsets.to_numpy()
    return offsets, column.values.to_numpy(zero_copy_only=False)


def train_body(
    writer: StageWriter,
    cfg: TrainConfig,
    *,
    student_path: str,
    examples: Sequence[Any],
    round_: int,
    seed: int,
    dtype: str,
    device: str,
    teacher_path: str | None = None,
) -> dict:
    """Train into the staging directory, in this process or on cfg.distributed's (train.launch:
    a dead process fails the stage as transient; the retry resumes from the newest checkpoint,
    at any process count); then the log table. Checkpoints, the examples file and the launch
    files stay out of the commit."""
    # deferred: the trainer, its examples and model loading pull in torch (start-up time)
    from train.example_file import EXAMPLES_FILE, remove_examples, target_tokens

    spec = LaunchSpec(  # the run, for either way of training
        model=student_path,
        examples=str(writer.dir / EXAMPLES_FILE),
        out_dir=str(writer.dir),
        config=cfg,
        teacher=teacher_path if cfg.teacher_mode == "online" else None,
        tokenizer=student_path,
        seed=seed,
        round_idx=round_,
        cpu=device == "cpu",  # else each process takes a GPU if it sees one (train.distributed)
        dtype=dtype,
        run_dir=str(writer.dir / LAUNCH_DIR),
    )
    progress = functools.partial(_log_step, round_)
    if cfg.distributed.launched:
        rows, summary = run_launched(spec, cfg.distributed, on_progress=progress)
    else:
        rows, summary = _train_here(spec, examples, device, progress)
    add_compute(summary["step_seconds"])  # the optimizer steps: this stage's compute floor
    shutil.rmtree(writer.dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(writer.dir / LAUNCH_DIR, ignore_errors=True)
    for name in ("log.json", RESULT):
        (writer.dir / name).unlink(missing_ok=True)
    remove_examples(writer.dir / EXAMPLES_FILE)  # staging only, like the checkpoints
    writer.write_table("log.parquet", pa.Table.from_pylist(rows), TRAIN_LOG)
    return {
        "examples": len(examples),
        "skipped_steps": summary["skipped_steps"],
        "resumed_from": summary["resumed_from"],
        "target_tokens": target_tokens(examples),
        **{k: v for k, v in summary.items() if k == "rank_peak_rss_mb"},  # launched only
    }


def _log_step(round_: int, step: int, steps: int, loss: float | None) -> None:
    if step % 10 == 0 or step == steps:
        shown = loss if loss is not None else float("nan")
        log.info("round %d train    step %d/%d loss %.4f", round_, step, steps, shown)


def _train_here(
    spec: LaunchSpec, examples: Sequence[Any], device: str, progress: Callable[..., None]
) -> tuple[list[dict], dict]:
    """The spec's run in this process: its log and result (as a launched run's result.json)."""
    # deferred: the trainer and model loading pull in torch (start-up time)
    from train.models import load_model, load_tokenizer
    from train.trainer import result_summary, train

    cfg = spec.config
    dtype = "float32" if cfg.precision == "bf16-mixed" else spec.dtype  # float32 master weights
    result = train(
        load_model(spec.model, dtype=dtype, device=device),
        examples,
        cfg,
        out_dir=spec.out_dir,
        teacher=load_model(spec.teacher, dtype=dtype, device=device) if spec.teacher else None,
        tokenizer=load_tokenizer(spec.model),
        log_fn=lambda row: progress(row["step"], cfg.steps, row["loss"]),
        seed=spec.seed,
        round_idx=spec.round_idx,
    )
    return result.log, result_summary(result)


def run(ctx: Context, rnd: Round) -> StageResult:
    """Train the round's student on its targets; the result is the round's new student
    (``makes_student``: :meth:`tasks.context.Context.record`)."""
    cfg, m, r, student = ctx.cfg.train, ctx.cfg.models, rnd.r, rnd.student
    data = rnd.result(rnd.targets, "train")
    filtered = rnd.result("filter", "train") if rnd.kept_only else None
    scored = rnd.done.get("score")
    online = is_online(ctx.cfg)
    teacher_path = rnd.teacher.path if rnd.teacher else str(ctx.model_path(m.teacher))

    def body(w: Any) -> dict:
        # deferred: pulls in torch (mpd --help imports every stage module, via tasks.registry)
        from train.example_file import EXAMPLES_FILE, stored_examples
        from train.models import load_tokenizer

        rows = training_rows(
            stage_files(ctx.store, data.stage, r),
            decisions=stage_files(ctx.store, "filter", r) if filtered else None,
            scores=stage_files(ctx.store, "score", r) if scored else None,
        )
        instruction = rnd.instruction if online else None
        tokenizer = load_tokenizer(student.path)
        prompts = example_prompts(ctx.problems, tokenizer, teacher_template=instruction)
        examples = stored_examples(w.path(EXAMPLES_FILE), rows, prompts)  # memory-mapped
        return train_body(
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

    return ctx.run(STAGE, rnd, ctx.key(STAGE, rnd), body)


def is_online(cfg: Any) -> bool:
    """The trainer runs the teacher itself (its weights, not stored top-k, shape the loss)."""
    return cfg.train.teacher_mode == "online" and cfg.train.loss != "ce"


def train_reads(recipe: Recipe) -> tuple[str, ...]:
    """The targets; the filter's decisions when only kept rows train; the stored top-k."""
    return (
        recipe.targets,
        *(("filter",) if recipe.kept_only else ()),
        *(("score",) if recipe.scored else ()),
    )


def train_config(cfg: Any, rnd: Round) -> dict[str, Any]:
    """The train section and the seed; an online frozen teacher's "be concise" context."""
    config: dict[str, Any] = {"train": cfg.train, "seed": cfg.seed}
    if rnd.recipe.self_teacher and is_online(cfg):
        config["self_distill.instruction"] = cfg.self_distill.instruction
    return config


STAGE = Stage(
    name="train",
    summary="distil the student toward the teacher on the round's targets (KL or CE)",
    run=run,
    tables=(TRAIN_LOG_TABLE,),
    reads=train_reads,
    config=train_config,
    # its own weights, and the teacher's only where the trainer runs it (an online loss)
    models=lambda cfg: ("student", "teacher") if is_online(cfg) else ("student",),
    runs="every_round",
    makes_student=True,
)
