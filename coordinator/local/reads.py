"""Every read of a timeline at one LSN, summed up so that two can be compared: what the demos
check after compaction (``compactor demo`` and its ``--ingest`` mode).

The digest is a sum of one hash per ``(key, value)`` (modulo 2^256) rather than a hash of the
whole stream, so that a workload can keep the digest of what it wrote up to date one key at a time
(remove the key's old value, add its new one) instead of hashing every key after each change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from compactor.storage.errors import CompactorError
from compactor.storage.manifest import Manifest
from compactor.storage.timeline import Storage

_MODULUS = 1 << 256


def _term(key: bytes, value: bytes) -> int:
    digest = hashlib.blake2b(key, digest_size=32)  # keys are of one length: no separator needed
    digest.update(value)
    return int.from_bytes(digest.digest(), "big")


@dataclass
class ReadDigest:
    """The keys that exist at an LSN and a digest of their values."""

    keys: int = 0
    total: int = 0

    def add(self, key: bytes, value: bytes) -> None:
        self.keys += 1
        self.total = (self.total + _term(key, value)) % _MODULUS

    def remove(self, key: bytes, value: bytes) -> None:
        self.keys -= 1
        self.total = (self.total - _term(key, value)) % _MODULUS

    def copy(self) -> ReadDigest:
        return ReadDigest(self.keys, self.total)

    def __str__(self) -> str:
        return f"{self.keys} keys, digest {self.total:064x}"


def read_digest(storage: Storage, manifest: Manifest, lsn: int) -> ReadDigest:
    """Every key that exists at ``lsn`` and its value, through the read path."""
    digest = ReadDigest()
    for key, value in storage.read(manifest, lsn):
        digest.add(key, value)
    return digest


def retained_lsns(manifest: Manifest) -> list[int]:
    """Every LSN whose reads gc-compaction must keep: retain LSNs and leases below the horizon,
    the horizon, and the top of the timeline (standing for every LSN above the horizon)."""
    horizon = manifest.gc.cutoff
    return sorted({*manifest.gc.retained_below(horizon), horizon, max(manifest.top_lsn - 1, horizon)})


def verify_reads(storage: Storage, manifest: Manifest, expected: Mapping[int, ReadDigest], what: str) -> int:
    """Raise CompactorError unless the reads of ``manifest`` at every LSN of ``expected`` are
    what it says; returns the number of key reads compared."""
    for lsn in sorted(expected):
        got = read_digest(storage, manifest, lsn)
        if got != expected[lsn]:
            raise CompactorError(f"verification failed: {what} reads at LSN {lsn} changed ({expected[lsn]} -> {got})")
    return sum(digest.keys for digest in expected.values())
