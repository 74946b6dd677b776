"""Timelines as a whole: import, export, read, layer listing and gc settings.

This is the storage facade the CLI and the workers use; it ties the object store, the
manifest chain and the layer cache together.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from compactor.storage.errors import InvalidInput, NotFound
from compactor.storage.ids import validate_id
from compactor.storage.keys import FULL_KEY_RANGE, KeyRange
from compactor.storage.layer_cache import LayerCache, LayerDownload, after_first
from compactor.storage.layer_file import LayerFileInfo, LayerSink, LayerWriter, RowGroup
from compactor.storage.layer_name import LayerName
from compactor.storage.layout import new_layer_key
from compactor.storage.manifest import GcInfo, LayerEntry, Manifest
from compactor.storage.manifest_store import CommitObserver, ManifestStore
from compactor.storage.object_store import ObjectStore, StoreObserver
from compactor.storage.read_path import read_range
from compactor.storage.settings import Settings
from compactor.storage.timeline_json import FORMAT, ParsedTimeline, parse_timeline, render_layer
from compactor.storage.values import Version

log = logging.getLogger(__name__)

T = TypeVar("T")

Checkpoint = Callable[[str], None]
"""Told where a job's I/O has got to (see :meth:`Storage.reporting`); it may block to hold the
job there, or raise to fail it there."""


def _nowhere(point: str) -> None:
    pass


class Storage:
    """Everything a process needs to work with timelines in one bucket."""

    def __init__(
        self,
        settings: Settings,
        *,
        store_observer: StoreObserver | None = None,
        commit_observer: CommitObserver | None = None,
    ) -> None:
        self.settings = settings
        self.objects = ObjectStore(settings, observer=store_observer)
        self.manifests = ManifestStore(self.objects, observer=commit_observer)
        self.cache = LayerCache(self.objects, settings.cache_dir / "layers", settings.cache_max_bytes)
        self._reached: Checkpoint = _nowhere

    def observed_by(self, observer: StoreObserver) -> Storage:
        """This storage, sharing its clients and cache directory, with every object-store
        request also told to ``observer``: what one job sends, from whichever thread."""
        view = copy.copy(self)
        view.objects = self.objects.observed_by(observer)
        view.manifests = self.manifests.using(view.objects)
        view.cache = LayerCache(view.objects, self.cache.root, self.cache.max_bytes)
        return view

    def reporting(self, reached: Checkpoint) -> Storage:
        """This storage, sharing everything, telling ``reached`` where a job's layer I/O is:
        ``in_download`` before a layer is fetched, ``in_merge`` once a layer's first record batch
        was read (the engine merges as it reads) or a read's first value (image creation builds
        its images by reading), ``in_upload`` once an output layer is uploaded.
        The worker's plugins watch a job through it (``compactor.worker.runtime.plugins``)."""
        view = copy.copy(self)
        view._reached = reached
        return view

    # --- reading --------------------------------------------------------------------------

    def manifest(self, tenant_id: str, timeline_id: str) -> Manifest:
        validate_id(tenant_id, "tenant id")
        validate_id(timeline_id, "timeline id")
        manifest = self.manifests.latest(tenant_id, timeline_id)
        if manifest is None:
            raise NotFound(f"timeline {tenant_id}/{timeline_id} does not exist")
        return manifest

    def ancestor_lookup(self, tenant_id: str) -> Any:
        return lambda timeline_id: self.manifest(tenant_id, timeline_id)

    def read(self, manifest: Manifest, lsn: int, key_range: KeyRange = FULL_KEY_RANGE) -> Iterator[tuple[bytes, bytes]]:
        return self._merging(read_range(manifest, self.cache, key_range, lsn, self.ancestor_lookup(manifest.tenant_id)))

    def layer_versions(self, entry: LayerEntry) -> list[Version]:
        return list(self.cache.versions(entry, FULL_KEY_RANGE))

    # --- what the compaction engine needs (compactor.worker.engine.run.LayerIO) ----------------------------

    def needs_download(self, entry: LayerEntry) -> bool:
        return not self.cache.path_for(entry).exists()

    def download(self, entry: LayerEntry, key_range: KeyRange) -> LayerDownload:
        self._reached("in_download")
        reached = self._reached
        return self.cache.download(entry, key_range, None if reached is _nowhere else lambda: reached("in_merge"))

    def versions(self, entry: LayerEntry, key_range: KeyRange) -> Iterator[Version]:
        return self.cache.versions(entry, key_range)

    def _merging(self, items: Iterator[T]) -> Iterator[T]:
        """``items``, reporting ``in_merge`` once the first was taken."""
        if self._reached is _nowhere:
            return items
        return after_first(items, lambda: self._reached("in_merge"))

    def read_below(
        self, manifest: Manifest, key_range: KeyRange, lsn: int, exclude: set[str]
    ) -> Iterator[tuple[bytes, bytes]]:
        return read_range(
            manifest,
            self.cache,
            key_range,
            lsn,
            self.ancestor_lookup(manifest.tenant_id),
            exclude,
            skip_unreadable=True,
        )

    def open_upload(self, manifest: Manifest) -> LayerSink:
        """A layer upload streamed while its file is written, under a fresh object key."""
        return self.objects.open_upload(new_layer_key(manifest.tenant_id, manifest.timeline_id))

    def upload(self, manifest: Manifest, name: LayerName, file: LayerFileInfo) -> LayerEntry:
        """Complete the upload ``file`` was streamed to, or upload the file if it was not."""
        if file.sink is None:
            entry = self.upload_layer(manifest.tenant_id, manifest.timeline_id, name, file)
        else:
            file.sink.complete()
            entry = LayerEntry(name=str(name), object_key=file.sink.key, size=file.size, xxh3_128=file.xxh3_128)
        self._reached("in_upload")
        return entry

    def delete_uploads(self, entries: list[LayerEntry]) -> None:
        if entries:
            self.objects.delete_many([entry.object_key for entry in entries])

    def row_groups(self, entry: LayerEntry) -> list[RowGroup]:
        """The layer's row-group index (key bounds and sizes), without downloading the layer."""
        return self.cache.footer(entry).index

    # --- writing --------------------------------------------------------------------------

    def upload_layer(self, tenant_id: str, timeline_id: str, name: LayerName, file: LayerFileInfo) -> LayerEntry:
        """Upload a finished local layer file under a fresh object key and describe it."""
        if file.path is None:
            raise ValueError(f"layer {name} was written to its upload only: there is no file to upload")
        key = new_layer_key(tenant_id, timeline_id)
        self.objects.upload_file(file.path, key, metadata={"xxh3_128": file.xxh3_128, "layer": str(name)})
        return LayerEntry(name=str(name), object_key=key, size=file.path.stat().st_size, xxh3_128=file.xxh3_128)

    def write_layer(self, tenant_id: str, timeline_id: str, name: LayerName, versions: Iterable[Version]) -> LayerEntry:
        with tempfile.TemporaryDirectory(dir=self._scratch()) as tmp:
            path = Path(tmp) / "layer.parquet"
            with LayerWriter(path) as writer:
                for version in versions:
                    writer.add(*version)
                info = writer.finish(name)
            return self.upload_layer(tenant_id, timeline_id, name, info)

    def _scratch(self) -> Path:
        scratch = self.settings.cache_dir / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch

    def import_timeline(self, text: str | bytes) -> Manifest:
        """Validate a timeline document, upload its layers and write manifest 0.

        Nothing is left behind on failure: uploaded layers are deleted again.
        """
        parsed = parse_timeline(text)
        self.objects.ensure_bucket()
        if self.manifests.latest(parsed.tenant_id, parsed.timeline_id) is not None:
            raise InvalidInput(f"timeline {parsed.tenant_id}/{parsed.timeline_id} already exists")
        if parsed.ancestor is not None:
            parent = self.manifests.latest(parsed.tenant_id, parsed.ancestor.timeline_id)
            if parent is None:
                raise InvalidInput(f"ancestor timeline {parsed.ancestor.timeline_id} does not exist: import it first")
        uploaded: list[LayerEntry] = []
        try:
            for name, versions in parsed.layers:
                uploaded.append(self.write_layer(parsed.tenant_id, parsed.timeline_id, name, versions))
            manifest = _initial_manifest(parsed, uploaded)
            self.manifests.initialize(manifest)
        except BaseException:
            self.objects.delete_many([entry.object_key for entry in uploaded])
            raise
        log.info(
            "timeline imported tenant=%s timeline=%s layers=%d",
            parsed.tenant_id,
            parsed.timeline_id,
            len(uploaded),
        )
        return manifest

    def export_timeline(self, tenant_id: str, timeline_id: str) -> dict[str, Any]:
        manifest = self.manifest(tenant_id, timeline_id)
        layers = sorted(
            manifest.layers.values(), key=lambda e: (e.layer.lsn_start, e.layer.key_range, e.layer.is_delta)
        )
        return {
            "format": FORMAT,
            "tenant_id": manifest.tenant_id,
            "timeline_id": manifest.timeline_id,
            "ancestor": None if manifest.ancestor is None else manifest.ancestor.model_dump(),
            "gc": manifest.gc.model_dump(),
            "keyspace": None if manifest.keyspace is None else [list(r) for r in manifest.keyspace],
            "settings": manifest.settings.model_dump(),
            "layers": [render_layer(entry.layer, self.layer_versions(entry)) for entry in layers],
        }

    def set_gc(
        self,
        tenant_id: str,
        timeline_id: str,
        cutoff: int,
        retain_lsns: list[int] | None = None,
        leases: list[int] | None = None,
    ) -> Manifest:
        def update(current: Manifest) -> Manifest:
            gc = GcInfo(
                cutoff=cutoff,
                retain_lsns=current.gc.retain_lsns if retain_lsns is None else retain_lsns,
                leases=current.gc.leases if leases is None else leases,
            )
            return current.successor(gc=gc, written_by="set-gc")

        self.manifest(tenant_id, timeline_id)
        committed = self.manifests.commit(tenant_id, timeline_id, update)
        assert committed is not None
        return committed


def _initial_manifest(parsed: ParsedTimeline, entries: list[LayerEntry]) -> Manifest:
    return Manifest(
        tenant_id=parsed.tenant_id,
        timeline_id=parsed.timeline_id,
        number=0,
        ancestor=parsed.ancestor,
        gc=parsed.gc,
        keyspace=parsed.keyspace,
        settings=parsed.settings,
        layers={entry.name: entry for entry in entries},
        written_by="import",
    )


def layer_listing(manifest: Manifest) -> list[dict[str, Any]]:
    """``timeline layers --json``: name, kind, key range, LSN range (exclusive end), size."""
    rows = []
    for entry in sorted(manifest.layers.values(), key=lambda e: (e.layer.lsn_start, e.layer.key_range)):
        layer = entry.layer
        rows.append(
            {
                "name": entry.name,
                "kind": "delta" if layer.is_delta else "image",
                "key_range": [s for s in str(layer.key_range).split("-")],
                "lsn_range": [layer.lsn_start, layer.lsn_end],
                "file_size": entry.size,
            }
        )
    return rows
