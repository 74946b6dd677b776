"""``python -m bench``: the gc-compaction benchmark (``bench.run``); with ``--kinds``, L0
compaction and image creation against copy-through (``bench.kinds``)."""

import sys

from bench import kinds, run

if any(arg.split("=", 1)[0] == "--kinds" for arg in sys.argv[1:]):
    kinds.main()
else:
    run.main()
