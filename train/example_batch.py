"""A round's training rows as record batches of the examples file (``train.example_file``).

What goes into the file, and what is checked on the way: the columns (:func:`examples_schema`,
token ids as uint16 when the vocabulary fits, :func:`id_type`), each row's prompts (one batched
tokenizer call per record batch, ``tasks.train.ExamplePrompts``), and the scores checked against
their targets, every row at once, before any training step.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SMALL = pa.list_(pa.int16())
NARROW_VOCAB = 2**16  # a vocabulary up to this size stores its ids as uint16


def examples_schema(ids: pa.DataType) -> pa.Schema:
    """The examples file's columns, its token ids (prompts, targets, top-k) of type ``ids``."""
    return pa.schema(
        [
            pa.field("prompt_ids", pa.list_(ids), nullable=False),
            pa.field("teacher_prompt_ids", pa.list_(ids)),
            pa.field("target_ids", pa.list_(ids), nullable=False),
            pa.field("k", pa.int32()),
            pa.field("topk_ids", pa.list_(ids)),
            pa.field("topk_logprob_gaps", _SMALL),
            pa.field("topk_counts", _SMALL),
        ]
    )


EXAMPLES = examples_schema(pa.int32())
NARROW = examples_schema(pa.uint16())


def id_type(vocab_size: int) -> pa.DataType:
    """uint16 when every id of the vocabulary fits (the world's 805 ids, SmolLM2's 49,152):
    the file is then 2/3 of its int32 size at top-32, and the disk's write bandwidth is what
    bounds the join at scale. int32 otherwise (Qwen3's 151,936)."""
    return pa.uint16() if vocab_size <= NARROW_VOCAB else pa.int32()


class Prompts(Protocol):
    """problem ids -> (student prompt ids, teacher prompt ids or None) each, and the size of
    the vocabulary those ids (and the targets') come from (``tasks.train.ExamplePrompts``)."""

    vocab_size: int

    def many(self, pids: list[str]) -> list[tuple[list[int], list[int] | None]]: ...


def example_batch(
    batch: pa.RecordBatch, prompts: Prompts, schema: pa.Schema = EXAMPLES
) -> pa.RecordBatch:
    """One batch of training rows (problem_id, sample_idx, token_ids [+ the scores' columns])
    as a batch of the examples file (``schema``: its ids' width), its scores checked against
    its targets."""
    pids = batch.column("problem_id").to_pylist()
    pairs = prompts.many(pids)
    n = batch.num_rows
    ids = schema.field("prompt_ids").type.value_type

    def narrowed(name: str) -> pa.Array:
        return _narrowed(batch, name, ids, pids)

    columns = {
        "prompt_ids": pa.array([p for p, _ in pairs], pa.list_(ids)),
        "teacher_prompt_ids": pa.array([t for _, t in pairs], pa.list_(ids)),
        "target_ids": narrowed("token_ids"),
    }
    if "k" in batch.schema.names:
        _check_scores(batch, pids)
        columns["k"] = batch.column("k").cast(pa.int32())
        columns["topk_ids"] = narrowed("topk_ids")
        columns["topk_logprob_gaps"] = batch.column("topk_logprob_gaps").cast(_SMALL)
        columns["topk_counts"] = batch.column("topk_counts").cast(_SMALL)
    else:
        columns |= {f.name: pa.nulls(n, f.type) for f in schema if f.name not in columns}
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


def _narrowed(batch: pa.RecordBatch, name: str, ids: pa.DataType, pids: list[str]) -> pa.Array:
    """An id column as lists of ``ids``; an id a uint16 cannot hold is a ValueError naming its
    row (a corrupt score, or a vocabulary the tokenizer does not describe)."""
    column = batch.column(name)
    if ids != pa.uint16():
        return column.cast(pa.list_(ids))
    values = pc.list_flatten(column)
    low, high = (pc.min_max(values)[m].as_py() for m in ("min", "max"))
    if low is not None and (low < 0 or high >= NARROW_VOCAB):
        bad = pc.or_(pc.less(values, 0), pc.greater_equal(values, NARROW_VOCAB))
        i = pc.list_parent_indices(column).filter(bad)[0].as_py()
        value = values.filter(bad)[0].as_py()
        raise ValueError(
            f"{pids[i]} sample {batch.column('sample_idx')[i]}: {name} holds {value}, "
            f"outside the tokenizer's vocabulary (ids 0..{NARROW_VOCAB - 1})"
        )
    return column.cast(pa.list_(ids), safe=False)


def _check_scores(batch: pa.RecordBatch, pids: list[str]) -> None:
    """What ``decode_topk`` would refuse, for every row at once: a row without a score, entries
    that are not T x k (or do not match their counts), scores covering another length. The
    first bad row is named."""
    k_col = batch.column("k")
    unscored = k_col.is_null().to_numpy(zero_copy_only=False)
    targets = list_lengths(batch.column("token_ids"))
    ids, gaps = (
        list_lengths(batch.column("topk_ids")),
        list_lengths(batch.column("topk_logprob_gaps")),
    )
    counts = batch.column("topk_counts")
    fixed = counts.is_null().to_numpy(zero_copy_only=False)
    k = np.maximum(k_col.fill_null(1).to_numpy(zero_copy_only=False).astype(np.int64), 1)
    parents = pc.list_parent_indices(counts).to_numpy()
    values = pc.list_flatten(counts).to_numpy().astype(np.int64)
    count_sum = np.bincount(parents, weights=values, minlength=len(pids)).astype(np.int64)
    bad_count = np.zeros(len(pids), dtype=bool)
    np.logical_or.at(bad_count, parents, (values < 1) | (values > k[parents]))
    entries = (gaps != ids) | np.where(fixed, ids % k != 0, ids != count_sum)
    covered = np.where(fixed, ids // k, list_lengths(counts))
    bad = unscored | entries | (~fixed & bad_count) | (covered != targets)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    name = f"{pids[i]} sample {batch.column('sample_idx')[i]}"
    if unscored[i]:
        raise ValueError(f"{name}: no score")
    if entries[i]:
        raise ValueError(f"{name}: scores hold {ids[i]} ids and {gaps[i]} logprobs for k={k[i]}")
    if bad_count[i]:
        raise ValueError(f"{name}: a position keeps a count outside 1..k={k[i]}")
    raise ValueError(f"{name}: scores cover {covered[i]} tokens, the target has {targets[i]}")


def list_lengths(column: pa.Array) -> np.ndarray:
    """Per-row list lengths (0 for a null list) as int64."""
    return pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int64)
