"""Benchmarks of gc-compaction against a real S3 endpoint (``python -m bench``).

Not part of the test run. See ``docs/benchmarks.md`` for what is measured and the results.
"""
