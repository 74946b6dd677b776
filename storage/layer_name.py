"""Layer names, the seed's convention exactly.

delta: ``{key_start}-{key_end}__{lsn_start:016X}-{lsn_end:016X}`` covering keys
``[key_start, key_end)`` and LSNs ``[lsn_start, lsn_end)``;
image: ``{key_start}-{key_end}__{lsn:016X}`` covering LSNs ``[lsn, lsn + 1)``.
"""

import re
from typing import NamedTuple

from compactor.storage.errors import InvalidInput
from compactor.storage.keys import KEY_MAX, KEY_MIN, KeyRange, format_key, key_next, parse_key
from compactor.storage.lsn import LSN_MAX

_NAME_RE = re.compile(
    r"(?P<ks>[0-9A-Fa-f]{36})-(?P<ke>[0-9A-Fa-f]{36})__(?P<l1>[0-9A-Fa-f]{16})(?:-(?P<l2>[0-9A-Fa-f]{16}))?"
)


class LayerName(NamedTuple):
    key_range: KeyRange  # start inclusive, end exclusive
    lsn_start: int  # inclusive
    lsn_end: int  # exclusive; lsn + 1 for an image layer
    is_delta: bool

    @classmethod
    def delta(cls, key_start: bytes, key_end: bytes, lsn_start: int, lsn_end: int) -> "LayerName":
        name = cls(KeyRange(key_start, key_end), lsn_start, lsn_end, True)
        name.validate()
        return name

    @classmethod
    def image(cls, key_start: bytes, key_end: bytes, lsn: int) -> "LayerName":
        name = cls(KeyRange(key_start, key_end), lsn, lsn + 1, False)
        name.validate()
        return name

    @classmethod
    def parse(cls, text: str) -> "LayerName":
        match = _NAME_RE.fullmatch(text)
        if match is None:
            raise InvalidInput(f"invalid layer name {text[:120]!r}")
        ks, ke = parse_key(match["ks"]), parse_key(match["ke"])
        start = int(match["l1"], 16)
        if match["l2"] is None:
            return cls.image(ks, ke, start)
        return cls.delta(ks, ke, start, int(match["l2"], 16))

    def validate(self) -> None:
        if self.key_range.start >= self.key_range.end:
            raise InvalidInput(f"layer {self}: empty key range")
        if not 0 <= self.lsn_start < self.lsn_end <= LSN_MAX + 1:
            raise InvalidInput(f"layer {self}: empty or invalid LSN range")

    @property
    def lsn_range(self) -> tuple[int, int]:
        return (self.lsn_start, self.lsn_end)

    @property
    def image_lsn(self) -> int:
        return self.lsn_start

    @property
    def is_l0(self) -> bool:
        """An L0 layer is a delta covering exactly ``[MIN, MAX)``."""
        return self.is_delta and self.key_range == (KEY_MIN, KEY_MAX)

    @property
    def is_single_key(self) -> bool:
        return self.key_range.end == key_next(self.key_range.start) if self.key_range.start != KEY_MAX else False

    def __str__(self) -> str:
        keys = f"{format_key(self.key_range.start)}-{format_key(self.key_range.end)}"
        if self.is_delta:
            return f"{keys}__{self.lsn_start:016X}-{self.lsn_end:016X}"
        return f"{keys}__{self.lsn_start:016X}"
