"""A round's training examples, written once as an Arrow IPC file and read a row at a time.

A real round is 10⁴–10⁶ kept traces of 1–8k tokens with top-32 teacher scores per token: tens
of GB as Python objects. So the train stage never holds its examples as a whole. It writes them
once, a record batch at a time as the DuckDB join streams them (``tasks/train.py``), into one
uncompressed Arrow IPC file in its staging directory::

    prompt_ids          list<ids>    the student's chat prompt
    teacher_prompt_ids  list<ids>    the online teacher's own prompt (null: it reads prompt_ids)
    target_ids          list<ids>    the completion, its EOS included
    k                   int32        top-k size (null: no stored scores, CE or online teacher)
    topk_ids            list<ids>    the scores' encoding, as the score stage stores it:
    topk_logprob_gaps   list<int16>  rank-order gaps (data.schemas.decode_topk)
    topk_counts         list<int16>  candidates kept per position (null: all k)

where ``ids`` is uint16 when the tokenizer's vocabulary fits in 65,536 ids, int32 otherwise
(:func:`id_type`; the file's schema says which: an Example's prompt and target ids are Python
ints either way, its top-k ids an array of the file's width, which collate widens into the
batch's int64 tensor). The per-row lengths (prompt, teacher prompt, target, k: a few integers
a row, what the batch plan sorts by) are written beside it (``examples.lengths.arrow``) and read
whole, so opening touches none of the big file. :class:`ExampleView` is the ``Sequence[Example]``
the trainer indexes (its rows read by ``train.example_rows``). A record batch's header is read
through a read-only memory map of the file when a row of it is first read, its columns' offsets
copied and the pages unmapped; an Example is read when its micro-batch is collated, with
positional reads (``os.preadv``) from the page cache straight into the arrays it owns (top-k
decoded then, for that example only): what the trainer holds is the model, the lengths, a few
KB per record batch and the current micro-batch, whatever the round's size, and no page of the
file stays mapped. The order is the trainer's
``BatchPlan``: a pure function of (seed, step, lengths), so the same file gives the same
batches, before a kill -9 and after.

Why not the ``datasets`` library's Arrow-backed Dataset: it maps the same format (as an IPC
stream), but a row read through it is formatted per call; random reads of decoded examples
(1,024 tokens x top-32) measured 3,792/s through numpy views of the map against 2,087/s for
``datasets``' numpy format and 731/s for its Python lists; the positional reads that replaced
the views took 25-55% less time than they did for the same rows (docs/floors.md).

Both files are written to temporary names and renamed, the examples file last: a killed stage
finds either a complete pair, which it reuses (same stage key, same staging directory, same
rows), or writes them again. They are not fsynced (scratch of this stage only): the lengths file
records the boot they were written in, and a pair from an earlier boot, which a power loss may
have left with unwritten pages, is written again (:func:`write_examples`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa

from data.diskfull import naming
from data.fsutil import fsync_dir, removed_on_failure
from data.readahead import read_ahead
from train.batching import Example
from train.example_batch import (
    Prompts,
    example_batch,
    examples_schema,
    grouped,
    id_type,
    list_lengths,
    prompted,
)
from train.example_rows import ExampleRows

log = logging.getLogger("mpd")

EXAMPLES_FILE = "examples.arrow"


def stored_examples(path: Path, rows: Iterable[pa.RecordBatch], prompts: Prompts) -> ExampleView:
    """The examples file at ``path``: the complete one a killed run left, else written from
    ``rows`` (``tasks.train.training_rows``' batches; not iterated when the file is reused)."""
    if path.is_file():
        try:
            view = open_examples(path)
            _check_written(path, view.recorded)
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
    round). The examples file is renamed into place last: it is the commit point.

    Neither file is fsynced: they are this stage's scratch, read only by it, and a killed
    process loses nothing the page cache holds (an fsync of a 10 GB file was the disk's whole
    write time, on the join's clock). What a power loss can lose is caught when the files are
    reopened: the lengths file records the boot they were written in and the examples file's
    size, and a pair from another boot (or another host) is written again
    (:func:`_check_written`). Where the kernel has no boot id, both are fsynced as before."""
    remove_examples(path)
    schema = examples_schema(id_type(prompts.vocab_size))
    tmp, tmp_lengths = path.with_name(f".{path.name}.tmp"), lengths_path(path).with_suffix(".tmp")
    parts: list[pa.RecordBatch] = []
    boot = _boot_id()
    with naming(path), removed_on_failure(tmp), removed_on_failure(tmp_lengths):
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as out:
            # The join decodes, and the next group's prompts are made, while this packs and writes;
            # one group waits (two raised the join's peak from 1.18 GB at 5k rows to 1.30 at 50k).
            for group, pids, pairs in read_ahead(prompted(grouped(rows), prompts), depth=1):
                examples = example_batch(group, pids, pairs, schema)
                out.write_batch(examples)
                parts.append(_row_lengths(examples, len(parts)))
        written = {b"boot": boot or SYNCED, b"examples_bytes": str(tmp.stat().st_size).encode()}
        recorded = LENGTHS.with_metadata(written)
        lengths = pa.Table.from_batches(parts, schema=LENGTHS).replace_schema_metadata(written)
        with pa.OSFile(str(tmp_lengths), "wb") as sink, pa.ipc.new_file(sink, recorded) as out:
            out.write_table(lengths)
        if boot is None:
            _fsync(tmp)
            _fsync(tmp_lengths)
        tmp_lengths.replace(lengths_path(path))
        tmp.replace(path)
    if boot is None:
        fsync_dir(path.parent)
    return lengths.num_rows


SYNCED = b"fsynced"  # the lengths file's boot when both files were fsynced (no boot id here)
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> bytes | None:
    """This boot's id (Linux: new at every boot), or None where the kernel gives none."""
    try:
        return BOOT_ID.read_bytes().strip() or None
    except OSError:
        return None


def _check_written(path: Path, meta: dict[bytes, bytes]) -> None:
    """An ArrowInvalid unless the examples file at ``path`` (its lengths file's metadata:
    ``meta``) can be reused: written in this boot (the page cache held every byte since,
    whatever process was killed) or fsynced, and of the size recorded. A pair from before a
    power loss or a reboot may hold pages that never reached the disk (zeros, or an older
    file's blocks) under a valid-looking footer. Only reuse checks it: a file just written
    (a launch spec's, read by ranks on other hosts) is complete."""
    boot = meta.get(b"boot")
    if boot is None or boot not in (SYNCED, _boot_id()):
        raise pa.ArrowInvalid(f"{path} was written before this boot and not fsynced")
    if meta.get(b"examples_bytes") != str(path.stat().st_size).encode():
        raise pa.ArrowInvalid(f"{path} is not the size its lengths file recorded")


LENGTHS = pa.schema(
    [  # its metadata: the boot it was written in and the examples file's size (_check_written)
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
        return list_lengths(batch.column(name)).astype(np.int32)

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


def open_examples(path: Path) -> ExampleView:
    """Every example of the file, in file order, uncut."""
    with pa.OSFile(str(lengths_path(path))) as source:  # read into memory, not mapped
        lengths = pa.ipc.open_file(source).read_all()
    if not lengths.schema.equals(LENGTHS):
        raise pa.ArrowInvalid(f"{lengths_path(path)} does not hold an examples file's lengths")
    data = ExampleRows(path, lengths)
    return ExampleView(data, np.arange(data.rows), data.target_lengths.copy())


class ExampleView(Sequence[Example]):
    """Some rows of an examples file, in order, their targets cut to a length: what the trainer
    indexes. Holds the memory map and a few integers a row, never the examples."""

    def __init__(self, data: ExampleRows, rows: np.ndarray, cuts: np.ndarray) -> None:
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
    def recorded(self) -> dict[bytes, bytes]:
        """What the lengths file recorded of its writing (the boot, the file's size)."""
        return self._data.recorded

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
