"""Versions of a key: ``(key, lsn, kind, payload)``.

The payload is raw bytes in both cases: the page itself for an image, the encoded record for a
WAL record (see ``compactor.storage.redo``). Records are decoded only when a page must be rebuilt, so
moving versions between layers costs no decoding. ``kind`` orders an image before a record at
the same key and LSN, which is the order the layer files and the merge rely on.
"""

from enum import IntEnum
from typing import NamedTuple


class ValueKind(IntEnum):
    IMAGE = 0
    RECORD = 1
    INIT_RECORD = 2  # a WAL record that starts a history (`will_init`)


class Version(NamedTuple):
    key: bytes
    lsn: int
    kind: int
    payload: bytes

    @property
    def is_image(self) -> bool:
        return self.kind == ValueKind.IMAGE

    @property
    def will_init(self) -> bool:
        """Images and init records start a history: nothing older is needed to read them."""
        return self.kind != ValueKind.RECORD


def image(key: bytes, lsn: int, page: bytes) -> Version:
    return Version(key, lsn, ValueKind.IMAGE, page)


def estimated_size(version: Version) -> int:
    return len(version.payload)
