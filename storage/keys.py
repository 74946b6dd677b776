"""Keys: 18 bytes compared as unsigned bytes, rendered as 36 uppercase hex characters.

A key is a plain ``bytes`` object of length 18 throughout the code: Python compares bytes
lexicographically as unsigned values, which is exactly the order the contracts ask for, and
plain bytes cost nothing to move between Parquet columns and the merge.
"""

from typing import NamedTuple, TypeVar

from compactor.storage.errors import InvalidInput

KEY_SIZE = 18
KEY_HEX_LEN = KEY_SIZE * 2
KEY_MIN = bytes(KEY_SIZE)
KEY_MAX = b"\xff" * KEY_SIZE
_KEY_MAX_INT = (1 << (8 * KEY_SIZE)) - 1


def parse_key(text: str) -> bytes:
    """Parse 36 hex characters (any case) into a key."""
    if not isinstance(text, str) or len(text) != KEY_HEX_LEN:
        raise InvalidInput(f"invalid key {text!r}: expected exactly {KEY_HEX_LEN} hex characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"invalid key {text!r}: not hexadecimal") from None


def format_key(key: bytes) -> str:
    return key.hex().upper()


def key_next(key: bytes) -> bytes:
    """The key right after ``key`` (big-endian +1 with carry); ``KEY_MAX`` has no successor."""
    value = int.from_bytes(key, "big")
    if value >= _KEY_MAX_INT:
        raise InvalidInput("key FFFF...FF has no successor")
    return (value + 1).to_bytes(KEY_SIZE, "big")


def key_from_int(value: int) -> bytes:
    return value.to_bytes(KEY_SIZE, "big")


def key_to_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


class KeyRange(NamedTuple):
    """Half-open key range ``[start, end)``."""

    start: bytes
    end: bytes

    def contains(self, key: bytes) -> bool:
        return self.start <= key < self.end

    def overlaps(self, other: "KeyRange") -> bool:
        return overlaps(self, other)

    def covers(self, other: "KeyRange") -> bool:
        return fully_contains(self, other)

    def is_single_key(self) -> bool:
        return key_to_int(self.end) == key_to_int(self.start) + 1

    def __str__(self) -> str:
        return f"{format_key(self.start)}-{format_key(self.end)}"


FULL_KEY_RANGE = KeyRange(KEY_MIN, KEY_MAX)


T = TypeVar("T", bytes, int)


def overlaps(a: tuple[T, T], b: tuple[T, T]) -> bool:
    """Whether half-open ranges ``a`` and ``b`` share at least one point."""
    return not (a[1] <= b[0] or b[1] <= a[0])


def fully_contains(outer: tuple[T, T], inner: tuple[T, T]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]
