"""Data at rest: keys and LSNs, values and redo, layer files, manifests, the layer map, the object
store client, the read path and timeline import/export."""

import ctypes
import os

# Arrow picks its memory pool once, when pyarrow is first imported, and every layer read and
# write then allocates from it (pyarrow.set_memory_pool later reaches only part of that). With
# the default, mimalloc, a worker compacting 1 GiB peaked at 485 MiB RSS; with jemalloc at
# 389 MiB, at the same speed (docs/benchmarks.md). An operator's own choice wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
# Arrow's jemalloc gives freed pages back to the kernel within a second, and a freed block of 16
# MiB or more at once, so the merged chunks of a job kept writing into fresh pages: a `branchy`
# compaction took 260,000 page faults, twice its copy-through, and 15% more worker CPU than with
# freed pages kept for reuse (docs/benchmarks.md). Only "never" keeps the big blocks; what a
# process keeps is bounded by its peak. One arena: with one per thread, each kept its own peak and a
# 4 GiB job peaked at 748 MiB RSS against 566 MiB at 1 GiB; with one, 614 against 556. Read when
# jemalloc starts, at Arrow's first allocation; an operator's own configuration wins. Huge pages
# where the kernel allows them on request (transparent_hugepage "madvise", Debian's default): a
# 256 MiB `pages` job took 18,000 page faults instead of 67,000 and 2.54 worker CPU-s instead of
# 3.00, at the same peak RSS (docs/benchmarks.md).
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "dirty_decay_ms:-1,narenas:1,thp:always")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Python's own allocations go through glibc's malloc, which gives each new thread an arena
    of its own (up to 8 per core) and returns their freed memory lazily. A sub-job runs download,
    decode, upload and multipart threads: a worker compacting 1 GiB peaked at 593 MiB RSS and at
    658 MiB for 4 GiB, against 407 and 447 MiB with two arenas, at the same speed
    (docs/benchmarks.md). Set before any thread starts, like ``MALLOC_ARENA_MAX``, which an
    operator may set instead: theirs wins. A libc without ``mallopt`` (musl) is left alone."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    # The process's own symbols, libc's among them: no library search (find_library runs
    # ldconfig, a millisecond or more at every start).
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        m_arena_max = -8  # glibc's malloc.h
        mallopt(m_arena_max, arenas)


_limit_malloc_arenas()
