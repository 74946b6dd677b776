"""Writers that cut their output into layers of about a target size (the seed's
``SplitDeltaLayerWriter`` and ``SplitImageLayerWriter``).

Each piece is a local layer file; names are decided when a piece is cut, and at ``finish`` every
piece is either kept as a produced layer or discarded (deleted) when ``discard(name)`` says so,
e.g. because an identical layer already exists.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from storage.keys import KEY_MAX, KEY_SIZE, key_next
from storage.layer_file import LayerFileInfo, LayerWriter
from storage.layer_name import LayerName
from storage.values import ValueKind, Version

# The seed's per-value estimate for deltas: key, LSN and about 80 bytes of value.
_DELTA_ROW_ESTIMATE = KEY_SIZE + 8 + 80


@dataclass(frozen=True)
class Produced:
    name: LayerName
    file: LayerFileInfo


@dataclass(frozen=True)
class Discarded:
    name: LayerName


WriterResult = Produced | Discarded
Discard = Callable[[LayerName], bool]
OnCut = Callable[[LayerName, LayerFileInfo], WriterResult]
"""Decides about a piece as soon as it is cut, instead of at ``finish``; a kept piece's file then
belongs to the callee (the engine uploads it while the writers go on)."""


class _Pieces:
    """Pieces written so far. Each is finished as soon as it is cut, so memory holds one open
    writer at a time. Whether a piece is kept is decided for all of them at the end, as the
    seed's batch writer does, or for each one as it is cut when ``on_cut`` is given."""

    def __init__(self, workdir: Path, on_cut: OnCut | None = None) -> None:
        self.workdir = workdir
        self.on_cut = on_cut
        self.decided: list[WriterResult] = []
        self.done: list[LayerFileInfo] = []  # undecided
        self.names: list[LayerName] = []
        self._count = 0

    def new_writer(self) -> LayerWriter:
        self._count += 1
        return LayerWriter(self.workdir / f"piece-{id(self):x}-{self._count}.parquet")

    def add(self, name: LayerName, writer: LayerWriter) -> None:
        file = writer.finish(name)
        if self.on_cut is not None:
            self.decided.append(self.on_cut(name, file))
        else:
            self.done.append(file)
            self.names.append(name)

    def finish(self, discard: Discard) -> list[WriterResult]:
        results = self.decided
        for name, file in zip(self.names, self.done, strict=True):
            if discard(name):
                file.path.unlink(missing_ok=True)
                results.append(Discarded(name))
            else:
                results.append(Produced(name, file))
        self.decided, self.done, self.names = [], [], []
        return results

    def abort(self) -> None:
        """Delete the undecided pieces (decided ones were deleted or handed on when cut)."""
        for file in self.done:
            file.path.unlink(missing_ok=True)
        self.decided, self.done, self.names = [], [], []


class SplitDeltaWriter:
    """Deltas over one LSN range, cut only between keys: all versions of a key stay in one layer.

    A piece covers ``[its first key, the next piece's first key)``; the last one ends right after
    its last key, as the seed infers delta key ranges.
    """

    def __init__(
        self, workdir: Path, lsn_range: tuple[int, int], target_bytes: int, on_cut: OnCut | None = None
    ) -> None:
        self.lsn_range = lsn_range
        self.target_bytes = target_bytes
        self._pieces = _Pieces(workdir, on_cut)
        self._writer: LayerWriter | None = None
        self._start_key = b""
        self._last_key: bytes | None = None

    def put(self, version: Version) -> None:
        key = version.key
        writer = self._writer
        if writer is None:
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
        elif (
            key != self._last_key
            and writer.num_rows >= 1
            and writer.size_reaches(self.target_bytes - _DELTA_ROW_ESTIMATE)
        ):
            self._pieces.add(LayerName.delta(self._start_key, key, *self.lsn_range), writer)
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
        self._last_key = key
        writer.add(*version)

    def put_key(self, versions: Sequence[Version]) -> None:
        """``put`` each of ``versions``, which all belong to one key, in order."""
        if not versions:
            return
        self.put(versions[0])
        if len(versions) > 1:
            assert self._writer is not None
            self._writer.add_rows(versions[1:])

    def finish(self, discard: Discard) -> list[WriterResult]:
        if self._writer is not None and self._last_key is not None:
            end = key_next(self._last_key) if self._last_key != KEY_MAX else KEY_MAX
            self._pieces.add(LayerName.delta(self._start_key, end, *self.lsn_range), self._writer)
            self._writer = None
        return self._pieces.finish(discard)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._pieces.abort()


class SplitImageWriter:
    """Images at one LSN; the pieces together cover exactly ``[start_key, end_key)`` of the job."""

    def __init__(
        self, workdir: Path, start_key: bytes, lsn: int, target_bytes: int, on_cut: OnCut | None = None
    ) -> None:
        self.lsn = lsn
        self.target_bytes = target_bytes
        self._pieces = _Pieces(workdir, on_cut)
        self._writer: LayerWriter | None = None
        self._start_key = start_key

    def put(self, key: bytes, page: bytes) -> None:
        writer = self._writer
        if writer is None:
            writer = self._writer = self._pieces.new_writer()
        elif writer.num_rows >= 1 and writer.size_reaches(self.target_bytes - KEY_SIZE - len(page)):
            self._pieces.add(LayerName.image(self._start_key, key, self.lsn), writer)
            writer = self._writer = self._pieces.new_writer()
            self._start_key = key
        writer.add(key, self.lsn, ValueKind.IMAGE, page)

    def finish(self, end_key: bytes, discard: Discard) -> list[WriterResult]:
        if self._writer is not None and self._writer.num_rows:
            self._pieces.add(LayerName.image(self._start_key, end_key, self.lsn), self._writer)
            self._writer = None
        return self._pieces.finish(discard)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self._pieces.abort()
