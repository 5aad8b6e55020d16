"""An iterator's next items made in a background thread while the caller uses the current one.

The train stage's join decodes Parquet (pyarrow, without the GIL) and then narrows, checks and
writes each record batch (pyarrow and the kernel, mostly without the GIL too): one after the
other they left a core idle while the other worked. Read ahead, the decode of the next files
overlaps the write of the current batch. At most ``depth`` items wait, so memory stays bounded
by a few record batches whatever the iterator's length.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_END = object()


def read_ahead(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """``items``, in order, each made by a worker thread up to ``depth`` items ahead. An
    exception the iterator raises is raised here, at the item where it happened; a caller that
    stops early (an exception, ``close``) stops the worker at its next item."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # boundary: a thread hands its failure to its caller
            put((_END, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="mpd-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = slots.get()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def prefetched(calls: Iterable[Callable[[], T]], ahead: int = 2) -> Iterator[T]:
    """Each call's result, in order, the next ``ahead`` calls running on threads meanwhile.

    The train stage's join reads its Parquet files one after the other, and one file's decode
    keeps about one core busy (a thread per column, and one column holds most of the bytes):
    decoding the next files while this one is joined uses the others. At most ``ahead``
    results wait, so memory stays bounded by a few files. A call's exception is raised here, at
    its turn; a caller that stops early cancels what has not started."""
    todo = iter(calls)
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="mpd-prefetch") as pool:
        pending = deque(pool.submit(call) for call in itertools.islice(todo, ahead))
        try:
            while pending:
                done = pending.popleft()
                following = next(todo, None)
                if following is not None:
                    pending.append(pool.submit(following))
                yield done.result()
        finally:
            for future in pending:
                future.cancel()
