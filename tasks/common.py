"""Plumbing every stage shares: cached execution on the stage store, and reading its tables.

A stage body is a plain function ``compute(writer) -> extra`` that writes its
output into a :class:`StageWriter`; :func:`run_stage` turns it into a cached,
resumable stage run. Tasks hand each other :class:`StageResult` (a key and a
path), never datasets.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data.diskfull import naming
from data.stage_writer import StageWriter
from data.store import StageStore

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


_COMPUTE_LOCK = threading.Lock()
_COMPUTE_S = [0.0]


@contextlib.contextmanager
def computing() -> Iterator[None]:
    """Count the block as compute: an engine call or optimizer steps (the stage's floor).

    Each stage records its compute seconds (``compute_s`` in its manifest's extra) beside its
    wall time, so a round's orchestration overhead (model loads, Prefect, Parquet, DuckDB,
    Python joins) is wall - compute, from the same run (benchmarks/bench_overhead.py). Shards
    computed on a Dask cluster are timed there and not counted here.
    """
    started = time.perf_counter()
    try:
        yield
    finally:
        add_compute(time.perf_counter() - started)


def add_compute(seconds: float) -> None:
    with _COMPUTE_LOCK:
        _COMPUTE_S[0] += seconds


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
    rss, compute_before = _PeakRss(), _COMPUTE_S[0]
    # A full disk that no inner writer named (an engine's or DuckDB's own write) is named here
    # by the stage's staging directory: one line, not a library's traceback.
    with naming(writer.dir):
        try:
            extra = compute(writer) or {}
        finally:
            peak = rss.stop()
        extra = {**extra, "compute_s": round(_COMPUTE_S[0] - compute_before, 3)}
        if peak is not None:
            extra["peak_rss_mb"] = peak
        man = writer.commit(extra)
    seconds = time.monotonic() - started
    log.info(
        "round %d %-8s done: %d rows in %.1fs (key %s)", round_, stage, man.rows, seconds, key[:12]
    )
    return StageResult(
        stage, round_, key, man.rows, False, seconds, str(store.stage_dir(stage, round_))
    )


class _PeakRss:
    """A stage's peak resident memory, in MB (None where ``/proc`` cannot say).

    Linux keeps one high-water mark per process (VmHWM). When the stage raises it, the new
    mark is the stage's peak, exactly. Otherwise the stage peaked below an earlier stage, and
    a sampler thread (every 50 ms) gives its peak to within what it could miss between two
    samples. The mark is never reset (``clear_refs``), so ``/usr/bin/time``'s maximum RSS stays
    the whole run's.
    """

    def __init__(self) -> None:
        self.before = _status_kb("VmHWM")
        self.sampled = _status_kb("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="mpd-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.sampled = max(self.sampled, _status_kb("VmRSS") or 0)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        after = _status_kb("VmHWM")
        if after is None or self.before is None:
            return None
        peak = after if after > self.before else self.sampled
        return round(peak / 1024, 1)


def _status_kb(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


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
