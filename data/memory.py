"""Memory exhausted as one line: what was being done, on which device, how much it asked for
and how much there was, and what to change.

An allocation that fails is not the user's mistake (exit 2 would say "fix your command", and
``train/models.py`` used to say "cannot load model" as if the directory were wrong) and not a
bug (the traceback of torch's allocator helps nobody): the kind is
:class:`data.errors.ResourceError` (exit 1, not retried: the retry seconds later finds the same
GPU). For example::

    mpd: error: out of memory loading model runs/x/models/student (float32) on cuda:0: CUDA
    out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of
    which 3.06 GiB is free; use a smaller model or dtype, or free the device

(one line).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from data.errors import ResourceError, is_out_of_memory, one_line

CPU_ALLOCATOR = "DefaultCPUAllocator"
HINT = "use a smaller model, batch or dtype, or free the device"


class MemoryExhaustedError(ResourceError):
    """An allocation failed (CPU memory, or a GPU's): one line naming what and where, exit 1."""


@contextlib.contextmanager
def naming_memory(what: str, device: object, hint: str = HINT) -> Iterator[None]:
    """Turn an allocation that failed inside the block into a :class:`MemoryExhaustedError`
    saying ``what`` was being done on ``device``; every other exception passes unchanged.

    Only the exceptions an allocation raises are caught (Python's ``MemoryError``, torch's
    ``RuntimeError`` family, whose ``OutOfMemoryError`` and allocator messages say so, an
    ``OSError`` ENOMEM): nothing is classified by a catch-all.
    """
    try:
        yield
    except (MemoryError, RuntimeError, OSError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_error(what, device, exc, hint) from None


def out_of_memory_error(
    what: str, device: object, exc: BaseException, hint: str = HINT
) -> MemoryExhaustedError:
    """The one-line error for an allocation that failed while doing ``what`` on ``device``."""
    said = one_line(exc)
    # torch's CPU message starts with the C++ source line of its check; its CUDA message goes
    # on with the allocator's settings: three sentences say what was asked for and was free.
    said = said[max(said.find(CPU_ALLOCATOR), 0) :]
    said = ". ".join(said.split(". ")[:3]).rstrip(".")
    return MemoryExhaustedError(f"out of memory {what} on {device}: {said}; {hint}")
