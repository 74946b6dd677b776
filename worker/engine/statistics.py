"""The seed's ``CompactionStatistics``: what one gc-compaction job read, wrote and discarded, and
where its time went. Serialised as JSON into job status and meta-job summaries."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compactor.storage.keys import KEY_SIZE
from compactor.storage.values import ValueKind, Version, estimated_size

TimeField = Literal[
    "time_acquire_lock_secs",
    "time_analyze_secs",
    "time_download_layer_secs",
    "time_to_first_kv_pair_secs",
    "time_main_loop_secs",
    "time_final_phase_secs",
    "time_total_secs",
]


class NumSize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num: int = 0
    size: int = 0

    def add(self, size: int) -> None:
        self.num += 1
        self.size += size


class CompactionStatistics(BaseModel):
    """Counters of one job. Key-value sizes are estimates (value bytes plus an 18-byte key), as
    in the seed; layer sizes are the physical object sizes."""

    model_config = ConfigDict(extra="forbid")

    # Layers (physical size, maybe compressed). "Discarded" counts outputs that were not written
    # because an identical layer already exists: their size stands in for the kept layer.
    delta_layer_visited: NumSize = Field(default_factory=NumSize)
    image_layer_visited: NumSize = Field(default_factory=NumSize)
    delta_layer_produced: NumSize = Field(default_factory=NumSize)
    image_layer_produced: NumSize = Field(default_factory=NumSize)
    delta_layer_discarded: NumSize = Field(default_factory=NumSize)
    image_layer_discarded: NumSize = Field(default_factory=NumSize)
    num_unique_keys_visited: int = 0
    # Key-value pairs (uncompressed, estimated size).
    wal_keys_visited: NumSize = Field(default_factory=NumSize)
    image_keys_visited: NumSize = Field(default_factory=NumSize)
    wal_produced: NumSize = Field(default_factory=NumSize)
    image_produced: NumSize = Field(default_factory=NumSize)

    # Object-store requests the job sent, every attempt, by kind as S3 bills them (num), with the
    # object bytes they moved up or down (size); see compactor.storage.object_store.RequestKind.
    s3_requests: dict[str, NumSize] = Field(default_factory=dict)

    time_acquire_lock_secs: float = 0.0
    time_analyze_secs: float = 0.0
    time_download_layer_secs: float = 0.0
    time_to_first_kv_pair_secs: float = 0.0
    time_main_loop_secs: float = 0.0
    time_final_phase_secs: float = 0.0
    time_total_secs: float = 0.0

    # Set by `finalize`: size after / size before.
    uncompressed_retention_ratio: float = 0.0
    compressed_retention_ratio: float = 0.0

    def visit_delta_layer(self, size: int) -> None:
        self.delta_layer_visited.add(size)

    def visit_image_layer(self, size: int) -> None:
        self.image_layer_visited.add(size)

    def on_unique_key_visited(self) -> None:
        self.num_unique_keys_visited += 1

    def visit_wal_key(self, version: Version) -> None:
        self.wal_keys_visited.add(estimated_size(version) + KEY_SIZE)

    def visit_image_key(self, version: Version) -> None:
        self.image_keys_visited.add(estimated_size(version) + KEY_SIZE)

    def produce_key(self, version: Version) -> None:
        if version.kind == ValueKind.IMAGE:
            self.produce_image_key(version.payload)
        else:
            self.produce_wal_key(version)

    def produce_wal_key(self, version: Version) -> None:
        self.wal_produced.add(estimated_size(version) + KEY_SIZE)

    def produce_image_key(self, page: bytes) -> None:
        self.image_produced.add(len(page) + KEY_SIZE)

    def discard_delta_layer(self, original_size: int) -> None:
        self.delta_layer_discarded.add(original_size)

    def discard_image_layer(self, original_size: int) -> None:
        self.image_layer_discarded.add(original_size)

    def produce_delta_layer(self, size: int) -> None:
        self.delta_layer_produced.add(size)

    def produce_image_layer(self, size: int) -> None:
        self.image_layer_produced.add(size)

    def add_requests(self, counts: Mapping[str, tuple[int, int]]) -> None:
        """Add ``(requests, object bytes)`` by request kind (``RequestCounter.counts``)."""
        add_requests(self.s3_requests, counts)

    def finalize(self) -> None:
        # The +1.0 keeps an empty job at ratio 0 instead of dividing by zero (as the seed).
        original_kv = self.image_keys_visited.size + self.wal_keys_visited.size
        produced_kv = self.image_produced.size + self.wal_produced.size
        self.uncompressed_retention_ratio = produced_kv / (original_kv + 1.0)
        original_physical = self.image_layer_visited.size + self.delta_layer_visited.size
        # Discarded outputs still exist as the identical layers they duplicate, so they count.
        produced_physical = (
            self.image_layer_produced.size
            + self.delta_layer_produced.size
            + self.image_layer_discarded.size
            + self.delta_layer_discarded.size
        )
        self.compressed_retention_ratio = produced_physical / (original_physical + 1.0)

    def merge(self, other: CompactionStatistics) -> None:
        """Add ``other``'s counters and timers to this one (e.g. the sub-jobs of a meta job; the
        timers then sum worker time, not wall time). Call ``finalize`` afterwards."""
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, NumSize):
                mine.num += theirs.num
                mine.size += theirs.size
            elif isinstance(mine, dict):
                self.add_requests({kind: (counter.num, counter.size) for kind, counter in theirs.items()})
            elif not name.endswith("_ratio"):
                setattr(self, name, mine + theirs)


def add_requests(into: dict[str, NumSize], counts: Mapping[str, tuple[int, int]]) -> None:
    """Add ``(requests, object bytes)`` by request kind to the counters ``into``."""
    for kind, (requests, moved) in counts.items():
        counter = into.setdefault(kind, NumSize())
        counter.num += requests
        counter.size += moved


def s3_summary(*counters: Mapping[str, NumSize]) -> dict[str, int]:
    """Requests by kind, their ``total``, and the object ``bytes`` they moved, over ``counters``."""
    total: dict[str, NumSize] = {}
    for each in counters:
        add_requests(total, {kind: (c.num, c.size) for kind, c in each.items()})
    ordered = sorted(total.items())
    return {
        **{kind: counter.num for kind, counter in ordered},
        "total": sum(counter.num for _, counter in ordered),
        "bytes": sum(counter.size for _, counter in ordered),
    }


@dataclass(slots=True)
class KeyValueCounters:
    """The key-value counters of a main loop as plain ints. Updating the pydantic model once per
    version costs more than the rest of the loop does; ``add_to`` adds these to the statistics
    at the end, with the same estimates (value bytes plus an 18-byte key per version)."""

    unique_keys: int = 0
    wal_visited: int = 0
    wal_visited_bytes: int = 0  # value bytes only; the key size is added by add_to
    image_visited: int = 0
    image_visited_bytes: int = 0
    wal_produced: int = 0
    wal_produced_bytes: int = 0
    image_produced: int = 0
    image_produced_bytes: int = 0

    def add_to(self, stats: CompactionStatistics) -> None:
        stats.num_unique_keys_visited += self.unique_keys
        for counter, num, size in (
            (stats.wal_keys_visited, self.wal_visited, self.wal_visited_bytes),
            (stats.image_keys_visited, self.image_visited, self.image_visited_bytes),
            (stats.wal_produced, self.wal_produced, self.wal_produced_bytes),
            (stats.image_produced, self.image_produced, self.image_produced_bytes),
        ):
            counter.num += num
            counter.size += size + KEY_SIZE * num


class PhaseTimer:
    """Adds the wall time spent inside a ``with`` block to one ``time_*`` field.

    ``mark(field)`` sets another field to the time since the block started, once (for
    ``time_to_first_kv_pair_secs`` inside the main loop)."""

    def __init__(self, stats: CompactionStatistics, field: TimeField) -> None:
        self._stats = stats
        self._field = field
        self._start = 0.0
        self._marked: set[str] = set()

    def __enter__(self) -> PhaseTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Recorded on failure too: a failed job's status should show where the time went.
        elapsed = self.elapsed()
        setattr(self._stats, self._field, getattr(self._stats, self._field) + elapsed)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def mark(self, field: TimeField) -> None:
        if field not in self._marked:
            self._marked.add(field)
            setattr(self._stats, field, self.elapsed())
