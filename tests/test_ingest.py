"""The pageserver-like ingest of ``compactor demo --ingest`` (coordinator/local/ingest.py) on a
real S3 endpoint: L0s as a pageserver flushes them, commits that survive a lost race, and a
model of the reads that the read path agrees with before and after every kind of compaction."""

from itertools import pairwise
from pathlib import Path

from compactor.coordinator.local.ingest import Ingest, IngestSpec
from compactor.coordinator.local.reads import read_digest, retained_lsns, verify_reads
from compactor.storage.manifest import Manifest, TimelineSettings
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.run import EngineSettings
from compactor.worker.runtime.runner import compact

TENANT, MAIN, BRANCH = "ab" * 16, "cd" * 16, "ef" * 16


def test_l0s_follow_one_another_and_the_model_matches_every_read(s3_settings: Settings, tmp_path: Path) -> None:
    storage = Storage(s3_settings)
    spec = IngestSpec(keys=64, l0_bytes=64 * 1024, batches=3, pitr_l0s=2)
    settings = TimelineSettings(
        compaction_threshold=2, checkpoint_distance=spec.l0_bytes, compaction_target_size=1 << 20
    )
    main = Ingest.start(storage, TENANT, MAIN, spec, settings, workdir=tmp_path)
    for i in range(5):
        main.flush()
        if i == 1:
            branch = main.branch(BRANCH)
    branch.flush()
    branch.flush()

    manifest = storage.manifest(TENANT, MAIN)
    l0s = sorted(e.layer for e in manifest.layers.values() if e.layer.is_l0)
    assert [e.name for e in main.flushed] == [str(n) for n in l0s]
    assert all(a.lsn_end == b.lsn_start for a, b in pairwise(l0s)), "a pageserver's L0s leave no LSN gap"
    assert manifest.gc.cutoff == l0s[-3].lsn_end - 1, "the cutoff trails the newest LSN by 2 L0s"
    branch_lsn = storage.manifest(TENANT, BRANCH).ancestor.lsn  # type: ignore[union-attr]
    assert manifest.gc.retain_lsns == [branch_lsn] == [branch.batch_lsns[0]]
    assert len(main.batch_lsns) == 1 + 5 * spec.batches
    for lsn in main.batch_lsns:
        assert read_digest(storage, manifest, lsn) == main.expected([lsn])[lsn]
    assert verify_reads(storage, storage.manifest(TENANT, BRANCH), branch.expected(branch.batch_lsns), "branch") > 0

    engine = EngineSettings(target_layer_bytes=1 << 20, workdir=tmp_path / "work")
    for kind in ("l0", "image", "gc"):
        for timeline in (MAIN, BRANCH):
            compact(
                storage, CompactionJob(tenant_id=TENANT, timeline_id=timeline, kind=kind, force=kind != "gc"), engine
            )
    after = storage.manifest(TENANT, MAIN)
    assert not any(e.layer.is_l0 for e in after.layers.values())
    lsns = {lsn for lsn in main.batch_lsns if lsn >= after.gc.cutoff} | set(retained_lsns(after))
    verify_reads(storage, after, main.expected(lsns), "main")
    verify_reads(storage, storage.manifest(TENANT, BRANCH), branch.expected(branch.batch_lsns), "branch")


def test_a_flush_that_loses_the_manifest_race_commits_on_the_newest_manifest(
    s3_settings: Settings, tmp_path: Path
) -> None:
    """A compaction (here: a gc-info change) commits between the ingest's read of the newest
    manifest and its create: the ingest re-reads and adds its L0 to what won."""
    storage = Storage(s3_settings)
    main = Ingest.start(
        storage, TENANT, MAIN, IngestSpec(keys=16, l0_bytes=16 * 1024), TimelineSettings(), workdir=tmp_path
    )
    other = Storage(s3_settings)
    latest = storage.manifests.latest
    raced: list[Manifest] = []

    def stale_once(tenant: str, timeline: str) -> Manifest | None:
        current = latest(tenant, timeline)
        if not raced and current is not None:
            raced.append(other.set_gc(tenant, timeline, cutoff=42, leases=[7]))
        return current

    storage.manifests.latest = stale_once  # type: ignore[method-assign]
    entry = main.flush()
    newest = other.manifest(TENANT, MAIN)
    assert raced and newest.number == raced[0].number + 1
    assert entry.name in newest.layers and newest.gc.leases == [7] and newest.gc.cutoff == 42
