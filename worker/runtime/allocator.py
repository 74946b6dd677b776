"""glibc's malloc, told to keep what a worker process frees while a sub-job runs.

A compaction allocates and frees NumPy arrays of a few MB for every merged chunk. By default
glibc serves a block above its mmap threshold (128 KiB at first, adapting up to 32 MiB) with a
fresh mapping, and gives the top of its heap back to the kernel once twice that threshold is
free there, so chunk after chunk touched fresh pages: a `pages` compaction took 100,000 more
minor page faults than its copy-through, and its worker spent as much more system CPU as user
CPU. Keeping freed memory (the heap trimmed above 512 MiB free only, blocks up to 32 MiB, glibc's
most, from the heap) took 9% of the worker CPU off a `pages` job (docs/benchmarks.md); peak RSS
did not move. When a sub-job ends its process trims the heap, so an idle worker does not hold
what the job freed.

Arrow's buffers come from jemalloc, told to keep freed pages where Arrow's pool is chosen
(``compactor.storage``); they stay with the process, bounded by its peak, because pyarrow's
``release_unused`` does not purge jemalloc's arenas (measured with pyarrow 26: RSS unchanged).
A C library other than glibc (musl has ``mallopt`` as a stub) is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD_BYTES = 512 << 20
MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc's largest mmap threshold on 64-bit systems (``HEAP_MAX_SIZE / 2``)."""


def _libc(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name`` from the process's own symbols (no library search),
    or None when it has none."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    return function


def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed memory; whether the C library took it. Call it
    once, before the process forks its pool (children inherit the setting)."""
    mallopt = _libc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        log.info("malloc left as it is: the C library has no mallopt")
        return False
    mallopt.restype = ctypes.c_int
    taken: bool = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    taken = taken and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not taken:
        log.info("malloc left as it is: the C library refused its thresholds")
    return taken


def give_back_freed_memory() -> None:
    """Return the free memory of glibc's heaps to the kernel (``malloc_trim``). Call it when a
    sub-job ends, not during one: the next chunk would fault the pages in again."""
    malloc_trim = _libc("malloc_trim", ctypes.c_size_t)
    if malloc_trim is not None:
        malloc_trim(0)
