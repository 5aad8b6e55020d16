"""A round's training examples, written once as an Arrow IPC file and read memory-mapped.

A real round is 10⁴–10⁶ kept traces of 1–8k tokens with top-32 teacher scores per token: tens
of GB as Python objects. So the train stage never holds its examples as a whole. It writes them
once, a record batch at a time as the DuckDB join streams them (``tasks/train.py``), into one
uncompressed Arrow IPC file in its staging directory::

    prompt_ids          list<int32>  the student's chat prompt
    teacher_prompt_ids  list<int32>  the online teacher's own prompt (null: it reads prompt_ids)
    target_ids          list<int32>  the completion, its EOS included
    k                   int32        top-k size (null: no stored scores, CE or online teacher)
    topk_ids            list<int32>  the scores' encoding, as the score stage stores it:
    topk_logprob_gaps   list<int16>  rank-order gaps (data.schemas.decode_topk)
    topk_counts         list<int16>  candidates kept per position (null: all k)

and reads it memory-mapped (``mmap``, read-only): every column of a record batch is a numpy view
of the map. The per-row lengths (prompt, teacher prompt, target, k: a few integers a row, what
the batch plan sorts by) are written beside it (``examples.lengths.arrow``) and read whole, so
opening touches none of the big file. :class:`ExampleView` is the ``Sequence[Example]`` the
trainer indexes; an Example is cut from the buffers when its micro-batch is collated (top-k
decoded then, for that example only), and the pages it read are unmapped right after
(MADV_DONTNEED; they stay in the page cache): what the trainer holds is the model, the lengths
and the current micro-batch, whatever the round's size. The order is the trainer's
``BatchPlan``: a pure function of (seed, step, lengths), so the same file gives the same
batches, before a kill -9 and after.

Why not the ``datasets`` library's Arrow-backed Dataset: it maps the same format (as an IPC
stream), but a row read through it is formatted per call; random reads of decoded examples
(1,024 tokens x top-32) measured 3,792/s here against 2,087/s for ``datasets``' numpy format
and 731/s for its Python lists (docs/floors.md).

Both files are written to temporary names and renamed, fsynced, the examples file last: a
killed stage finds either a complete pair, which it reuses (same stage key, same staging
directory, same rows), or writes them again.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.diskfull import naming
from data.fsutil import fsync_dir, removed_on_failure
from data.schemas import decode_topk
from train.batching import Example

log = logging.getLogger("mpd")

EXAMPLES_FILE = "examples.arrow"
_IDS = pa.list_(pa.int32())
_SMALL = pa.list_(pa.int16())
EXAMPLES = pa.schema(
    [
        pa.field("prompt_ids", _IDS, nullable=False),
        pa.field("teacher_prompt_ids", _IDS),
        pa.field("target_ids", _IDS, nullable=False),
        pa.field("k", pa.int32()),
        pa.field("topk_ids", _IDS),
        pa.field("topk_logprob_gaps", _SMALL),
        pa.field("topk_counts", _SMALL),
    ]
)

# problem_id -> (student prompt ids, teacher prompt ids or None)
Prompts = Callable[[str], tuple[list[int], list[int] | None]]


def stored_examples(path: Path, rows: Iterable[pa.RecordBatch], prompts: Prompts) -> ExampleView:
    """The examples file at ``path``: the complete one a killed run left, else written from
    ``rows`` (``tasks.train.training_rows``' batches; not iterated when the file is reused)."""
    if path.is_file():
        try:
            view = open_examples(path)
        except (pa.ArrowInvalid, OSError) as exc:  # not ours to trust: write it again
            log.warning("%s unreadable (%s): writing it again", path, exc)
        else:
            log.info("reusing %s (%d examples)", path, len(view))
            return view
    write_examples(path, rows, prompts)
    return open_examples(path)


def lengths_path(path: Path) -> Path:
    """The examples file's per-row lengths, beside it (see :func:`write_examples`)."""
    return path.with_name(f"{path.stem}.lengths{path.suffix}")


def remove_examples(path: Path) -> None:
    path.unlink(missing_ok=True)
    lengths_path(path).unlink(missing_ok=True)


def write_examples(path: Path, rows: Iterable[pa.RecordBatch], prompts: Prompts) -> int:
    """Write the examples of ``rows`` to ``path`` atomically, a record batch at a time; returns
    the row count. A row without a score or whose scores do not cover its target is a
    ValueError naming it (before any training step, as when the examples were a list).

    Each row's lengths (and its record batch) go to a small file beside it, read whole when the
    examples are opened: opening then touches none of the big file's pages (each record batch's
    header and offsets would map ~64 KB of it, fault-around, per batch: RSS growing with the
    round). The examples file is renamed into place last: it is the commit point."""
    remove_examples(path)
    tmp, tmp_lengths = path.with_name(f".{path.name}.tmp"), lengths_path(path).with_suffix(".tmp")
    parts: list[pa.RecordBatch] = []
    with naming(path), removed_on_failure(tmp), removed_on_failure(tmp_lengths):
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, EXAMPLES) as out:
            for batch in rows:
                examples = example_batch(batch, prompts)
                out.write_batch(examples)
                parts.append(_row_lengths(examples, len(parts)))
        _fsync(tmp)
        lengths = pa.Table.from_batches(parts, schema=LENGTHS)
        with pa.OSFile(str(tmp_lengths), "wb") as sink, pa.ipc.new_file(sink, LENGTHS) as out:
            out.write_table(lengths)
        _fsync(tmp_lengths)
        tmp_lengths.replace(lengths_path(path))
        tmp.replace(path)
    fsync_dir(path.parent)
    return lengths.num_rows


LENGTHS = pa.schema(
    [
        pa.field("batch", pa.int32(), nullable=False),  # its record batch in the examples file
        pa.field("prompt", pa.int32(), nullable=False),
        pa.field("teacher_prompt", pa.int32(), nullable=False),  # 0: none
        pa.field("target", pa.int32(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),  # 0: no stored scores
        pa.field("counts", pa.bool_(), nullable=False),  # per-position counts stored
    ]
)


def _row_lengths(batch: pa.RecordBatch, index: int) -> pa.RecordBatch:
    def length(name: str) -> np.ndarray:
        return _lengths(batch.column(name)).astype(np.int32)

    columns = [
        np.full(batch.num_rows, index, np.int32),
        length("prompt_ids"),
        length("teacher_prompt_ids"),
        length("target_ids"),
        batch.column("k").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32),
        batch.column("topk_counts").is_valid().to_numpy(zero_copy_only=False),
    ]
    return pa.RecordBatch.from_arrays([pa.array(c) for c in columns], schema=LENGTHS)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def example_batch(batch: pa.RecordBatch, prompts: Prompts) -> pa.RecordBatch:
    """One batch of training rows (problem_id, sample_idx, token_ids [+ the scores' columns])
    as a batch of the examples file, its scores checked against its targets."""
    pids = batch.column("problem_id").to_pylist()
    pairs = [prompts(pid) for pid in pids]
    n = batch.num_rows
    columns = {
        "prompt_ids": pa.array([p for p, _ in pairs], _IDS),
        "teacher_prompt_ids": pa.array([t for _, t in pairs], _IDS),
        "target_ids": batch.column("token_ids").cast(_IDS),
    }
    if "k" in batch.schema.names:
        _check_scores(batch, pids)
        columns["k"] = batch.column("k").cast(pa.int32())
        columns["topk_ids"] = batch.column("topk_ids").cast(_IDS)
        columns["topk_logprob_gaps"] = batch.column("topk_logprob_gaps").cast(_SMALL)
        columns["topk_counts"] = batch.column("topk_counts").cast(_SMALL)
    else:
        columns |= {f.name: pa.nulls(n, f.type) for f in EXAMPLES if f.name not in columns}
    return pa.RecordBatch.from_arrays([columns[f.name] for f in EXAMPLES], schema=EXAMPLES)


def _check_scores(batch: pa.RecordBatch, pids: list[str]) -> None:
    """What ``decode_topk`` would refuse, for every row at once: a row without a score, entries
    that are not T x k (or do not match their counts), scores covering another length. The
    first bad row is named."""
    k_col = batch.column("k")
    unscored = k_col.is_null().to_numpy(zero_copy_only=False)
    targets = _lengths(batch.column("token_ids"))
    ids, gaps = _lengths(batch.column("topk_ids")), _lengths(batch.column("topk_logprob_gaps"))
    counts = batch.column("topk_counts")
    fixed = counts.is_null().to_numpy(zero_copy_only=False)
    k = np.maximum(k_col.fill_null(1).to_numpy(zero_copy_only=False).astype(np.int64), 1)
    parents = pc.list_parent_indices(counts).to_numpy()
    values = pc.list_flatten(counts).to_numpy().astype(np.int64)
    count_sum = np.bincount(parents, weights=values, minlength=len(pids)).astype(np.int64)
    bad_count = np.zeros(len(pids), dtype=bool)
    np.logical_or.at(bad_count, parents, (values < 1) | (values > k[parents]))
    entries = (gaps != ids) | np.where(fixed, ids % k != 0, ids != count_sum)
    covered = np.where(fixed, ids // k, _lengths(counts))
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


def _lengths(column: pa.Array) -> np.ndarray:
    """Per-row list lengths (0 for a null list) as int64."""
    return pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int64)


def open_examples(path: Path) -> ExampleView:
    """Every example of the file, in file order, uncut."""
    data = _Mapped(path)
    return ExampleView(data, np.arange(data.rows), data.target_lengths.copy())


class _Mapped:
    """The examples file memory-mapped, and its rows' lengths (read whole: a few integers a row).

    A record batch's columns become numpy views of the map when a row of it is first read
    (its header is read then); the last few batches' views are kept."""

    CACHED_BATCHES = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            self.map = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        self.reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self.map)))
        if not self.reader.schema.equals(EXAMPLES):
            raise pa.ArrowInvalid(f"{path} is not an examples file: {self.reader.schema}")
        with pa.OSFile(str(lengths_path(path))) as source:  # read into memory, not mapped
            lengths = pa.ipc.open_file(source).read_all()
        if not lengths.schema.equals(LENGTHS):
            raise pa.ArrowInvalid(f"{lengths_path(path)} does not hold an examples file's lengths")
        cols = {name: lengths.column(name).to_numpy() for name in LENGTHS.names}
        self.rows = lengths.num_rows
        self.batch_of = cols["batch"]
        sizes = np.bincount(self.batch_of, minlength=self.reader.num_record_batches)
        if len(sizes) != self.reader.num_record_batches:
            raise pa.ArrowInvalid(f"{lengths_path(path)} names batches {path} does not hold")
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.prompt_lengths = cols["prompt"].astype(np.int64)
        self.teacher_lengths = cols["teacher_prompt"].astype(np.int64)
        self.target_lengths = cols["target"].astype(np.int64)
        self.ks = cols["k"].astype(np.int64)
        self.counts = cols["counts"]
        self._batch = functools.lru_cache(maxsize=self.CACHED_BATCHES)(self._load)

    def _load(self, b: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        batch = self.reader.get_batch(b)
        if batch.num_rows != self.sizes[b]:
            raise pa.ArrowInvalid(f"{self.path}: batch {b} does not match its lengths")
        return {name: _view(batch.column(name)) for name in EXAMPLES.names if name != "k"}

    def example(self, row: int, cut: int) -> Example:
        """Row ``row`` of the file, its target (and top-k) cut to ``cut`` tokens."""
        b = int(self.batch_of[row])
        i, cols = row - int(self.starts[b]), self._batch(b)
        prompt = _row(cols["prompt_ids"], i).tolist()
        teacher = _row(cols["teacher_prompt_ids"], i).tolist() or None
        target = _row(cols["target_ids"], i)[:cut].tolist()
        k = int(self.ks[row])
        if k == 0:
            self.release()
            return Example(prompt, target, teacher_prompt_ids=teacher)
        if self.counts[row]:
            counts = _row(cols["topk_counts"], i)[:cut]
            entries = int(counts.sum())
        else:
            counts, entries = None, cut * k
        ids_off, ids = cols["topk_ids"]
        gaps_off, gaps = cols["topk_logprob_gaps"]
        start, g = int(ids_off[i]), int(gaps_off[i])
        topk_ids, topk_lp = decode_topk(
            ids[start : start + entries], gaps[g : g + entries], k, counts
        )
        self.release()
        return Example(prompt, target, topk_ids, topk_lp, teacher)

    def release(self) -> None:
        """Unmap the pages read so far (MADV_DONTNEED; they stay in the page cache).

        The Example owns copies (lists, decoded arrays), so nothing points into them. Without
        this, every page a step touched would stay mapped, and the kernel maps whole page-cache
        folios around a fault (up to MBs for a 200 KB row): RSS growing with the rows read."""
        self.map.madvise(mmap.MADV_DONTNEED)


def _view(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets, values) numpy views of its buffers."""
    return column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False)


def _row(view: tuple[np.ndarray, np.ndarray], i: int) -> np.ndarray:
    offsets, values = view
    return values[offsets[i] : offsets[i + 1]]


class ExampleView(Sequence[Example]):
    """Some rows of an examples file, in order, their targets cut to a length: what the trainer
    indexes. Holds the memory map and a few integers a row, never the examples."""

    def __init__(self, data: _Mapped, rows: np.ndarray, cuts: np.ndarray) -> None:
        self._data, self._rows, self._cuts = data, rows, cuts

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._data.example(int(self._rows[index]), int(self._cuts[index]))

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    @property
    def path(self) -> Path:
        return self._data.path

    @property
    def target_lengths(self) -> np.ndarray:
        return self._cuts

    @property
    def lengths(self) -> np.ndarray:
        """Student prompt + target, per example (what ``Example.length`` is)."""
        return self._data.prompt_lengths[self._rows] + self._cuts

    def topk_sizes(self) -> set[int | None]:
        """The top-k sizes the examples carry (None: an example without stored scores)."""
        ks = self._data.ks[self._rows]
        return {None if k == 0 else int(k) for k in np.unique(ks)}

    def fit(self, max_length: int) -> tuple[ExampleView, int, int]:
        """``batching.fit_examples`` without building an example: (kept, dropped, truncated)."""
        d = self._data
        room = max_length - np.maximum(d.prompt_lengths, d.teacher_lengths)[self._rows]
        keep = room >= 1
        cuts = np.minimum(self._cuts, room)[keep]
        truncated = int((cuts < self._cuts[keep]).sum())
        view = ExampleView(d, self._rows[keep], cuts)
        return view, int((~keep).sum()), truncated


def target_tokens(examples: Sequence[Example]) -> int:
    """Target tokens of all the examples, read from the lengths when they are a file's."""
    if isinstance(examples, ExampleView):
        return int(examples.target_lengths.sum())
    return sum(len(ex.target_ids) for ex in examples)
