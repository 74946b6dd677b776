"""The read path: values of every key in a key range at an LSN, with one k-merge.

All layers that may hold a version at or below the LSN are merged by (key, LSN) into one
stream; a branch contributes its ancestor's stream, cut at the branch LSN, as one more input.
Each key's versions are then replayed from the newest image or init record. The same stream
serves ``timeline read``, verification, and the bulk base images of branch compaction.
"""

import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from compactor.storage.errors import RedoError
from compactor.storage.keys import KeyRange, key_next
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import LayerEntry, Manifest
from compactor.storage.redo import reconstruct
from compactor.storage.values import Version


class LayerSource(Protocol):
    """Where layer contents come from (a verified local cache of the object store, in practice)."""

    def versions(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[Version]:
        """The layer's versions with keys in ``key_range``, sorted by (key, LSN, kind)."""
        ...


ManifestLookup = Callable[[str], Manifest]
"""Finds the current manifest of another timeline of the same tenant (the ancestor)."""


def _capped(versions: Iterator[Version], lsn: int) -> Iterator[Version]:
    return (v for v in versions if v.lsn <= lsn)


def merged_versions(
    manifest: Manifest,
    source: LayerSource,
    key_range: KeyRange,
    lsn: int,
    ancestors: ManifestLookup | None = None,
    *,
    exclude: Iterable[str] = (),
) -> Iterator[Version]:
    """Every version of keys in ``key_range`` at or below ``lsn``, merged in (key, LSN, kind)
    order across the timeline and its ancestors. Layers named in ``exclude`` are skipped (the
    engine reads the data below its own selection this way)."""
    skipped = set(exclude)
    streams: list[Iterator[Version]] = []
    for name, entry in manifest.layers.items():
        layer = LayerName.parse(name)
        if name in skipped or layer.lsn_start > lsn or not layer.key_range.overlaps(key_range):
            continue
        stream = source.versions(entry, key_range)
        streams.append(stream if layer.lsn_end - 1 <= lsn else _capped(stream, lsn))
    if manifest.ancestor is not None:
        if ancestors is None:
            raise ValueError("reading a branch needs a way to find its ancestor's manifest")
        parent = ancestors(manifest.ancestor.timeline_id)
        # Versions the parent declares dead (outside its keyspace) do not exist for its children
        # either: the parent's gc-compaction drops them.
        inherited = merged_versions(parent, source, key_range, min(lsn, manifest.ancestor.lsn), ancestors)
        streams.append(live_filter(inherited, parent.live_ranges()))
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams)


def group_by_key(versions: Iterator[Version]) -> Iterator[tuple[bytes, list[Version]]]:
    """Group a merged stream by key, dropping a second version at the same LSN (an image
    sorts first and wins, as in the seed)."""
    current: list[Version] = []
    for version in versions:
        if current:
            last = current[-1]
            if version.key == last.key:
                if version.lsn != last.lsn:
                    current.append(version)
                continue
            yield last.key, current
        current = [version]
    if current:
        yield current[0].key, current


def live_filter(versions: Iterator[Version], live: list[KeyRange] | None) -> Iterator[Version]:
    """Drop versions of keys outside the live keyspace (``None``: every key is live)."""
    if live is None:
        return versions
    ranges = sorted(live)
    return (v for v in versions if any(r.start <= v.key < r.end for r in ranges))


def read_range(
    manifest: Manifest,
    source: LayerSource,
    key_range: KeyRange,
    lsn: int,
    ancestors: ManifestLookup | None = None,
    exclude: Iterable[str] = (),
    skip_unreadable: bool = False,
) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` of every live key in ``key_range`` that exists at ``lsn``, in key order.

    Raises ``RedoError`` naming the key and LSN when a key's history below ``lsn`` lacks its base
    or cannot be replayed, unless ``skip_unreadable``: then such keys are left out.
    """
    stream = live_filter(
        merged_versions(manifest, source, key_range, lsn, ancestors, exclude=exclude), manifest.live_ranges()
    )
    for key, versions in group_by_key(stream):
        try:
            value = reconstruct(key, lsn, versions)
        except RedoError:
            if skip_unreadable:
                continue
            raise
        if value is not None:
            yield key, value


def read_key(
    manifest: Manifest, source: LayerSource, key: bytes, lsn: int, ancestors: ManifestLookup | None = None
) -> bytes | None:
    for _, value in read_range(manifest, source, KeyRange(key, key_next(key)), lsn, ancestors):
        return value
    return None
