"""Data at rest: keys and LSNs, values and redo, layer files, manifests, the layer map, the object
store client, the read path and timeline import/export."""

import os

# Arrow picks its memory pool once, when pyarrow is first imported, and every layer read and
# write then allocates from it (pyarrow.set_memory_pool later reaches only part of that). With
# the default, mimalloc, a worker compacting 1 GiB peaked at 485 MiB RSS; with jemalloc at
# 389 MiB, at the same speed (docs/benchmarks.md). An operator's own choice wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
