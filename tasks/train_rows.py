"""The rows a round trains on: the train stage's join, streamed as Arrow record batches.

DuckDB joins the keys of the targets, the filter's decisions and the stored scores; the payloads
(token ids, the teacher's top-k) are then taken from the Parquet files a file at a time, the next
ones decoded ahead on other threads. ``tasks.train`` writes these batches into the examples file
the trainer reads memory-mapped (``train.example_file``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.readahead import prefetched
from data.schemas import SCORES
from tasks.stream import key_positions


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
    sf_all = None if scores is None else keys.column("sf")
    plan = []  # each target file in committed order: its rows, and their score files (or None)
    for f in np.unique(tf):
        rows = np.flatnonzero(tf == f)
        plan.append((int(f), rows, None if sf_all is None else sf_all.take(pa.array(rows))))
    files = prefetched(_loads(plan, targets, scores))
    current = -1  # the score file in use
    for _, rows, sf in plan:
        part = _take(next(files), tr[rows])
        if sf is not None:
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
    plan: list[tuple[int, np.ndarray, pa.Array | None]],
    targets: list[Path],
    scores: list[Path] | None,
) -> Iterator[Callable[[], pa.Table]]:
    """The file reads :func:`_payload_batches` makes, in its order: each target file, then
    each score file its rows switch to (one in use at a time, runs as :func:`_runs` finds
    them). A target file whose rows lack a score ends the list: it is refused when its turn
    comes, and nothing after it is read."""
    current = -1
    for f, _, sf in plan:
        yield functools.partial(_columns, targets[f], TARGET_COLUMNS)
        if sf is None:
            continue
        if sf.null_count:
            return
        sf_np = sf.to_numpy()
        for g in _runs(sf_np):
            if int(sf_np[g[0]]) != current:
                current = int(sf_np[g[0]])
                yield functools.partial(_score_columns, scores[current])


TARGET_COLUMNS = ["problem_id", "sample_idx", "token_ids"]
SCORE_COLUMNS = ["num_tokens", "k", "topk_ids", "topk_logprob_gaps", "topk_counts"]


def _columns(path: Path, columns: list[str]) -> pa.Table:
    """``columns`` of a Parquet file (ParquetFile: one open, no dataset discovery)."""
    return _open(path).read(columns=columns)


def _open(path: Path) -> pq.ParquetFile:
    """A committed Parquet file, memory-mapped: its pages are decoded from the page cache
    without first being copied into buffers (at 5k rows x top-32 the score files' decode took
    0.1-0.3 s less system time of ~2.8 s, 10-20% less wall). Committed files are renamed into
    place whole and never written again, so no mapped page can be cut from under the read."""
    return pq.ParquetFile(path, memory_map=True)


def _score_columns(path: Path) -> pa.Table:
    """The columns training reads from a scores file; one written before ``topk_counts``
    existed kept all k at every position (its counts are null)."""
    file = _open(path)
    names = set(file.schema_arrow.names)
    table = file.read(columns=[c for c in SCORE_COLUMNS if c in names])
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
