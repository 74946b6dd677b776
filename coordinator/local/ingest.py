"""A pageserver's ingest as a workload: L0 deltas flushed one after another and committed to the
manifest as a pageserver commits them, with a model of what every read must return.

A pageserver writes the WAL it receives into an in-memory layer and, every ``checkpoint_distance``
bytes, flushes it as an **L0** delta: one layer over every key ``[MIN, MAX)`` and the LSNs since
the previous flush, so the L0s of a timeline follow one another without a gap. ``Ingest`` does
the same with synthetic WAL and commits each L0 with the manifest store's create-only commit,
retrying when a compaction's commit won the race (a compaction never removes what it did not
plan on, so the L0 is simply added to the newest manifest). It can also advance the gc cutoff
behind the newest LSN (a pageserver's PITR window) and branch a child timeline.

Each L0 holds a few *batches*; the versions of one batch share an LSN (a WAL record touching
several pages), so reads change only at batch LSNs and checking the reads at each of them checks
every LSN. A batch mixes WAL records that update a page (test records appending bytes), full-page
images of existing pages, and new pages (an image, or a ``will_init`` record). The LSN advances by
the bytes each batch wrote, as a WAL position does.

The model keeps the newest value of every key and, for each batch LSN, a ``ReadDigest`` of all
reads at that LSN (updated one key at a time), so reads at any LSN can be verified at the end
without keeping old pages.
"""

from __future__ import annotations

import bisect
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from compactor.coordinator.local.reads import ReadDigest
from compactor.coordinator.local.workload import KEY_BASE, LSN_BASE, Content, Sink, WorkloadSpec
from compactor.storage.errors import InvalidInput
from compactor.storage.keys import KEY_MAX, KEY_MIN, key_from_int
from compactor.storage.layer_file import LayerWriter
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import Ancestor, GcInfo, LayerEntry, Manifest, TimelineSettings
from compactor.storage.redo import TestRecord, apply_record
from compactor.storage.timeline import Storage
from compactor.storage.values import ValueKind, Version

MIB = 1 << 20
_ROW_OVERHEAD = 18 + 8 + 1  # key, LSN and kind of a row: its raw bytes besides the value


class IngestSpec(BaseModel):
    """What the ingest writes. ``l0_bytes`` counts raw bytes (key, LSN, kind and value of each
    version), as ``checkpoint_distance`` does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: int = Field(default=2048, ge=1, description="pages of the starting timeline (image layers at LSN_BASE)")
    l0_bytes: int = Field(default=2 * MIB, ge=4096, description="raw bytes of one L0: about checkpoint_distance")
    batches: int = Field(default=4, ge=1, description="LSNs in one L0")
    new_pages: float = Field(default=0.05, ge=0, le=1, description="share of versions that start a new page")
    images: float = Field(default=0.1, ge=0, le=1, description="share of versions that are full-page images")
    page_bytes: tuple[int, int] = (8192, 8192)
    record_bytes: tuple[int, int] = Field(default=(64, 512), description="bytes each WAL record appends")
    compressible: float = Field(default=0.5, ge=0, le=1, description="share of a page that is zeros or text")
    pitr_l0s: int = Field(default=0, ge=0, description="the gc cutoff trails the newest LSN by this many L0s; 0: unset")
    model: bool = Field(default=True, description="keep the model of every read (the benchmarks need none)")
    seed: int = 1

    def content(self) -> Content:
        return Content(
            WorkloadSpec(
                page_bytes=self.page_bytes,
                record_bytes=self.record_bytes,
                compressible=self.compressible,
                seed=self.seed,
            )
        )


class Ingest:
    """One timeline's ingest (see the module doc). ``start`` makes a new timeline; ``branch``
    a child of this one that ingests on its own."""

    def __init__(
        self,
        storage: Storage,
        tenant_id: str,
        timeline_id: str,
        spec: IngestSpec,
        *,
        lsn: int,
        pages: dict[bytes, bytes],
        digest: ReadDigest,
        next_key: int,
        workdir: Path,
        seed: int,
    ) -> None:
        self.storage, self.tenant_id, self.timeline_id, self.spec = storage, tenant_id, timeline_id, spec
        self.lsn = lsn  # where the next L0 starts
        self.pages = pages  # the newest value of every key (with the model off: every key, values empty)
        self.keys = sorted(pages)
        self.digest = digest
        self.history: list[tuple[int, ReadDigest]] = [(lsn - 1, digest.copy())]  # after each batch LSN
        self.next_key = next_key
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.content = spec.content()
        self.flushed: list[LayerEntry] = []  # every L0 this ingest committed, oldest first
        self.l0_lsns: list[int] = []  # where each of them ends

    @classmethod
    def start(
        cls,
        storage: Storage,
        tenant_id: str,
        timeline_id: str,
        spec: IngestSpec,
        settings: TimelineSettings,
        *,
        workdir: Path | None = None,
    ) -> Ingest:
        """A new timeline: every one of ``spec.keys`` pages in image layers at LSN_BASE (cut at
        about ``compaction_target_size``, as image creation cuts them) in manifest 0."""
        storage.objects.ensure_bucket()
        if storage.manifests.latest(tenant_id, timeline_id) is not None:
            raise InvalidInput(f"timeline {tenant_id}/{timeline_id} already exists")
        work = workdir or storage.settings.cache_dir / "scratch"
        work.mkdir(parents=True, exist_ok=True)
        uploaded: list[LayerEntry] = []
        content = spec.content()
        pages: dict[bytes, bytes] = {}
        digest = ReadDigest()
        try:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                start_key = key_from_int(KEY_BASE)
                sink = Sink(
                    storage, tenant_id, timeline_id, Path(tmp), LSN_BASE, settings.compaction_target_size,
                    start_key, uploaded.append,
                )  # fmt: skip
                try:
                    for i in range(spec.keys):
                        key, page = key_from_int(KEY_BASE + i), content.next_page()
                        sink.put(key, [Version(key, LSN_BASE, ValueKind.IMAGE, page)])
                        pages[key] = page if spec.model else b""
                        if spec.model:
                            digest.add(key, page)
                    sink.finish(key_from_int(KEY_BASE + spec.keys))
                finally:
                    sink.abort()
            storage.manifests.initialize(
                Manifest(
                    tenant_id=tenant_id,
                    timeline_id=timeline_id,
                    number=0,
                    settings=settings,
                    layers={entry.name: entry for entry in uploaded},
                    written_by="ingest",
                )
            )
        except BaseException:
            storage.objects.delete_many([entry.object_key for entry in uploaded])
            raise
        return cls(
            storage, tenant_id, timeline_id, spec,
            lsn=LSN_BASE + 1, pages=pages, digest=digest, next_key=KEY_BASE + spec.keys, workdir=work, seed=spec.seed,
        )  # fmt: skip

    # --- writing ---------------------------------------------------------------------------

    def flush(self) -> LayerEntry:
        """Write the next L0, upload it and commit it (with the gc cutoff moved up behind it,
        when ``pitr_l0s`` is set); returns its manifest entry."""
        start = self.lsn
        versions: list[Version] = []
        for _ in range(self.spec.batches):
            versions += self._batch(self.spec.l0_bytes // self.spec.batches)
        name = LayerName.delta(KEY_MIN, KEY_MAX, start, self.lsn)
        versions.sort()
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp, LayerWriter(Path(tmp) / "l0.parquet") as writer:
            writer.add_rows(versions)
            info = writer.finish(name)
            entry = self.storage.upload_layer(self.tenant_id, self.timeline_id, name, info)
        self.l0_lsns.append(self.lsn)
        # The gc cutoff: the last LSN of the L0 flushed pitr_l0s flushes ago (none yet: unset).
        pitr = self.spec.pitr_l0s
        cutoff = self.l0_lsns[-1 - pitr] - 1 if 0 < pitr < len(self.l0_lsns) else 0

        def add(current: Manifest) -> Manifest:
            gc = current.gc.model_copy(update={"cutoff": max(current.gc.cutoff, cutoff)})
            return current.successor(layers={**current.layers, entry.name: entry}, gc=gc, written_by="ingest")

        try:
            self.storage.manifests.commit(self.tenant_id, self.timeline_id, add)
        except BaseException:
            self.storage.delete_uploads([entry])
            raise
        self.flushed.append(entry)
        return entry

    def _batch(self, budget: int) -> list[Version]:
        """One LSN's versions, of about ``budget`` raw bytes, each of a different key."""
        spec, rng, content = self.spec, self.rng, self.content
        lsn, written, out = self.lsn, 0, []
        touched: set[bytes] = set()
        while written < budget:
            draw = rng.random()
            # Once a batch has touched half the pages, a new page rather than a long search for
            # one it has not touched (a key has one version per LSN).
            if draw < spec.new_pages or len(touched) >= len(self.keys) // 2:
                key = key_from_int(self.next_key)
                self.next_key += 1
                self.keys.append(key)
                page = content.next_page()
                if rng.random() < 0.5:
                    version = Version(key, lsn, ValueKind.IMAGE, page)
                else:
                    init = TestRecord(page, clear=True, will_init=True, only_if=None).payload()
                    version = Version(key, lsn, ValueKind.INIT_RECORD, init)
            else:
                key = self.keys[rng.randrange(len(self.keys))]
                if key in touched:
                    continue
                if draw < spec.new_pages + spec.images:
                    version = Version(key, lsn, ValueKind.IMAGE, content.next_page())
                else:
                    version = Version(key, lsn, ValueKind.RECORD, content.next_record())
            touched.add(key)
            out.append(version)
            written += _ROW_OVERHEAD + len(version.payload)
            if spec.model:
                self._apply(version)
        self.lsn += written  # a WAL position advances by what was written
        self.history.append((lsn, self.digest.copy()))
        return out

    def _apply(self, version: Version) -> None:
        key, old = version.key, self.pages.get(version.key)
        if version.kind == ValueKind.IMAGE:
            page = version.payload
        else:
            page = apply_record(old if old is not None and version.kind == ValueKind.RECORD else b"", version.payload)
        if old is not None:
            self.digest.remove(key, old)
        self.digest.add(key, page)
        self.pages[key] = page

    def branch(self, child_id: str) -> Ingest:
        """A child timeline branched at the newest LSN written here: the branch point becomes a
        retain LSN of this timeline first, then the child's manifest 0 (no layers of its own)."""
        branch_lsn = self.history[-1][0]

        def retain(current: Manifest) -> Manifest:
            retain_lsns = sorted({*current.gc.retain_lsns, branch_lsn})
            return current.successor(gc=current.gc.model_copy(update={"retain_lsns": retain_lsns}), written_by="ingest")

        parent = self.storage.manifests.commit(self.tenant_id, self.timeline_id, retain)
        assert parent is not None
        self.storage.manifests.initialize(
            Manifest(
                tenant_id=self.tenant_id,
                timeline_id=child_id,
                number=0,
                ancestor=Ancestor(timeline_id=self.timeline_id, lsn=branch_lsn),
                gc=GcInfo(),
                settings=parent.settings,
                written_by="ingest (branch)",
            )
        )
        return Ingest(
            self.storage, self.tenant_id, child_id, self.spec.model_copy(update={"pitr_l0s": 0}),
            lsn=branch_lsn + 1, pages=dict(self.pages), digest=self.digest.copy(), next_key=self.next_key,
            workdir=self.workdir, seed=self.rng.getrandbits(32),
        )  # fmt: skip

    # --- what reads must return ------------------------------------------------------------

    @property
    def batch_lsns(self) -> list[int]:
        """Every LSN at which this timeline's reads changed (its start included)."""
        return [lsn for lsn, _ in self.history]

    def expected(self, lsns: Iterable[int]) -> dict[int, ReadDigest]:
        """What reads at each of ``lsns`` must return: the state after the newest batch at or
        below it. Only with the model on, and not below the timeline's start."""
        if not self.spec.model:
            raise ValueError("the ingest kept no model of its reads")
        starts = self.batch_lsns
        out = {}
        for lsn in lsns:
            at = bisect.bisect_right(starts, lsn) - 1
            if at < 0:
                raise ValueError(f"LSN {lsn} lies below the start of timeline {self.timeline_id}")
            out[lsn] = self.history[at][1]
        return out
