"""Train stage: distil the student toward the teacher on the round's kept targets.

The trainer writes checkpoints into the stage's staging directory, which is
named by the stage key: a killed training stage restarted with the same key
resumes from its last checkpoint; checkpoints are removed before the commit.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np
import pyarrow as pa

from data.schemas import TRAIN_LOG
from data.store import StageWriter
from tasks.common import chat_prompt
from tasks.score import dequantize
from train.config import TrainConfig

log = logging.getLogger("mpd")


def build_examples(
    targets: list[dict],
    scores: dict[tuple[str, int], dict] | None,
    problems: dict[str, dict],
    tokenizer: Any,
    *,
    teacher_template: str | None = None,
) -> list[Any]:
    """Student context (plain problem prompt) + target ids (+ the teacher's stored top-k).

    ``teacher_template`` (self-distillation with an online teacher): the teacher
    reads the problem inside this "be concise" template while the student reads
    the plain problem; both score the same target ids.
    """
    from train.batching import Example

    examples = []
    for t in targets:
        topk_ids = topk_lp = None
        if scores is not None:
            s = scores[(t["problem_id"], t["sample_idx"])]
            shape = (s["num_tokens"], s["k"])
            topk_ids = np.asarray(s["topk_ids"], dtype=np.int64).reshape(shape)
            topk_lp = dequantize(np.asarray(s["topk_logprobs_q"], dtype=np.int16)).reshape(shape)
        question = problems[t["problem_id"]]["prompt"]
        examples.append(
            Example(
                prompt_ids=chat_prompt(tokenizer, question),
                target_ids=list(t["token_ids"]),
                topk_ids=topk_ids,
                topk_logprobs=topk_lp,
                teacher_prompt_ids=None
                if teacher_template is None
                else chat_prompt(tokenizer, teacher_template.format(problem=question)),
            )
        )
    return examples


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
