"""Orphan cleanup never touches a referenced object and removes everything else in time."""

import json
import time
from pathlib import Path

import pytest

from coordinator.orphans import collect_orphans
from storage.keys import key_to_int
from storage.layout import layers_prefix, manifests_prefix
from storage.settings import Settings
from storage.timeline import Storage
from tests.test_engine_jobs import history_timeline
from tests.timelines import PARENT, TENANT
from worker.engine import EngineSettings
from worker.jobs import CompactionJob
from worker.runner import compact


@pytest.fixture
def storage(s3_settings: Settings) -> Storage:
    store = Storage(s3_settings)
    store.objects.ensure_bucket()
    return store


def layer_objects(storage: Storage) -> set[str]:
    return {i.key for i in storage.objects.list_keys(layers_prefix(TENANT, PARENT))}


def referenced(storage: Storage) -> set[str]:
    return {e.object_key for e in storage.manifest(TENANT, PARENT).layers.values()}


def test_cleanup_after_compaction_and_failed_upload(storage: Storage, tmp_path: Path) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    compact(storage, CompactionJob(tenant_id=TENANT, timeline_id=PARENT), EngineSettings(workdir=tmp_path / "w"))
    stray = layers_prefix(TENANT, PARENT) + "00-stray-upload-of-a-failed-job"
    storage.objects.put_bytes(stray, b"x")
    manifest = storage.manifest(TENANT, PARENT)
    reads = {k: v for k, v in storage.read(manifest, 100)}
    unreferenced = layer_objects(storage) - referenced(storage)
    assert stray in unreferenced and len(unreferenced) >= 3  # two compacted inputs and the stray

    # inside the grace period: nothing goes
    report = collect_orphans(storage.objects, storage.manifests, grace_s=3600)
    assert report.orphans == [] and report.young == len(unreferenced)

    # an in-flight job older than the objects protects them too
    report = collect_orphans(
        storage.objects,
        storage.manifests,
        grace_s=0,
        inflight_since=lambda t, tl: time.time() - 3600,
        now=time.time() + 5,
    )
    assert report.orphans == []

    # dry run lists, deletes nothing
    report = collect_orphans(storage.objects, storage.manifests, grace_s=0, dry_run=True, now=time.time() + 5)
    assert set(report.orphans) == unreferenced
    assert layer_objects(storage) >= unreferenced

    report = collect_orphans(storage.objects, storage.manifests, grace_s=0, keep_manifests=1, now=time.time() + 5)
    assert set(report.orphans) == unreferenced and not report.errors
    assert layer_objects(storage) == referenced(storage), "orphans left, or a referenced object lost"
    assert report.manifests_pruned == 1
    assert len(list(storage.objects.list_keys(manifests_prefix(TENANT, PARENT)))) == 1
    after = storage.manifest(TENANT, PARENT)
    assert {key_to_int(k): v for k, v in storage.read(after, 100)} == {key_to_int(k): v for k, v in reads.items()}
