"""Data at rest: keys and LSNs, values and redo, layer files, manifests, the layer map, the object
store client, the read path and timeline import/export."""

import os

# Arrow picks its memory pool once, when pyarrow is first imported, and every layer read and
# write then allocates from it (pyarrow.set_memory_pool later reaches only part of that). With
# the default, mimalloc, a worker compacting 1 GiB peaked at 485 MiB RSS; with jemalloc at
# 389 MiB, at the same speed (docs/benchmarks.md). An operator's own choice wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
# jemalloc serves allocations of 8 MiB and more (row groups being written, merged chunks) from
# an arena that purges them as soon as they are freed, so the next one faults every page in
# again: 16 MiB allocated and freed in a loop cost 0.35 ms of system CPU per MB here. Never
# purging pages already given back lazily (MADV_FREE, "muzzy") lets them be reused without a
# fault, and the kernel still takes them back under memory pressure. An operator's own
# JE_ARROW_MALLOC_CONF (jemalloc's options for Arrow's copy) wins.
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "muzzy_decay_ms:-1")
