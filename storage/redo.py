"""Pluggable WAL redo: a registry of record ops, and replay of a key's history.

An encoded record is ``op name, NUL, op body``. Adding an op means registering a ``RecordOp``;
nothing in the engine or the read path changes.
"""

import base64
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from compactor.storage.errors import InvalidInput, RedoError
from compactor.storage.keys import format_key
from compactor.storage.values import ValueKind, Version


class RecordOp(Protocol):
    """One kind of WAL record."""

    name: str

    def from_json(self, data: dict[str, Any]) -> bytes:
        """Validate a record from timeline JSON and return its encoded body."""
        ...

    def to_json(self, body: bytes) -> dict[str, Any]: ...

    def will_init(self, body: bytes) -> bool: ...

    def apply(self, page: bytes, body: bytes) -> bytes:
        """Return the page after the record; raise ``RedoError`` if it cannot apply."""
        ...


_REGISTRY: dict[str, RecordOp] = {}


def register(op: RecordOp) -> None:
    if b"\x00" in op.name.encode():
        raise ValueError("op names cannot contain NUL")
    _REGISTRY[op.name] = op


def _split(payload: bytes) -> tuple[RecordOp, bytes]:
    name, sep, body = payload.partition(b"\x00")
    op = _REGISTRY.get(name.decode("utf-8", "replace")) if sep else None
    if op is None:
        raise RedoError(f"unknown WAL record op {name[:40]!r}")
    return op, body


def record_from_json(data: Any) -> tuple[bytes, bool]:
    """Encode a JSON record; returns ``(payload, will_init)``."""
    if not isinstance(data, dict):
        raise InvalidInput(f"WAL record must be an object, got {type(data).__name__}")
    name = data.get("op")
    op = _REGISTRY.get(name) if isinstance(name, str) else None
    if op is None:
        raise InvalidInput(f"unknown WAL record op {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    body = op.from_json(data)
    return op.name.encode() + b"\x00" + body, op.will_init(body)


def record_to_json(payload: bytes) -> dict[str, Any]:
    op, body = _split(payload)
    return {"op": op.name, **op.to_json(body)}


def apply_record(page: bytes, payload: bytes) -> bytes:
    op, body = _split(payload)
    return op.apply(page, body)


def replay(history: Iterable[Version]) -> bytes:
    """Rebuild the page from a history ordered oldest first that starts with an image or an
    init record (callers trim to the newest such version first)."""
    page: bytes | None = None
    for version in history:
        if version.kind == ValueKind.IMAGE:
            page = version.payload
            continue
        if page is None and version.kind != ValueKind.INIT_RECORD:
            raise RedoError(
                f"no base image for key {format_key(version.key)} at LSN {version.lsn}: "
                "history starts with a record that needs an older page"
            )
        try:
            page = apply_record(page or b"", version.payload)
        except RedoError as err:
            raise RedoError(f"redo failed for key {format_key(version.key)} at LSN {version.lsn}: {err}") from None
    if page is None:
        raise RedoError("empty history")
    return page


def reconstruct(key: bytes, lsn: int, versions: list[Version]) -> bytes | None:
    """Value of ``key`` at ``lsn`` from its versions (sorted by LSN, image first at equal LSN).

    Returns ``None`` when the key has no version at or below ``lsn``; raises ``RedoError`` when
    the versions below ``lsn`` do not start with an image or an init record.
    """
    start = -1
    last = -1
    for i, version in enumerate(versions):
        if version.lsn > lsn:
            break
        last = i
        if version.kind != ValueKind.RECORD:
            start = i
    if last < 0:
        return None
    if start < 0:
        raise RedoError(
            f"cannot read key {format_key(key)} at LSN {lsn}: its history has no image or init "
            f"record at or below LSN {versions[0].lsn} (the base was garbage-collected)"
        )
    return replay(versions[start : last + 1])


# --- the built-in `test` op, mirroring the seed's test record -------------------------------

_CLEAR, _WILL_INIT, _HAS_ONLY_IF = 1, 2, 4
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class TestRecord:
    append: bytes
    clear: bool
    will_init: bool
    only_if: bytes | None

    def encode(self) -> bytes:
        flags = (_CLEAR if self.clear else 0) | (_WILL_INIT if self.will_init else 0)
        parts = [bytes([flags | (_HAS_ONLY_IF if self.only_if is not None else 0)])]
        parts += [_LEN.pack(len(self.append)), self.append]
        if self.only_if is not None:
            parts += [_LEN.pack(len(self.only_if)), self.only_if]
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes) -> "TestRecord":
        try:
            flags = body[0]
            (n,) = _LEN.unpack_from(body, 1)
            append = body[5 : 5 + n]
            if len(append) != n:
                raise ValueError
            pos = 5 + n
            only_if = None
            if flags & _HAS_ONLY_IF:
                (m,) = _LEN.unpack_from(body, pos)
                only_if = body[pos + 4 : pos + 4 + m]
                if len(only_if) != m:
                    raise ValueError
        except (IndexError, ValueError, struct.error):
            raise RedoError("truncated test record") from None
        return cls(append, bool(flags & _CLEAR), bool(flags & _WILL_INIT), only_if)

    def payload(self) -> bytes:
        return b"test\x00" + self.encode()


def _b64(data: dict[str, Any], field: str, optional: bool = False) -> bytes | None:
    value = data.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"test record field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidInput(f"test record field {field!r} is not valid base64") from None


class TestOp:
    name = "test"

    def from_json(self, data: dict[str, Any]) -> bytes:
        unknown = set(data) - {"op", "append", "clear", "will_init", "only_if"}
        if unknown:
            raise InvalidInput(f"test record has unknown fields {sorted(unknown)}")
        for flag in ("clear", "will_init"):
            if not isinstance(data.get(flag, False), bool):
                raise InvalidInput(f"test record field {flag!r} must be a boolean")
        clear, will_init = bool(data.get("clear", False)), bool(data.get("will_init", False))
        if will_init and not clear:
            raise InvalidInput("test record with will_init must also set clear")
        append = _b64(data, "append")
        assert append is not None
        return TestRecord(append, clear, will_init, _b64(data, "only_if", optional=True)).encode()

    def to_json(self, body: bytes) -> dict[str, Any]:
        rec = TestRecord.decode(body)
        return {
            "append": base64.b64encode(rec.append).decode(),
            "clear": rec.clear,
            "will_init": rec.will_init,
            "only_if": None if rec.only_if is None else base64.b64encode(rec.only_if).decode(),
        }

    def will_init(self, body: bytes) -> bool:
        return bool(body[:1]) and bool(body[0] & _WILL_INIT)

    def apply(self, page: bytes, body: bytes) -> bytes:
        rec = TestRecord.decode(body)
        if rec.will_init and page:
            raise RedoError("will_init test record applied to a non-empty page")
        if rec.clear:
            page = b""
        if rec.only_if is not None and page != rec.only_if:
            raise RedoError(f"only_if mismatch: page is {page[:32]!r}, expected {rec.only_if[:32]!r}")
        return page + rec.append


register(TestOp())
