"""Train stage: distil the student toward the teacher on the round's kept targets.

The trainer writes checkpoints into the stage's staging directory, which is
named by the stage key: a killed training stage restarted with the same key
resumes from its last checkpoint; checkpoints are removed before the commit.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data.schemas import TRAIN_LOG
from data.store import StageWriter
from tasks.common import chat_prompt
from tasks.score import dequantize
from train.config import TrainConfig

log = logging.getLogger("mpd")
MEMORY_LIMIT = "1GB"  # DuckDB's working memory for the train stage's join; more spills to disk


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
    (``scores``) beside each. DuckDB joins on disk and hands batches over: a round's tables are
    never whole Python lists (100k kept traces x 1k tokens x top-32 would be billions of objects).
    """
    import duckdb

    def files(paths: list[Path]) -> str:
        return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"

    columns = "t.problem_id, t.sample_idx, t.token_ids"
    joins, where = "", ""
    if scores is not None:
        columns += ", s.num_tokens, s.k, s.topk_ids, s.topk_logprobs_q"
        joins = (
            f"LEFT JOIN read_parquet({files(scores)}) s "
            "ON s.problem_id = t.problem_id AND s.sample_idx = t.sample_idx"
        )
    if decisions is not None:
        where = (
            f"WHERE EXISTS (SELECT 1 FROM read_parquet({files(decisions)}) d WHERE d.kept "
            "AND d.problem_id = t.problem_id AND d.sample_idx = t.sample_idx)"
        )
    query = (
        f"SELECT {columns} FROM read_parquet({files(targets)}, filename = true, "
        f"file_row_number = true) t {joins} {where} "
        f"ORDER BY list_position({files(targets)}, t.filename), t.file_row_number"
    )
    import tempfile

    # The ORDER BY keeps the committed order (the trainer's visiting order depends on it); DuckDB
    # sorts out of core, spilling past memory_limit, so a round larger than memory streams.
    with tempfile.TemporaryDirectory(prefix="mpd-train-rows-") as spill:
        con = duckdb.connect(config={"memory_limit": MEMORY_LIMIT, "temp_directory": spill})
        try:
            yield from con.sql(query).to_arrow_reader(batch_rows)
        finally:
            con.close()


def build_examples(
    batches: Iterable[pa.RecordBatch],
    problems: dict[str, dict],
    tokenizer: Any,
    *,
    teacher_template: str | None = None,
) -> Iterator[Any]:
    """Student context (plain problem prompt) + target ids (+ the teacher's stored top-k), one
    Example per row of :func:`training_rows`' batches; arrays are cut from each batch's buffers.

    ``teacher_template`` (self-distillation with an online teacher): the teacher
    reads the problem inside this "be concise" template while the student reads
    the plain problem; both score the same target ids.
    """
    from train.batching import Example

    prompts: dict[str, tuple[list[int], list[int] | None]] = {}

    def prompt(pid: str) -> tuple[list[int], list[int] | None]:
        if pid not in prompts:
            question = problems[pid]["prompt"]
            teacher = None
            if teacher_template is not None:
                teacher = chat_prompt(tokenizer, teacher_template.format(problem=question))
            prompts[pid] = (chat_prompt(tokenizer, question), teacher)
        return prompts[pid]

    for batch in batches:
        pids = batch.column("problem_id").to_pylist()
        tok_off, tok = _flat(batch.column("token_ids"))
        scored = "k" in batch.schema.names
        if scored:
            ks = batch.column("k").to_numpy(zero_copy_only=False)
            unscored = batch.column("k").is_null().to_numpy(zero_copy_only=False)
            ids_off, ids = _flat(batch.column("topk_ids"))
            lp_off, lps = _flat(batch.column("topk_logprobs_q"))
        for i, pid in enumerate(pids):
            target = tok[tok_off[i] : tok_off[i + 1]]
            topk_ids = topk_lp = None
            if scored:
                if unscored[i]:
                    raise ValueError(f"{pid} sample {batch.column('sample_idx')[i]}: no score")
                shape = (len(target), int(ks[i]))
                topk_ids = ids[ids_off[i] : ids_off[i + 1]].astype(np.int64).reshape(shape)
                topk_lp = dequantize(lps[lp_off[i] : lp_off[i + 1]]).reshape(shape)
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
    examples: list[Any],
    round_: int,
    seed: int,
    dtype: str,
    device: str,
    teacher_path: str | None = None,
) -> dict:
    from train.models import load_model, load_tokenizer
    from train.trainer import train

    model = load_model(student_path, dtype=dtype, device=device)
    teacher = None
    if cfg.teacher_mode == "online" and teacher_path is not None:
        teacher = load_model(teacher_path, dtype=dtype, device=device)
    rows: list[dict] = []

    def log_row(row: dict) -> None:
        rows.append(row)
        if row["step"] % 10 == 0 or row["step"] == cfg.steps:
            log.info(
                "round %d train    step %d/%d loss %.4f",
                round_,
                row["step"],
                cfg.steps,
                row["loss"] if row["loss"] is not None else float("nan"),
            )

    result = train(
        model,
        examples,
        cfg,
        out_dir=writer.dir,
        teacher=teacher,
        tokenizer=load_tokenizer(student_path),
        log_fn=log_row,
        seed=seed,
        round_idx=round_,
    )
    shutil.rmtree(writer.dir / "checkpoints", ignore_errors=True)
    writer.write_table("log.parquet", pa.Table.from_pylist(result.log), TRAIN_LOG)
    return {
        "examples": len(examples),
        "skipped_steps": result.skipped_steps,
        "resumed_from": result.resumed_from,
        "target_tokens": int(sum(len(e.target_ids) for e in examples)),
    }
