"""Orphan cleanup never touches a referenced object and removes everything else in time."""

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from compactor.coordinator.jobs.orphans import Inflight, collect_orphans
from compactor.storage.keys import key_to_int
from compactor.storage.layout import layers_prefix, manifests_prefix
from compactor.storage.settings import Settings
from compactor.storage.timeline import Storage
from compactor.worker.engine.jobs import CompactionJob
from compactor.worker.engine.run import EngineSettings
from compactor.worker.runtime.runner import compact
from tests.test_engine_jobs import history_timeline
from tests.timelines import PARENT, TENANT


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
        inflight=Inflight(started={(TENANT, PARENT): time.time() - 3600}),
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


def test_cli_gc_orphans_reports_and_spares_in_flight_timelines(
    storage: Storage, s3_settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from compactor.coordinator.cli.main import main
    from compactor.coordinator.jobs.meta_jobs import create_meta_job
    from compactor.worker.runtime.payloads import CompactRequest
    from compactor.worker.runtime.records import JobRecords
    from compactor.worker.runtime.redis_client import connect

    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    stray = layers_prefix(TENANT, PARENT) + "00-stray"
    storage.objects.put_bytes(stray, b"x")
    env = {
        "COMPACTOR_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url or "",
        "COMPACTOR_S3_BUCKET": s3_settings.s3_bucket,
        "COMPACTOR_S3_ACCESS_KEY_ID": "testing-key",
        "COMPACTOR_S3_SECRET_ACCESS_KEY": "testing-secret",
        "COMPACTOR_REDIS_URL": redis_url,
        "COMPACTOR_CACHE_DIR": str(tmp_path / "c"),
    }
    time.sleep(1.1)  # object timestamps have one-second resolution
    runner = CliRunner()
    res = runner.invoke(main, ["gc-orphans", "--grace", "0", "--dry-run"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["would_delete"] == [stray]
    # a meta job in flight protects what was uploaded since (and a margin before) it started
    settings = s3_settings.model_copy(update={"redis_url": redis_url})
    create_meta_job(JobRecords(connect(settings)), CompactRequest(tenant_id=TENANT, timeline_id=PARENT))
    storage.objects.put_bytes(stray + "-2", b"x")
    time.sleep(1.1)
    res = runner.invoke(main, ["gc-orphans", "--grace", "0"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["orphans"] == 0
    assert stray in layer_objects(storage) and stray + "-2" in layer_objects(storage)


def test_old_multipart_uploads_are_aborted_young_ones_spared(storage: Storage) -> None:
    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    client, bucket = storage.objects.client, storage.objects.bucket
    now = time.time()
    prefix = layers_prefix(TENANT, PARENT)
    ages = {prefix + "old": 7200, prefix + "mid": 1800, prefix + "young": 60}
    outside = manifests_prefix(TENANT, PARENT) + "not-a-layer"
    for key in [*ages, outside]:
        client.create_multipart_upload(Bucket=bucket, Key=key)

    # The test server reports one fixed initiation time; give each upload its age.
    def initiated(parsed: dict[str, Any], **_: object) -> None:
        for upload in parsed.get("Uploads", []):
            upload["Initiated"] = datetime.fromtimestamp(now - ages.get(upload["Key"], 0), UTC)

    client.meta.events.register("after-call.s3.ListMultipartUploads", initiated)

    def in_progress() -> set[str]:
        return {u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    report = collect_orphans(storage.objects, storage.manifests, grace_s=600, dry_run=True, now=now)
    assert sorted(report.uploads) == [prefix + "mid", prefix + "old"] and report.young_uploads == 1
    assert in_progress() == {*ages, outside}

    # a meta job in flight since an hour ago may own the upload started after it
    report = collect_orphans(
        storage.objects, storage.manifests, grace_s=600, inflight=Inflight(started={(TENANT, PARENT): now - 3600})
    )
    assert report.uploads == [prefix + "old"] and report.young_uploads == 2 and not report.errors
    assert in_progress() == {prefix + "mid", prefix + "young", outside}

    report = collect_orphans(storage.objects, storage.manifests, grace_s=600, now=now)
    assert report.uploads == [prefix + "mid"] and report.summary()["multipart_uploads_aborted"] == 1
    assert in_progress() == {prefix + "young", outside}, "a young upload or one outside the layers was aborted"


def test_pruning_keeps_the_manifest_an_in_flight_meta_job_was_planned_on(storage: Storage) -> None:
    """Sub-jobs load the manifest their meta job was planned on: however many commits land
    meanwhile, pruning keeps it (and those after it) while the meta job is in flight."""
    storage.import_timeline(json.dumps(history_timeline(cutoff=60).to_json()))
    for _ in range(5):
        storage.set_gc(TENANT, PARENT, 60)
    newest = storage.manifest(TENANT, PARENT).number
    planned_on = newest - 3
    inflight = Inflight(planned_on={(TENANT, PARENT): planned_on})
    report = collect_orphans(storage.objects, storage.manifests, grace_s=0, keep_manifests=1, inflight=inflight)
    assert report.manifests_pruned == planned_on and not report.errors
    assert storage.manifests.load(TENANT, PARENT, planned_on).number == planned_on
    report = collect_orphans(storage.objects, storage.manifests, grace_s=0, keep_manifests=1)
    assert report.manifests_pruned == 3, "once it ended, only the newest is kept"
