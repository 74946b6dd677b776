#!/usr/bin/env python3
"""Container healthcheck: exit 0 when an HTTP endpoint of this container answers 200, else 1.

Usage: ``compactor-healthcheck [URL]``. Without URL it checks this process's metrics exporter at
``http://127.0.0.1:$COMPACTOR_METRICS_PORT/metrics`` (workers and the coordinator); Flower is
checked with ``compactor-healthcheck http://127.0.0.1:5555/healthcheck``. Standard library only,
so it runs with any Python in the image and starts in milliseconds.
"""

import os
import sys
import urllib.request

TIMEOUT_S = 3.0


def default_url() -> str | None:
    port = os.environ.get("COMPACTOR_METRICS_PORT", "").strip()
    return f"http://127.0.0.1:{port}/metrics" if port else None


def check(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return bool(response.status == 200)
    except (OSError, ValueError) as err:
        print(f"unhealthy: {url}: {err}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url()
    if url is None:
        print("unhealthy: no URL given and COMPACTOR_METRICS_PORT is not set", file=sys.stderr)
        return 1
    return 0 if check(url) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
