"""Whole-layer checksums: what a layer object's bytes are checked against on download.

A layer is checked for damage (a flipped bit, a truncated or stale object), not for forgery:
whoever can rewrite a layer object can rewrite the manifest that names its checksum as well.
New layers carry XXH3-128, which runs at 18 GB/s on one core here against SHA-256's 1.6 (with
the CPU's SHA extensions): every byte a compaction moves is hashed twice, once where its input
lands and once where its output is written, and SHA-256 of both took 0.4 of the 2.6 CPU-seconds
of a 256 MiB ``pages`` job (docs/benchmarks.md). RocksDB made XXH3 its default block checksum for the
same reason (facebook/rocksdb#10778). Layers written before carry SHA-256 and are checked by it
until a compaction replaces them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import xxhash

Algorithm = Literal["xxh3_128", "sha256"]


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class Checksum(NamedTuple):
    """A layer's checksum as its manifest entry states it: the algorithm and lower-case hex."""

    algorithm: Algorithm
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm} {self.hexdigest}"


def hasher(algorithm: Algorithm) -> Hasher:
    """A new incremental hash of ``algorithm``."""
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    return hashlib.sha256()


_FILE_PIECE_BYTES = 1 << 20


def file_checksum(path: Path, algorithm: Algorithm) -> Checksum:
    """The checksum of the file at ``path``, read in pieces of 1 MiB."""
    digest = hasher(algorithm)
    with open(path, "rb") as f:
        while piece := f.read(_FILE_PIECE_BYTES):
            digest.update(piece)
    return Checksum(algorithm, digest.hexdigest())
