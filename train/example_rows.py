"""An examples file's rows, read one at a time (``train.example_file`` writes the file).

The trainer's order is random over the whole round, so every read is a random one: a record
batch's header is read through a memory map of the file, once, and each row with positional
reads into the arrays its Example owns. Nothing of the file stays mapped: what a reader holds
is the rows' lengths, a few KB per record batch, and the row it returns.
"""

from __future__ import annotations

import functools
import mmap
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.schemas import decode_topk
from train.batching import Example
from train.example_batch import EXAMPLES, NARROW

# A record batch's header (its flatbuffer message: ~1 KB for these 7 columns) is at most this far
# before its body: the release of a batch covers it.
HEADER_BYTES = 2**14
# Linux maps up to this many bytes of cached pages around a faulting one (fault_around_bytes,
# 64 KB by default), past a record batch's ends too: a release covers them.
FAULT_AROUND = 2**16


class ExampleRows:
    """An examples file's rows, read one at a time, and their lengths (``lengths``: the table of
    ``train.example_file.LENGTHS`` written beside it, read whole by its caller).

    The file is memory-mapped to find its record batches: a batch's header is read (through the
    map) when a row of it is first read, its list columns' offsets copied (a few KB) and where
    their values lie in the file kept, then the batch's pages unmapped. A row's values are read
    with positional reads (``os.preadv``) from the page cache straight into the arrays its
    Example owns: one copy, and no page of the file mapped. Rows read through numpy views of
    the map took 1.3-2x this time (the same rows, the same order): the views' page faults, the
    copies the Example needs anyway, and an MADV_DONTNEED after each row whose page-table walk
    grew with its record batch (64 MB: 24 us a row; docs/floors.md).

    The trainer's order is random over the whole round: a cache of 64 batches reloaded one for
    most reads at 50k rows (152 batches; 28,805 loads in 50,000 reads), and the read took 1.5x
    the CPU it takes with all of them kept. 4,096 (~8 KB each at ~330 rows a batch) holds over
    a million rows of 1k tokens x top-32; past that the least recently used are reloaded."""

    CACHED_BATCHES = 4096

    def __init__(self, path: Path, lengths: pa.Table) -> None:
        self.path = path
        with open(path, "rb") as fh:
            self.map = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)
        self.recorded = lengths.schema.metadata or {}
        self.base = pa.py_buffer(self.map)
        self.reader = pa.ipc.open_file(pa.BufferReader(self.base))
        if not any(self.reader.schema.equals(s) for s in (EXAMPLES, NARROW)):
            raise pa.ArrowInvalid(f"{path} is not an examples file: {self.reader.schema}")
        cols = {name: lengths.column(name).to_numpy() for name in lengths.schema.names}
        self.rows = lengths.num_rows
        self.batch_of = cols["batch"]
        sizes = np.bincount(self.batch_of, minlength=self.reader.num_record_batches)
        if len(sizes) != self.reader.num_record_batches:
            raise pa.ArrowInvalid(f"{path}'s lengths name batches it does not hold")
        self.sizes = sizes
        self.release((0, len(self.map)))  # the footer's pages, read to open it
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.prompt_lengths = cols["prompt"].astype(np.int64)
        self.teacher_lengths = cols["teacher_prompt"].astype(np.int64)
        self.target_lengths = cols["target"].astype(np.int64)
        self.ks = cols["k"].astype(np.int64)
        self.counts = cols["counts"]
        self._batch = functools.lru_cache(maxsize=self.CACHED_BATCHES)(self._load)

    def _load(self, b: int) -> dict[str, _Column]:
        """Batch ``b``'s list columns: their offsets (copied) and their values' place in the file."""
        batch = self.reader.get_batch(b)
        if batch.num_rows != self.sizes[b]:
            raise pa.ArrowInvalid(f"{self.path}: batch {b} does not match its lengths")
        spans = [
            (buf.address, buf.address + buf.size)
            for column in batch.columns
            for buf in _buffers(column)
        ]
        base = self.base.address
        cols = {name: _Column(batch.column(name), base) for name in EXAMPLES.names if name != "k"}
        # the batch's header, read to find the columns, lies just before its body
        self.release(
            (min(a for a, _ in spans) - base - HEADER_BYTES, max(e for _, e in spans) - base)
        )
        return cols

    def example(self, row: int, cut: int) -> Example:
        """Row ``row`` of the file, its target (and top-k) cut to ``cut`` tokens."""
        b = int(self.batch_of[row])
        i, cols = row - int(self.starts[b]), self._batch(b)
        prompt = self._read(cols["prompt_ids"], i).tolist()
        teacher = self._read(cols["teacher_prompt_ids"], i).tolist() or None
        target = self._read(cols["target_ids"], i, cut).tolist()
        k = int(self.ks[row])
        if k == 0:
            return Example(prompt, target, teacher_prompt_ids=teacher)
        if self.counts[row]:
            counts = self._read(cols["topk_counts"], i, cut)
            entries = int(counts.sum())
        else:
            counts, entries = None, cut * k
        topk_ids, topk_lp = decode_topk(
            self._read(cols["topk_ids"], i, entries),
            self._read(cols["topk_logprob_gaps"], i, entries),
            k,
            counts,
        )
        return Example(prompt, target, topk_ids, topk_lp, teacher)

    def _read(self, column: _Column, i: int, limit: int | None = None) -> np.ndarray:
        """Row ``i``'s values of ``column`` (its first ``limit``), read into a new array."""
        lo, hi = int(column.offsets[i]), int(column.offsets[i + 1])
        if limit is not None:
            hi = min(hi, lo + limit)
        out = np.empty(max(hi - lo, 0), column.dtype)
        if out.nbytes and os.preadv(self.fd, [out], column.at + lo * out.itemsize) != out.nbytes:
            raise pa.ArrowInvalid(f"{self.path} ends inside a record batch")
        return out

    def release(self, span: tuple[int, int]) -> None:
        """Unmap the pages of ``span`` (bytes of the map) read so far (MADV_DONTNEED; they stay
        in the page cache), and the kernel's fault-around on either side: without it, a record
        batch's header and offsets read through the map would stay mapped, RSS growing with
        the batches read."""
        start = max(0, span[0] - FAULT_AROUND)
        start -= start % mmap.PAGESIZE
        self.map.madvise(
            mmap.MADV_DONTNEED, start, min(span[1] + FAULT_AROUND, len(self.map)) - start
        )


class _Column:
    """A list column of a mapped record batch: its offsets, copied (4 bytes a row), and where
    its values start in the file and of what type. Holds no page of the map."""

    def __init__(self, column: pa.ListArray, base: int) -> None:
        values = column.values
        self.dtype = np.dtype(values.type.to_pandas_dtype())
        self.offsets = column.offsets.to_numpy().copy()
        data = values.buffers()[1]  # None where no row holds a value (nothing to read then)
        self.at = 0 if data is None else data.address - base + values.offset * self.dtype.itemsize


def _buffers(column: pa.Array) -> Iterator[pa.Buffer]:
    """Every buffer of ``column``, its list values' included."""
    yield from (b for b in column.buffers() if b is not None and b.size)
