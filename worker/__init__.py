"""The gc-compaction engine (selection, k-merge, key retention, split writers, statistics)."""
