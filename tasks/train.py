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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.readahead import prefetched
from data.schemas import SCORES, TRAIN_LOG, decode_topk
from data.stage_writer import StageWriter
from data.tables import TRAIN_LOG as TRAIN_LOG_TABLE
from tasks.common import StageResult, add_compute, stage_files
from tasks.context import Context, Recipe, Round
from tasks.generation import chat_prompts
from tasks.stage import Stage
from tasks.stream import key_positions
from train.config import TrainConfig
from train.launch import LAUNCH_DIR, RESULT, LaunchSpec, run_launched

log = logging.getLogger("mpd")


def training_rows(
    targets: list[Path],
    *,
    decisions: list[Path] | None = None,
    scores: list[Path] | None = None,
    batch_rows: int = 2048,
) -> Iterator[pa.RecordBatch]:
    """The rows a round trains on, joined in DuckDB and streamed as Arrow record batches.

    The targets (a rewrite, sample, truncate or solve stage's files) in their committed order,
    only those the filter kept (``decisions``' ``kept`` rows), with the teacher's stored top-k
    (``scores``) beside each. A round's tables are never whole Python lists (100k kept traces x
    1k tokens x top-32 would be billions of objects), and never whole in memory:

    1. DuckDB joins the *keys* (ids, file and row numbers; Parquet's column projection reads
       nothing else) and orders them by the targets' committed order: four integers a row.
    2. The payloads (token ids, top-k ids and logprobs) are taken row by row from one target
       file and the score files it needs, file after file. The score stage writes its rows in
       the targets' order, so each score file is read about once.
    """
    keys = key_positions(targets, scores, decisions)
    yield from _payload_batches(keys, targets, scores, batch_rows)


def _payload_batches(
    keys: pa.Table, targets: list[Path], scores: list[Path] | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Step 2 of :func:`training_rows`: the keys' rows, with their columns, in the keys' order.

    The files are read in the order they are used (a target file, then each score file its rows
    move on to), the next ones decoded on other threads meanwhile (``data.readahead.prefetched``)."""
    tf = keys.column("tf").to_numpy()
    tr = keys.column("tr").to_numpy()
    plan = [(int(f), np.flatnonzero(tf == f)) for f in np.unique(tf)]  # committed order
    files = prefetched(_loads(plan, keys, targets, scores))
    current = -1  # the score file in use
    for _, rows in plan:  # each target file, its rows
        part = _take(next(files), tr[rows])
        if scores is not None:
            sf = keys.column("sf").take(pa.array(rows))
            if sf.null_count:
                first = int(np.flatnonzero(sf.is_null().to_numpy(zero_copy_only=False))[0])
                pid, idx = part.column("problem_id")[first], part.column("sample_idx")[first]
                raise ValueError(f"{pid} sample {idx}: no score")
            sf_np = sf.to_numpy()
            sr_np = keys.column("sr").to_numpy()[rows]
            pieces = []
            for g in _runs(sf_np):  # consecutive rows from the same score file
                if int(sf_np[g[0]]) != current:
                    current, table = int(sf_np[g[0]]), next(files)
                pieces.append(_take(table, sr_np[g]))
            payload = pa.concat_tables(pieces)
            for name in SCORE_COLUMNS:
                part = part.append_column(name, payload.column(name))
        yield from part.to_batches(max_chunksize=batch_rows)


def _loads(
    plan: list[tuple[int, np.ndarray]],
    keys: pa.Table,
    targets: list[Path],
    scores: list[Path] | None,
) -> Iterator[Callable[[], pa.Table]]:
    """The file reads :func:`_payload_batches` makes, in its order: each target file, then
    each score file its rows switch to (one in use at a time). A target file whose rows lack a
    score ends the list: it is refused when its turn comes, and nothing after it is read."""
    current = -1
    for f, rows in plan:
        yield functools.partial(pq.read_table, targets[f], columns=TARGET_COLUMNS)
        if scores is None:
            continue
        sf = keys.column("sf").take(pa.array(rows))
        if sf.null_count:
            return
        for file in sf.to_numpy()[np.flatnonzero(np.diff(sf.to_numpy(), prepend=-1))]:
            if int(file) != current:
                current = int(file)
                yield functools.partial(_score_columns, scores[current])


TARGET_COLUMNS = ["problem_id", "sample_idx", "token_ids"]
SCORE_COLUMNS = ["num_tokens", "k", "topk_ids", "topk_logprob_gaps", "topk_counts"]


def _score_columns(path: Path) -> pa.Table:
    """The columns training reads from a scores file; one written before ``topk_counts``
    existed kept all k at every position (its counts are null)."""
    names = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in SCORE_COLUMNS if c in names])
    if "topk_counts" not in names:
        counts = pa.nulls(table.num_rows, SCORES.field("topk_counts").type)
        table = table.append_column("topk_counts", counts)
    return table.select(SCORE_COLUMNS).cast(pa.schema([SCORES.field(c) for c in SCORE_COLUMNS]))


def _take(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)``, but runs of consecutive rows as zero-copy slices: the kept rows of
    a file are mostly such runs, and copying ~0.2 MB of top-k a row was the join's main cost."""
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    if len(starts) + 1 > len(rows) // 4:  # scattered: one copy is cheaper than many slices
        return table.take(pa.array(rows))
    bounds = zip(np.concatenate([[0], starts]), np.concatenate([starts, [len(rows)]]), strict=True)
    return pa.concat_tables([table.slice(int(rows[a]), int(b - a)) for a, b in bounds])


def _runs(values: np.ndarray) -> list[np.ndarray]:
    """Index groups of equal consecutive values: [0,0,1,1,0] -> [[0,1],[2,3],[4]]."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    return np.split(np.arange(len(values)), cuts)


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
