"""Plumbing every stage shares: cached execution on the stage store, engines, tables.

A stage body is a plain function ``compute(writer) -> extra`` that writes its
output into a :class:`StageWriter`; :func:`run_stage` turns it into a cached,
resumable stage run. Tasks hand each other :class:`StageResult` (a key and a
path), never datasets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import UserError
from data.store import StageStore, StageWriter
from engines.config import EngineConfig

log = logging.getLogger("mpd")


@dataclass(frozen=True)
class StageResult:
    stage: str
    round: int
    key: str
    rows: int
    cached: bool
    seconds: float
    path: str


def run_stage(
    store: StageStore,
    stage: str,
    round_: int,
    key: str,
    compute: Callable[[StageWriter], dict[str, Any] | None],
    *,
    code: str = "",
) -> StageResult:
    """Reuse a valid committed output with this key, or compute and commit it."""
    if man := store.lookup(stage, round_, key):
        log.info("round %d %-8s cached (%d rows, key %s)", round_, stage, man.rows, key[:12])
        return StageResult(
            stage, round_, key, man.rows, True, 0.0, str(store.stage_dir(stage, round_))
        )
    started = time.monotonic()
    writer = store.writer(stage, round_, key, code_version=code)
    if writer.resumed:
        log.info(
            "round %d %-8s resuming: %d finished shard(s) reused",
            round_,
            stage,
            len(writer.resumed),
        )
    extra = compute(writer) or {}
    man = writer.commit(extra)
    seconds = time.monotonic() - started
    log.info(
        "round %d %-8s done: %d rows in %.1fs (key %s)", round_, stage, man.rows, seconds, key[:12]
    )
    return StageResult(
        stage, round_, key, man.rows, False, seconds, str(store.stage_dir(stage, round_))
    )


def stage_files(store: StageStore, stage: str, round_: int, name: str | None = None) -> list[Path]:
    """The committed Parquet files of a stage run, in shard order (all, or one named file)."""
    man = store.manifest(stage, round_)
    if man is None:
        raise FileNotFoundError(f"{stage} round {round_} is not committed")
    base = store.stage_dir(stage, round_)
    files = [f.path for f in man.files if f.path.endswith(".parquet")]
    return [base / f for f in sorted(files) if name is None or f == name]


def read_stage(store: StageStore, stage: str, round_: int, name: str | None = None) -> pa.Table:
    """The committed Parquet of a stage run (all shards, or one named file)."""
    return pa.concat_tables([pq.read_table(f) for f in stage_files(store, stage, round_, name)])


def shards(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


_ENGINES: dict[tuple[str, str, str], Any] = {}
_ROLES: dict[str, tuple[str, str, str]] = {}  # role -> the key of the engine serving it now


def engine_for(
    cfg: EngineConfig,
    model_path: Path | str,
    *,
    dtype: str,
    device: str,
    journal_dir: Path | str | None = None,
    role: str | None = None,
) -> Any:
    """An engine over ``model_path``, loaded once per process and reused across shards.

    ``journal_dir`` (openai engine only) keeps each call's finished requests, so
    a restarted stage resends only the rest (see ``engines/journal.py``).
    ``role`` (student, teacher, rewriter): when a role moves to another model
    (each round's new student), the engine it used is closed unless another
    role still uses it, so a campaign holds one engine per role, not one per
    round (a vLLM engine per round would fill the GPU by round 2).
    """
    key = (cfg.kind, str(model_path), cfg.model_dump_json() + str(journal_dir))
    if role is not None:
        old = _ROLES.get(role)
        _ROLES[role] = key
        if old is not None and old != key and old not in _ROLES.values() and old in _ENGINES:
            _ENGINES.pop(old).close()
    if key not in _ENGINES:
        if cfg.kind == "vllm":
            from engines.vllm import load_vllm_engine

            _ENGINES[key] = load_vllm_engine(model_path, cfg, dtype=cfg.dtype or dtype)
        elif cfg.kind == "openai":
            from engines.openai import load_openai_engine

            _ENGINES[key] = load_openai_engine(model_path, cfg, journal_dir=journal_dir)
        else:
            from engines.hf import load_hf_engine

            _ENGINES[key] = load_hf_engine(
                model_path,
                dtype=dtype,
                device=device,
                batch_size=cfg.batch_size,
                max_batch_tokens=cfg.max_batch_tokens,
            )
    return _ENGINES[key]


def close_engines() -> None:
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()
    _ROLES.clear()


def shard_seed(seed: int, round_: int, shard: int) -> int:
    """A per-shard seed: a resumed shard regenerates exactly what the killed one would have."""
    import hashlib

    return int(hashlib.sha256(f"{seed}-{round_}-{shard}".encode()).hexdigest()[:8], 16)


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    """The student's context for ``question``: the tokenizer's own chat template.

    Real checkpoints (Qwen3) and the built-in tokenizer both carry a template;
    a tokenizer without one falls back to the contract in ``data.answers``.
    """
    from data.answers import format_prompt

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = format_prompt(question)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_traces(
    engine: Any,
    prompts: list[list[int]],
    records: list[dict],
    *,
    params: Any,
    round_: int,
    model: str,
    grader: Callable[[str | None, str], bool],
    extra: Callable[[dict, dict, int], dict] | None = None,
) -> list[dict]:
    """Generate and grade; one trace row per (record, sample). ``extra`` adds columns."""
    from data.traces import trace_row

    close = engine.tokenizer.convert_tokens_to_ids("</think>")
    rows = []
    for rec, pids, outs in zip(records, prompts, engine.generate(prompts, params), strict=True):
        for c in outs:
            row = trace_row(
                round_=round_,
                problem_id=rec["problem_id"],
                sample_idx=c.sample_idx,
                text=c.text,
                token_ids=c.token_ids,
                finish_reason=c.finish_reason,
                prompt_tokens=len(pids),
                gold=rec["answer"],
                think_close_id=close,
                model=model,
                grader=grader,
            )
            rows.append({**row, **(extra(rec, row, c.sample_idx) if extra else {})})
    return rows


def context_limit(engine: Any) -> int | None:
    """The longest sequence the engine's model takes, where the engine can tell (None: unknown)."""
    limit = getattr(engine, "max_context", None)
    config = getattr(getattr(engine, "model", None), "config", None)
    return limit or getattr(config, "max_position_embeddings", None)


def check_context(engine: Any, records: list[dict], prompts: list[list[int]]) -> None:
    """Refuse problems whose prompt alone fills the model's context, before generating any.

    A user's problem file can hold a prompt longer than the model reads; the model would then
    generate from a truncated or out-of-range context. One line names how many and the first.
    """
    limit = context_limit(engine)
    if not limit:
        return
    long = [
        (r["problem_id"], len(p)) for r, p in zip(records, prompts, strict=True) if len(p) >= limit
    ]
    if long:
        pid, n = long[0]
        raise UserError(
            f"{len(long)} problem prompt(s) do not fit the model's context of {limit} tokens "
            f"(first: {pid}, {n} tokens); shorten them or leave them out of the problem file"
        )


def generate_stage(
    writer: StageWriter,
    engine: Any,
    records: list[dict],
    prompts: list[list[int]],
    params_for: Callable[[int], Any],
    schema: pa.Schema,
    *,
    stage: str,
    shard_size: int,
    round_: int,
    model: str,
    grader: Callable[[str | None, str], bool],
    extra: Callable[[dict, dict, int], dict] | None = None,
    workers: int = 1,
) -> int:
    """Generate and grade ``records`` shard by shard (``params_for(i)``: shard i's sampling).

    The sample and evaluate stages differ only in their problems, parameters
    and extra columns; the resumable, Prefect-visible shard loop is this one.
    """
    from tasks.shards import run_shards

    check_context(engine, records, prompts)

    def make_rows(i: int, part: range) -> list[dict]:
        return generate_traces(
            engine,
            [prompts[j] for j in part],
            [records[j] for j in part],
            params=params_for(i),
            round_=round_,
            model=model,
            grader=grader,
            extra=extra,
        )

    return run_shards(
        writer,
        len(records),
        shard_size,
        make_rows,
        schema,
        stage=stage,
        round_=round_,
        workers=workers,
    )
