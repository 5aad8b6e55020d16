"""Reading a committed stage one shard at a time: the inputs of score, rewrite and truncate.

A round's table is never read whole, nor made into Python lists (100k traces of 1k tokens would
be 100M Python ints, gigabytes). A stage that consumes another stage's rows addresses them by
*position* in the committed order (files in shard order, rows in file order) and reads a shard's
rows when that shard is computed (``load`` in :func:`tasks.shards.run_shards`). Its memory is
bounded by a shard, not by the round, and a resumed stage never reads its finished shards' rows.

- :class:`Rows`: a committed stage's files as one sequence of rows; :meth:`Rows.take` reads the
  rows at given positions (only the columns asked for, a row group at a time).
- :func:`aligned`: positions of joined rows, worked out by DuckDB over the key columns alone
  (``problem_id, sample_idx`` and file row numbers): for each target row (each kept one), its
  own position and its sample's. Two integers a row: all that is held for the whole round.

Shard 1 (of 64 rows) of a round's rewrites::

    rows = Rows.of(store, "rewrite", 1, ["problem_id", "sample_idx", "token_ids"])
    rows.take(np.arange(64, 128)).to_pylist()
    # [{"problem_id": "arith-train-000017", "sample_idx": 0, "token_ids": [5, 81, ...]}, ...]
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.store import StageStore
from tasks.common import stage_files

KEY = ["problem_id", "sample_idx"]
# Row groups kept after reading: a shard's rows usually lie in one or two input files.
_CACHED_GROUPS = 2


class Rows:
    """Committed Parquet files as one sequence of rows, read by position.

    Reads are by row group (a stage's shard file is one), the last two kept, so a shard that
    reads on where the previous one stopped opens each file once. Safe to share between the
    threads that compute a stage's shards.
    """

    def __init__(self, files: list[Path], columns: list[str], counts: list[int]) -> None:
        self.files, self.columns = files, columns
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._group_starts: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, store: StageStore, stage: str, round_: int, columns: list[str]) -> Rows:
        """A committed stage run's rows (its files in shard order, as :func:`stage_files`)."""
        files = stage_files(store, stage, round_)
        man = store.manifest(stage, round_)
        recorded = {f.path: f.rows for f in man.files} if man is not None else {}
        base = store.stage_dir(stage, round_)
        counts = []
        for path in files:
            rows = recorded.get(path.relative_to(base).as_posix())
            counts.append(pq.read_metadata(path).num_rows if rows is None else rows)
        return cls(files, columns, counts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, positions: np.ndarray) -> pa.Table:
        """The rows at ``positions`` (any order), in that order, with :attr:`columns`."""
        positions = np.asarray(positions, np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions outside 0..{len(self) - 1}")
        file_of = np.searchsorted(self.starts, positions, side="right") - 1
        pieces = []
        for run in _runs(file_of):
            f = int(file_of[run[0]])
            pieces.append(self._take_in_file(f, positions[run] - self.starts[f]))
        if not pieces:
            return pa.table({c: pa.array([]) for c in self.columns})
        return pa.concat_tables(pieces)

    def _take_in_file(self, f: int, local: np.ndarray) -> pa.Table:
        starts = self._groups(f)
        group_of = np.searchsorted(starts, local, side="right") - 1
        pieces = []
        for run in _runs(group_of):
            g = int(group_of[run[0]])
            pieces.append(self._group(f, g).take(pa.array(local[run] - starts[g])))
        return pa.concat_tables(pieces)

    def _groups(self, f: int) -> np.ndarray:
        """Where each row group of file ``f`` starts (its metadata, read once)."""
        with self._lock:
            if f not in self._group_starts:
                meta = pq.read_metadata(self.files[f])
                sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                self._group_starts[f] = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            return self._group_starts[f]

    def _group(self, f: int, g: int) -> pa.Table:
        with self._lock:
            if (f, g) in self._cache:
                self._cache.move_to_end((f, g))
                return self._cache[(f, g)]
            table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=self.columns)
            self._cache[(f, g)] = table
            while len(self._cache) > _CACHED_GROUPS:
                self._cache.popitem(last=False)
            return table


def aligned(
    targets: Rows, samples: Rows, *, kept: list[Path] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the target rows in their committed order, and of each one's sample.

    A target row's sample is the ``samples`` row with its ``(problem_id, sample_idx)``. With
    ``kept`` (a filter stage's decisions files), only the targets a ``kept`` decision names.
    The join runs in DuckDB over the key columns alone (Parquet's projection reads nothing
    else); a target without its sample, or with two, cannot come from one round's stages and
    raises.
    """
    if not len(targets) or (kept is not None and not kept):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not len(samples):
        raise RuntimeError("targets without samples: the sample stage committed no rows")
    keys = key_positions(targets.files, samples.files, kept)
    where = targets.starts[keys.column("tf").to_numpy()] + keys.column("tr").to_numpy()
    if len(where) > 1 and not (np.diff(where) > 0).all():
        raise RuntimeError("a target row matches two samples with its problem_id and sample_idx")
    if keys.column("sf").null_count:
        first = int(np.flatnonzero(keys.column("sf").is_null().to_numpy(zero_copy_only=False))[0])
        row = pq.read_table(targets.files[keys.column("tf")[first].as_py()], columns=KEY)
        row = row.slice(keys.column("tr")[first].as_py(), 1).to_pylist()[0]
        raise RuntimeError(f"{row['problem_id']} sample {row['sample_idx']}: no sample row")
    of_sample = samples.starts[keys.column("sf").to_numpy()] + keys.column("sr").to_numpy()
    return where.astype(np.int64), of_sample.astype(np.int64)


def key_positions(
    targets: list[Path], other: list[Path] | None, kept: list[Path] | None
) -> pa.Table:
    """The target rows' positions in their committed order (file ``tf``, row ``tr``), only those
    a ``kept`` decision names when ``kept`` (a filter stage's decisions files) is given, each
    with the position (``sf``, ``sr``; null where there is none) of the ``other`` row with its
    ``(problem_id, sample_idx)``. DuckDB reads the key columns alone (Parquet's projection reads
    nothing else): four integers a row, all that is held for the whole round."""
    import duckdb  # imported when a stage joins, not when its module is (config, CLI help)

    # File lists are bound parameters: a workspace path is data, never SQL.
    params = {"t": [str(p) for p in targets]}
    opts = "filename = true, file_row_number = true, hive_partitioning = false"
    query = "SELECT list_position($t, t.filename) - 1 AS tf, t.file_row_number AS tr"
    if other is not None:
        params["s"] = [str(p) for p in other]
        query += (
            ", list_position($s, s.filename) - 1 AS sf, s.file_row_number AS sr "
            f"FROM read_parquet($t, {opts}) t "
            f"LEFT JOIN read_parquet($s, {opts}) s USING (problem_id, sample_idx)"
        )
    else:
        query += f" FROM read_parquet($t, {opts}) t"
    if kept is not None:
        params["d"] = [str(p) for p in kept]
        query += (
            " WHERE EXISTS (SELECT 1 FROM read_parquet($d, hive_partitioning = false) d "
            "WHERE d.kept AND d.problem_id = t.problem_id AND d.sample_idx = t.sample_idx)"
        )
    con = duckdb.connect()
    try:
        return con.sql(query + " ORDER BY tf, tr", params=params).to_arrow_table()
    finally:
        con.close()


def _runs(values: np.ndarray) -> list[np.ndarray]:
    """Index groups of equal consecutive values: [0,0,1,1,0] -> [[0,1],[2,3],[4]]."""
    if not len(values):
        return []
    cuts = np.flatnonzero(np.diff(values)) + 1
    return np.split(np.arange(len(values)), cuts)
