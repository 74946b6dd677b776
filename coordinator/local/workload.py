"""Synthetic timelines shaped like a pageserver's, written straight into the bucket.

Used by the benchmarks (``python -m bench``) and by ``compactor demo``. A workload is a
``WorkloadSpec``; ``generate`` writes its layers with ``LayerWriter`` and uploads each one as
soon as it is cut, then creates manifest 0. Memory holds one key's history plus one open writer
per band: the timeline as a whole is never built in memory, so 4 GiB workloads are fine.

Shape of a timeline (LSNs as fractions of the LSN span)::

    1.0  +---------+----------+--------+------   band 3 (L1 deltas, split by key range at
         |         |          |        |          about ``layer_bytes`` each)
    0.75 +--------+---------+---------+-------   band 2        <- gc cutoff (0.7)
    0.5  +----------+--------+---------+------   band 1        <- retain LSN (branch point, 0.45)
    0.25 +---------+---------+----------+-----   band 0        <- lease (0.2)
    0.0  [ image layer(s) at the bottom: the first image of every key ]
         key 0                              key n

Each band and the image layers are cut by their own size, so at their own keys, as L0 compaction
and image creation leave a real timeline: no key partitions the layer map.

Every key's history is a run of segments: a page image followed by a few WAL records (test
records that append bytes), then another image (a full-page image in the WAL), and so on, at
LSNs spread uniformly over the span. Optionally a child timeline branches at the highest retain
LSN and writes records of its own to every ``child_key_every``-th key.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compactor.storage.errors import InvalidInput
from compactor.storage.keys import KEY_MAX, KEY_MIN, key_from_int, key_to_int, parse_key
from compactor.storage.layer_file import LayerWriter
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import Ancestor, GcInfo, LayerEntry, Manifest, TimelineSettings
from compactor.storage.redo import TestRecord
from compactor.storage.timeline import Storage
from compactor.storage.values import ValueKind, Version

MIB = 1 << 20

# A relation block key in the pageserver's encoding; workload keys count up from here.
KEY_BASE = key_to_int(parse_key("000000067F00004005000060F30000000000"))
LSN_BASE = 0x0100_0000
LSN_SPAN = 1 << 32
# Pools of distinct pages and records, each of at least this many bytes: a repeat then never
# falls within one Parquet data page (~1 MiB, compressed on its own) of the same layer, so the
# pools do not flatter the compression.
_POOL_BYTES = 8 * MIB
_CALIBRATION_KEYS = 1500
_TEXT = b"INSERT INTO accounts VALUES (42, 'alice', 1000.00); -- "

Fraction = float


class WorkloadSpec(BaseModel):
    """What to generate. Sizes are bytes of layer files (compressed, as stored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    size_bytes: int = Field(default=64 * MIB, ge=64 * 1024, description="layer bytes of the timeline, approximately")
    layer_bytes: int = Field(default=128 * MIB, ge=64 * 1024, description="target size of each layer")
    bands: int = Field(default=4, ge=1, le=256, description="L1 bands (LSN ranges) of delta layers")
    l0: bool = Field(default=False, description="each band one L0 delta over every key, as a pageserver flushes")
    page_bytes: tuple[int, int] = (8192, 8192)
    record_bytes: tuple[int, int] = Field(default=(16, 200), description="bytes each test record appends")
    records_between_images: tuple[int, int] = (5, 20)
    images_per_key: int = Field(default=3, ge=1, description="segments (image + records) per key")
    base_image_layer: bool = Field(default=True, description="the first image of every key in image layers at LSN 0")
    compressible: Fraction = Field(default=0.5, ge=0, le=1, description="share of a page that is zeros or text")
    cutoff: Fraction = Field(default=0.7, gt=0, le=1, description="gc cutoff within the LSN span")
    retain: list[Fraction] = Field(default_factory=lambda: [0.45], description="retain LSNs (branch points)")
    leases: list[Fraction] = Field(default_factory=lambda: [0.2])
    child: bool = Field(default=False, description="a child timeline branched at the highest retain LSN")
    child_key_every: int = Field(default=4, ge=1)
    verification: bool = Field(default=True, description="the timeline's gc_compaction_verification setting")
    seed: int = 1

    @model_validator(mode="after")
    def _check(self) -> WorkloadSpec:
        for lo, hi in (self.page_bytes, self.record_bytes, self.records_between_images):
            if not 0 <= lo <= hi:
                raise ValueError(f"invalid range ({lo}, {hi})")
        if self.page_bytes[0] < 1:
            raise ValueError("pages need at least one byte")
        for fraction in (*self.retain, *self.leases):
            if not 0 < fraction < self.cutoff:
                raise ValueError(f"retain LSNs and leases must lie inside (0, cutoff): {fraction}")
        if self.child and not self.retain:
            raise ValueError("a child timeline branches at a retain LSN: give at least one")
        return self

    # -- derived LSNs --

    @staticmethod
    def lsn(fraction: Fraction) -> int:
        return LSN_BASE + int(fraction * LSN_SPAN)

    @property
    def cutoff_lsn(self) -> int:
        return self.lsn(self.cutoff)

    @property
    def branch_lsn(self) -> int:
        return self.lsn(max(self.retain))

    def band_edges(self) -> list[int]:
        """LSN bounds of the delta bands: ``bands + 1`` values, the last one exclusive."""
        first = LSN_BASE + 1
        return [first + (LSN_SPAN * b) // self.bands for b in range(self.bands)] + [LSN_BASE + LSN_SPAN + 1]


def _spec(**values: object) -> WorkloadSpec:
    return WorkloadSpec.model_validate(values)


WORKLOADS: dict[str, WorkloadSpec] = {
    # (a) 8 KiB pages, 5-20 small WAL records between images
    "pages": _spec(name="pages"),
    # (b) small values only: 64-256 B images, records of 16-64 B
    "small": _spec(name="small", page_bytes=(64, 256), record_bytes=(16, 64)),
    # (c) little to do: the cutoff near the bottom, nearly all history above it
    "above-horizon": _spec(name="above-horizon", bands=1, cutoff=0.05, retain=[], leases=[]),
    # (d) branchy: several branch points and leases, and a child timeline
    "branchy": _spec(name="branchy", retain=[0.15, 0.3, 0.45, 0.6], leases=[0.1, 0.5], child=True),
}


def preset(name: str, size_bytes: int | None = None, **changes: object) -> WorkloadSpec:
    """A named workload (``WORKLOADS``), resized or otherwise changed."""
    try:
        spec = WORKLOADS[name]
    except KeyError:
        raise InvalidInput(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})") from None
    if size_bytes is not None:
        changes["size_bytes"] = size_bytes
    return WorkloadSpec.model_validate({**spec.model_dump(), **changes}) if changes else spec


def child_timeline_id(timeline_id: str) -> str:
    """The id ``generate`` gives the child timeline of ``timeline_id``."""
    return hashlib.sha256(f"child of {timeline_id}".encode()).hexdigest()[:32]


# --- content -----------------------------------------------------------------------------------


class Content:
    """Deterministic key histories from one seeded random stream."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        rng = random.Random(spec.seed ^ 0x5EED)
        self.pages = [self._page(rng) for _ in range(_pool_size(spec.page_bytes))]
        self.records = [self._record(rng) for _ in range(_pool_size(spec.record_bytes, 10))]
        self._page_no = 0
        self._record_no = 0

    def _page(self, rng: random.Random) -> bytes:
        size = rng.randint(*self.spec.page_bytes)
        filler_len = int(size * self.spec.compressible)
        random_part = rng.randbytes(size - filler_len)
        text = (_TEXT * (filler_len // len(_TEXT) + 1))[:filler_len]
        filler = bytes(filler_len) if rng.random() < 0.5 else text
        return random_part + filler if rng.random() < 0.5 else filler + random_part

    def _record(self, rng: random.Random) -> bytes:
        n = rng.randint(*self.spec.record_bytes)
        append = rng.randbytes(n // 2) + (_TEXT * (n // len(_TEXT) + 1))[: n - n // 2]
        return TestRecord(append, clear=False, will_init=False, only_if=None).payload()

    def next_page(self) -> bytes:
        self._page_no += 1
        return self.pages[self._page_no % len(self.pages)]

    def next_record(self) -> bytes:
        self._record_no += 1
        return self.records[self._record_no % len(self.records)]

    def history(self, key: bytes) -> list[Version]:
        """The key's versions in LSN order: segments of an image and its records."""
        spec, rng = self.spec, self.rng
        kinds: list[int] = []
        for _ in range(spec.images_per_key):
            kinds.append(ValueKind.IMAGE)
            kinds.extend([ValueKind.RECORD] * rng.randint(*spec.records_between_images))
        lsns = sorted(rng.sample(range(LSN_BASE + 1, LSN_BASE + LSN_SPAN + 1), len(kinds)))
        if spec.base_image_layer:
            lsns[0] = LSN_BASE
        return [
            Version(key, lsn, kind, self.next_page() if kind == ValueKind.IMAGE else self.next_record())
            for lsn, kind in zip(lsns, kinds, strict=True)
        ]

    def child_history(self, key: bytes, lsn_start: int, lsn_end: int) -> list[Version]:
        n = self.rng.randint(*self.spec.records_between_images)
        lsns = sorted(self.rng.sample(range(lsn_start, lsn_end), n))
        return [Version(key, lsn, ValueKind.RECORD, self.next_record()) for lsn in lsns]


def _pool_size(sizes: tuple[int, int], overhead: int = 0) -> int:
    return max(64, _POOL_BYTES // (overhead + (sizes[0] + sizes[1]) // 2 + 1))


# --- writing -----------------------------------------------------------------------------------


class Sink:
    """Layers of one LSN range, cut between keys at about the target size and uploaded as soon
    as they are cut; together they cover ``[start key, end key)`` without gaps."""

    def __init__(
        self,
        storage: Storage,
        tenant_id: str,
        timeline_id: str,
        workdir: Path,
        lsn_range: tuple[int, int] | int,  # an int: image layers at that LSN
        target_bytes: int,
        start_key: bytes,
        on_layer: Callable[[LayerEntry], None],
        l0: bool = False,  # one layer over every key, never cut
    ) -> None:
        self.storage, self.tenant_id, self.timeline_id = storage, tenant_id, timeline_id
        self.l0 = l0
        self.workdir = workdir
        self.lsn_range = lsn_range
        self.target_bytes = target_bytes
        self.on_layer = on_layer
        self.entries: list[LayerEntry] = []
        self._writer: LayerWriter | None = None
        self._start_key = start_key
        self._count = 0

    def _name(self, end_key: bytes) -> LayerName:
        if self.l0:
            assert not isinstance(self.lsn_range, int)
            return LayerName.delta(KEY_MIN, KEY_MAX, *self.lsn_range)
        if isinstance(self.lsn_range, int):
            return LayerName.image(self._start_key, end_key, self.lsn_range)
        return LayerName.delta(self._start_key, end_key, *self.lsn_range)

    def put(self, key: bytes, versions: list[Version]) -> None:
        if not versions:
            return
        writer = self._writer
        if writer is not None and writer.estimated_size >= self.target_bytes and not self.l0:
            self._cut(key)
            writer = None
        if writer is None:
            self._count += 1
            path = self.workdir / f"{id(self):x}-{self._count}.parquet"
            writer = self._writer = LayerWriter(path)
        for version in versions:
            writer.add(*version)

    def _cut(self, end_key: bytes) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        name = self._name(end_key)
        info = writer.finish(name)
        try:
            entry = self.storage.upload_layer(self.tenant_id, self.timeline_id, name, info)
        finally:
            info.remove_file()
        self.entries.append(entry)
        self.on_layer(entry)
        self._start_key = end_key

    def finish(self, end_key: bytes) -> list[LayerEntry]:
        self._cut(end_key)
        return self.entries

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _bytes_per_key(spec: WorkloadSpec, workdir: Path) -> float:
    """Layer bytes per key, measured on a sample written the way ``generate`` writes."""
    content = Content(spec)
    path = workdir / "calibration.parquet"
    keys = _CALIBRATION_KEYS
    with LayerWriter(path) as writer:
        for i in range(keys):
            for version in content.history(key_from_int(KEY_BASE + i)):
                writer.add(*version)
        info = writer.finish(LayerName.delta(key_from_int(KEY_BASE), key_from_int(KEY_BASE + keys), 0, 1 << 63))
    path.unlink()
    return info.size / keys


def generate(
    storage: Storage,
    tenant_id: str,
    timeline_id: str,
    spec: WorkloadSpec,
    *,
    workdir: Path | None = None,
    on_layer: Callable[[LayerEntry], None] | None = None,
) -> Manifest:
    """Write the workload's timeline (and its child, if ``spec.child``) and return manifest 0
    of ``timeline_id``. Raises InvalidInput if a timeline exists already; on failure every
    uploaded layer is deleted again."""
    storage.objects.ensure_bucket()
    child_id = child_timeline_id(timeline_id) if spec.child else None
    for tid in (timeline_id, child_id):
        if tid is not None and storage.manifests.latest(tenant_id, tid) is not None:
            raise InvalidInput(f"timeline {tenant_id}/{tid} already exists")
    scratch = workdir or storage.settings.cache_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    uploaded: list[LayerEntry] = []

    def record(entry: LayerEntry) -> None:
        uploaded.append(entry)
        if on_layer is not None:
            on_layer(entry)

    try:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            work = Path(tmp)
            n_keys = max(1, round(spec.size_bytes / _bytes_per_key(spec, work)))
            parent_layers, child_layers = _write_layers(
                storage, tenant_id, timeline_id, child_id, spec, n_keys, work, record
            )
        settings = TimelineSettings(gc_compaction_verification=spec.verification)
        parent = Manifest(
            tenant_id=tenant_id,
            timeline_id=timeline_id,
            number=0,
            gc=GcInfo(
                cutoff=spec.cutoff_lsn,
                retain_lsns=[spec.lsn(f) for f in spec.retain],
                leases=[spec.lsn(f) for f in spec.leases],
            ),
            settings=settings,
            layers={entry.name: entry for entry in parent_layers},
            written_by=f"workload {spec.name}",
        )
        storage.manifests.initialize(parent)
        if child_id is not None:
            branch = spec.branch_lsn
            storage.manifests.initialize(
                Manifest(
                    tenant_id=tenant_id,
                    timeline_id=child_id,
                    number=0,
                    ancestor=Ancestor(timeline_id=timeline_id, lsn=branch),
                    gc=GcInfo(cutoff=branch + LSN_SPAN // 8),
                    settings=settings,
                    layers={entry.name: entry for entry in child_layers},
                    written_by=f"workload {spec.name} (child)",
                )
            )
    except BaseException:
        storage.objects.delete_many([entry.object_key for entry in uploaded])
        raise
    return parent


def _write_layers(
    storage: Storage,
    tenant_id: str,
    timeline_id: str,
    child_id: str | None,
    spec: WorkloadSpec,
    n_keys: int,
    work: Path,
    on_layer: Callable[[LayerEntry], None],
) -> tuple[list[LayerEntry], list[LayerEntry]]:
    start_key, end_key = key_from_int(KEY_BASE), key_from_int(KEY_BASE + n_keys)
    edges = spec.band_edges()

    def sink(timeline: str, lsns: tuple[int, int] | int, l0: bool = False) -> Sink:
        return Sink(storage, tenant_id, timeline, work, lsns, spec.layer_bytes, start_key, on_layer, l0)

    images = sink(timeline_id, LSN_BASE) if spec.base_image_layer else None
    bands = [sink(timeline_id, (edges[b], edges[b + 1]), spec.l0) for b in range(spec.bands)]
    child_range = (spec.branch_lsn + 1, spec.branch_lsn + LSN_SPAN // 4) if spec.child else (0, 0)
    child = sink(child_id, child_range) if child_id is not None else None
    sinks = [s for s in (images, *bands, child) if s is not None]
    content = Content(spec)
    try:
        for i in range(n_keys):
            key = key_from_int(KEY_BASE + i)
            history = content.history(key)
            if images is not None:
                images.put(key, history[:1])
                history = history[1:]
            for band, versions in zip(bands, _split_by_lsn(history, edges), strict=True):
                band.put(key, versions)
            if child is not None and i % spec.child_key_every == 0:
                child.put(key, content.child_history(key, *child_range))
        parent = [entry for s in (images, *bands) if s is not None for entry in s.finish(end_key)]
        return parent, child.finish(end_key) if child is not None else []
    finally:
        for s in sinks:
            s.abort()


def _split_by_lsn(history: list[Version], edges: list[int]) -> Iterator[list[Version]]:
    """The history cut into one (possibly empty) list per band."""
    lsns = [v.lsn for v in history]
    for b in range(len(edges) - 1):
        yield history[bisect.bisect_left(lsns, edges[b]) : bisect.bisect_left(lsns, edges[b + 1])]
