"""Whole gc-compaction jobs against a real S3 endpoint: commit, dry run, failures that change
nothing, guards, and statistics."""

import json
from pathlib import Path

import pytest

from compactor.storage.errors import CompactorError, RedoError
from compactor.storage.keys import format_key, key_from_int, key_to_int
from compactor.storage.manifest import Manifest, TimelineSettings
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine import run as engine
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.run import CompactionFailed, EngineSettings
from compactor.worker.runtime.runner import compact
from tests.timelines import PARENT, TENANT, Layer, Timeline, Value, record


@pytest.fixture
def storage(s3_settings: Settings) -> Storage:
    store = Storage(s3_settings)
    store.objects.ensure_bucket()
    return store


def engine_settings(tmp_path: Path, target: int = 1 << 20) -> EngineSettings:
    return EngineSettings(target_layer_bytes=target, workdir=tmp_path / "work")


def history_timeline(extra: dict[int, list[Value]] | None = None, **kwargs: object) -> Timeline:
    """Keys 0..7 with an image at 10 and a record every 10 LSNs up to 90."""
    values: dict[int, list[Value]] = {}
    for k in range(8):
        values[k] = [Value(10, image=f"k{k}".encode())] + [
            Value(lsn, record=record(f"+{lsn}".encode())) for lsn in range(20, 100, 10)
        ]
    values.update(extra or {})
    layers = [
        Layer("delta", (0, 8), (10, 50), {k: [v for v in vs if v.lsn < 50] for k, vs in values.items()}),
        Layer("delta", (0, 8), (50, 100), {k: [v for v in vs if v.lsn >= 50] for k, vs in values.items()}),
    ]
    return Timeline(PARENT, layers, **kwargs)  # type: ignore[arg-type]


def read_all(storage: Storage, manifest: Manifest, lsn: int) -> dict[int, bytes]:
    return {key_to_int(k): v for k, v in storage.read(manifest, lsn)}


def objects(storage: Storage) -> set[str]:
    return {info.key for info in storage.objects.list_keys("tenants/")}


def job(**kwargs: object) -> CompactionJob:
    return CompactionJob(tenant_id=TENANT, timeline_id=PARENT, **kwargs)  # type: ignore[arg-type]


def test_full_job_commits_and_keeps_reads(storage: Storage, tmp_path: Path) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=60, retain_lsns=[30]).to_json()))
    before = storage.manifest(TENANT, PARENT)
    expected = {lsn: read_all(storage, before, lsn) for lsn in (30, 60, 70, 90, 100)}
    outcome = compact(storage, job(), engine_settings(tmp_path))
    after = storage.manifest(TENANT, PARENT)
    assert outcome.manifest_number == after.number == before.number + 1
    assert {lsn: read_all(storage, after, lsn) for lsn in expected} == expected
    # an image layer at the lowest retain LSN, and deltas above it
    assert any(not n.is_delta and n.image_lsn == 30 for n in after.layer_names())
    stats = outcome.stats
    assert stats is not None
    assert stats.num_unique_keys_visited == 8
    assert stats.image_keys_visited.num == 8 and stats.wal_keys_visited.num == 64
    assert stats.image_layer_produced.num >= 1 and stats.delta_layer_visited.num == 2
    assert stats.compressed_retention_ratio > 0
    # twice: nothing changes
    again = compact(storage, job(), engine_settings(tmp_path))
    assert again.manifest_number is None
    assert storage.manifest(TENANT, PARENT).layers == after.layers


def test_dry_run_writes_nothing_but_reports(storage: Storage, tmp_path: Path) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    before_objects = objects(storage)
    before = storage.manifest(TENANT, PARENT)
    outcome = compact(storage, job(dry_run=True), engine_settings(tmp_path))
    assert outcome.manifest_number is None
    assert storage.manifest(TENANT, PARENT).number == before.number
    assert objects(storage) == before_objects
    assert outcome.stats is not None and outcome.stats.image_produced.num == 8
    assert outcome.proposal is not None and outcome.proposal.removed  # what it would remove


def test_partial_key_range_rewrites_straddling_deltas(storage: Storage, tmp_path: Path) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    before = storage.manifest(TENANT, PARENT)
    expected = {lsn: read_all(storage, before, lsn) for lsn in (60, 80, 100)}
    compact(
        storage,
        job(key_start=format_key(key_from_int(2)), key_end=format_key(key_from_int(5))),
        engine_settings(tmp_path),
    )
    after = storage.manifest(TENANT, PARENT)
    assert {lsn: read_all(storage, after, lsn) for lsn in expected} == expected
    ranges = {
        (key_to_int(n.key_range.start), key_to_int(n.key_range.end), n.lsn_start)
        for n in after.layer_names()
        if n.is_delta
    }
    # the pieces before and after the job keep the original LSN ranges
    assert {(0, 2, 10), (5, 8, 10), (0, 2, 50), (5, 8, 50)} <= ranges


def test_lsn_range_start_reads_below_through_read_path(storage: Storage, tmp_path: Path) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=80).to_json()))
    before = storage.manifest(TENANT, PARENT)
    expected = {lsn: read_all(storage, before, lsn) for lsn in (80, 90, 100)}
    compact(storage, job(lsn_start=55), engine_settings(tmp_path))
    after = storage.manifest(TENANT, PARENT)
    assert {lsn: read_all(storage, after, lsn) for lsn in expected} == expected
    # the lower band is untouched; no image layer (data below)
    assert any(n.lsn_range == (10, 50) for n in after.layer_names())
    assert all(n.is_delta for n in after.layer_names())


def test_redo_failure_fails_the_job_and_changes_nothing(storage: Storage, tmp_path: Path) -> None:
    bad = {3: [Value(10, image=b"k3"), Value(20, record=record(b"x", only_if=b"not-the-page"))]}
    storage.import_timeline(json.dumps(history_timeline(bad, cutoff=60).to_json()))
    before_objects = objects(storage)
    before = storage.manifest(TENANT, PARENT)
    with pytest.raises(RedoError, match=r"key 0+3.*only_if"):
        compact(storage, job(), engine_settings(tmp_path))
    assert storage.manifest(TENANT, PARENT) == before
    assert objects(storage) == before_objects, "a failed job left objects behind"


def test_verification_fails_job_on_unreadable_retained_lsn(storage: Storage, tmp_path: Path) -> None:
    # A broken record above the horizon: building images never touches it, only verification does.
    bad = {3: [Value(10, image=b"k3"), Value(90, record=record(b"x", only_if=b"nope"))]}
    tl = history_timeline(bad, cutoff=60)
    storage.import_timeline(json.dumps(tl.to_json()))
    before = storage.manifest(TENANT, PARENT)
    with pytest.raises(RedoError, match="verification failed"):
        compact(storage, job(), engine_settings(tmp_path))
    assert storage.manifest(TENANT, PARENT) == before
    # with verification off (per-timeline setting), the job goes through
    storage.manifests.commit(
        TENANT, PARENT, lambda m: m.successor(settings=TimelineSettings(gc_compaction_verification=False))
    )
    assert compact(storage, job(), engine_settings(tmp_path)).manifest_number is not None


@pytest.mark.parametrize("guard", ["disk", "memory", "rewrites", "key-history"])
def test_guards_fail_with_clear_errors(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guard: str
) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    before = storage.manifest(TENANT, PARENT)
    if guard == "disk":
        monkeypatch.setattr(engine.shutil, "disk_usage", lambda _: type("U", (), {"free": 10})())
        message = "not enough disk"
    elif guard == "memory":
        monkeypatch.setattr(engine, "MAX_ESTIMATED_MEMORY_MB", -1.0)
        message = "estimated memory usage is too high"
    elif guard == "rewrites":
        monkeypatch.setattr(engine, "_too_many_rewrites", lambda selected, rewrite: True)
        message = "too many layers to rewrite"
    else:
        monkeypatch.setattr(engine, "MAX_KEY_HISTORY_BYTES", 10)
        message = "too many values for a single key"
    with pytest.raises(CompactionFailed, match=message) as err:
        compact(storage, job(), engine_settings(tmp_path))
    assert "\n" not in str(err.value)
    assert storage.manifest(TENANT, PARENT) == before


def test_branch_compaction_uses_ancestor_images_and_no_image_layers(storage: Storage, tmp_path: Path) -> None:
    from tests.timelines import CHILD

    parent = history_timeline(retain_lsns=[55])

    def band(lo: int, hi: int) -> Layer:
        values = {
            k: [Value(lsn, record=record(f"c{lsn}".encode())) for lsn in range(60, 120, 10) if lo <= lsn < hi]
            for k in range(8)
        }
        return Layer("delta", (0, 8), (lo, hi), values)

    # two bands, so the output (one band [55, 120)) differs from every input layer
    child_layers = [band(55, 90), band(90, 120)]
    child = Timeline(CHILD, child_layers, ancestor=(PARENT, 55), cutoff=100)
    storage.import_timeline(json.dumps(parent.to_json()))
    storage.import_timeline(json.dumps(child.to_json()))
    tl = storage.manifest(TENANT, CHILD)
    expected = {lsn: read_all(storage, tl, lsn) for lsn in (100, 110, 120)}
    outcome = compact(storage, CompactionJob(tenant_id=TENANT, timeline_id=CHILD), engine_settings(tmp_path))
    after = storage.manifest(TENANT, CHILD)
    assert outcome.manifest_number is not None
    assert all(n.is_delta for n in after.layer_names()), "branches get no image layers"
    assert {lsn: read_all(storage, after, lsn) for lsn in expected} == expected


def test_compactor_errors_are_one_line() -> None:
    assert issubclass(CompactionFailed, CompactorError)
