"""A round's training rows as record batches of the examples file (``train.example_file``).

What goes into the file, and what is checked on the way: the columns (:func:`examples_schema`,
token ids as uint16 when the vocabulary fits, :func:`id_type`), each row's prompts (one batched
tokenizer call per record batch, ``tasks.train.ExamplePrompts``), and the scores checked against
their targets, every row at once, before any training step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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


PromptPairs = list[tuple[list[int], list[int] | None]]  # (student prompt ids, teacher's or None)


def example_batch(
    batches: Sequence[pa.RecordBatch], pids: list[str], pairs: PromptPairs, schema: pa.Schema
) -> pa.RecordBatch:
    """Training rows (problem_id, sample_idx, token_ids [+ the scores' columns]), one or more
    record batches of them, as one record batch of the examples file (``schema``: its ids'
    width), the scores checked against their targets.

    The join's batches are mostly zero-copy slices (runs of kept rows, ``tasks.train_rows._take``):
    written one by one, the file held record batches of ~10 rows, each its own header to read,
    prompt call and checks. Packed, each list column is copied once, narrowed on the way, into
    one buffer (:func:`_packed`): the copy the narrowing made anyway. ``pids`` and ``pairs``:
    the rows' problem ids and prompts, as :func:`prompted` made them."""
    n = len(pids)
    ids = schema.field("prompt_ids").type.value_type
    rows = _Rows(batches, pids)

    columns = {
        "prompt_ids": pa.array([p for p, _ in pairs], pa.list_(ids)),
        "teacher_prompt_ids": pa.array([t for _, t in pairs], pa.list_(ids)),
        "target_ids": _packed(rows, "token_ids", ids),
    }
    if "k" in batches[0].schema.names:
        k = pa.concat_arrays([b.column("k").cast(pa.int32()) for b in batches])
        counts = pa.concat_arrays([b.column("topk_counts").cast(_SMALL) for b in batches])
        _check_scores(rows, k, counts)
        columns["k"], columns["topk_counts"] = k, counts
        columns["topk_ids"] = _packed(rows, "topk_ids", ids)
        columns["topk_logprob_gaps"] = _packed(rows, "topk_logprob_gaps", pa.int16())
    else:
        columns |= {f.name: pa.nulls(n, f.type) for f in schema if f.name not in columns}
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


class _Rows:
    """The input batches of one packed batch, their list columns' per-row lengths, and their
    rows' names for an error message."""

    def __init__(self, batches: Sequence[pa.RecordBatch], pids: list[str]) -> None:
        self.batches, self.pids = batches, pids
        self._lengths: dict[str, np.ndarray] = {}

    def lengths(self, name: str) -> np.ndarray:
        """Every row's length of list column ``name`` (0 for a null list), as int64."""
        if name not in self._lengths:
            self._lengths[name] = np.concatenate(
                [list_lengths(b.column(name)) for b in self.batches]
            )
        return self._lengths[name]

    def name(self, row: int) -> str:
        for b in self.batches:
            if row < b.num_rows:
                return f"{self.pids[row]} sample {b.column('sample_idx')[row]}"
            row -= b.num_rows
        raise IndexError(row)


def _packed(rows: _Rows, name: str, ids: pa.DataType) -> pa.ListArray:
    """A list column of every input batch (lists never null) as one list array of ``ids``: each
    batch's values copied once into one buffer, narrowed on the way. A value ``ids`` cannot
    hold is a ValueError naming its row (a corrupt score, or a vocabulary the tokenizer does
    not describe)."""
    dtype = np.dtype(ids.to_pandas_dtype())
    info = np.iinfo(dtype)
    lengths = rows.lengths(name)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    # from Arrow's memory pool, which keeps freed pages for the next batch: a fresh numpy
    # buffer each batch (tens of MB) was mapped and faulted in page by page, every time
    buffer = pa.allocate_buffer(int(offsets[-1]) * dtype.itemsize)
    values = np.frombuffer(buffer, dtype)
    at, first_row = 0, 0
    for b in rows.batches:
        column = b.column(name)
        got = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        if got.size and got.dtype != dtype and _outside(got, info):
            bad = (got < info.min) | (got > info.max)
            parents = pc.list_parent_indices(column).to_numpy()
            i, value = int(parents[np.argmax(bad)]), int(got[np.argmax(bad)])
            raise ValueError(
                f"{rows.name(first_row + i)}: {name} holds {value}, outside the "
                f"tokenizer's vocabulary (ids {info.min}..{info.max})"
            )
        values[at : at + got.size] = got
        at += got.size
        first_row += b.num_rows
    flat = pa.Array.from_buffers(ids, len(values), [None, buffer])
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def _outside(values: np.ndarray, info: np.iinfo) -> bool:
    """Whether a value lies outside ``info``'s range. Into an unsigned type, one pass: seen as
    unsigned, a negative value is larger than any the type holds (min and max were two passes
    over every top-k id, a fifth of the packing)."""
    if info.min == 0 and values.dtype.kind == "i":
        return int(values.view(f"u{values.itemsize}").max()) > info.max
    return int(values.min()) < info.min or int(values.max()) > info.max


def _check_scores(rows: _Rows, k_col: pa.Array, counts: pa.ListArray) -> None:
    """What ``decode_topk`` would refuse, for every row of a packed batch at once (``k_col``
    and ``counts``: its rows' k and per-position counts): a row without a score, entries that
    are not T x k (or do not match their counts), scores covering another length. The first bad
    row is named."""
    unscored = k_col.is_null().to_numpy(zero_copy_only=False)
    targets = rows.lengths("token_ids")
    ids, gaps = rows.lengths("topk_ids"), rows.lengths("topk_logprob_gaps")
    fixed = counts.is_null().to_numpy(zero_copy_only=False)
    k = np.maximum(k_col.fill_null(1).to_numpy(zero_copy_only=False).astype(np.int64), 1)
    count_lengths = list_lengths(counts)
    bad_count = np.zeros(len(k), dtype=bool)
    count_sum = np.zeros(len(k), dtype=np.int64)
    if not fixed.all():  # per-position counts: their sums, and none outside 1..k
        parents = pc.list_parent_indices(counts).to_numpy()
        values = pc.list_flatten(counts).to_numpy().astype(np.int64)
        count_sum = np.bincount(parents, weights=values, minlength=len(k)).astype(np.int64)
        np.logical_or.at(bad_count, parents, (values < 1) | (values > k[parents]))
    entries = (gaps != ids) | np.where(fixed, ids % k != 0, ids != count_sum)
    covered = np.where(fixed, ids // k, count_lengths)
    bad = unscored | entries | (~fixed & bad_count) | (covered != targets)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    name = rows.name(i)
    if unscored[i]:
        raise ValueError(f"{name}: no score")
    if entries[i]:
        raise ValueError(f"{name}: scores hold {ids[i]} ids and {gaps[i]} logprobs for k={k[i]}")
    if bad_count[i]:
        raise ValueError(f"{name}: a position keeps a count outside 1..k={k[i]}")
    raise ValueError(f"{name}: scores cover {covered[i]} tokens, the target has {targets[i]}")


def list_lengths(column: pa.Array) -> np.ndarray:
    """Per-row list lengths (0 for a null list) as int64: from the offsets where no row is null
    (two numpy steps; Arrow's compute functions cost ~20 us a call, and the join makes several
    per column of each of its small batches)."""
    if column.null_count == 0:
        return np.diff(column.offsets.to_numpy()).astype(np.int64)
    return pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int64)


# A record batch of the file: the join's batches packed up to this many rows or input bytes
# (~330 rows of 1,024 tokens x top-32): few headers to read, a few MB of pages to map per batch.
BATCH_ROWS = 2048
BATCH_BYTES = 64 * 2**20


def grouped(batches: Iterable[pa.RecordBatch]) -> Iterator[list[pa.RecordBatch]]:
    """Consecutive batches, in order, grouped up to BATCH_ROWS rows or BATCH_BYTES (a batch
    larger than that is a group of its own): what one record batch of the file packs."""
    group: list[pa.RecordBatch] = []
    rows = size = 0
    for batch in batches:
        if group and (rows + batch.num_rows > BATCH_ROWS or size + batch.nbytes > BATCH_BYTES):
            yield group
            group, rows, size = [], 0, 0
        group.append(batch)
        rows, size = rows + batch.num_rows, size + batch.nbytes
    if group:
        yield group


def prompted(
    groups: Iterable[list[pa.RecordBatch]], prompts: Prompts
) -> Iterator[tuple[list[pa.RecordBatch], list[str], PromptPairs]]:
    """Each group with its rows' problem ids and prompts (one batched template and tokenizer
    call): made in the read-ahead thread, they no longer wait for the packing and the write (the
    chat template is Python, a quarter of the join's own time at one problem a row)."""
    for group in groups:
        pids = [p for b in group for p in b.column("problem_id").to_pylist()]
        yield group, pids, prompts.many(pids)
