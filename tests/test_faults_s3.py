"""Fault suite, object store: S3 errors, resets, timeouts, truncated and slow responses
injected by the loopback proxy (``tests.faultproxy``) between the services and the moto server.

Every rule is scoped to the scenario's own timeline (its id is in every object key), so the
coordinator's work on other timelines does not use up the faults. Transient faults must be
absorbed (the job succeeds); persistent ones must fail the job with a clear one-line error and
commit nothing, after which the same request succeeds once S3 is healthy. The invariants of
``tests.faultkit.check_invariants`` hold after every scenario.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from compactor.worker.runtime.records import JobState
from tests.faultkit import (
    FaultStack,
    FaultSummary,
    check_invariants,
    commits_by,
    fault_summary,  # noqa: F401 - the session fixture
    make_fault_stack,
    new_timeline,
    set_fault,
    submit,
    wait_ended,
    wait_hit,
)
from tests.faultproxy import Rule
from tests.timelines import TENANT

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, fault_summary: FaultSummary) -> Iterator[FaultStack]:  # noqa: F811
    # No periodic orphan cleanup here: its reads of every timeline would use up faults aimed
    # at a scenario's commit.
    yield from make_fault_stack(
        tmp_path_factory.mktemp("faults-s3"), fault_summary, env={"COMPACTOR_ORPHAN_INTERVAL_S": "0"}
    )


def _rules(tid: str) -> dict[str, list[Rule]]:
    layers = f"/{tid}/layers/"
    return {
        "503 on downloads": [Rule("error", method="GET", path=layers, status=503, code="SlowDown", times=4)],
        "500 on uploads": [Rule("error", method="PUT", path=layers, status=500, code="InternalError", times=3)],
        # At most two in a row: within one call's retries (COMPACTOR_S3_MAX_ATTEMPTS=3). More would
        # be a persistent failure; planning does not retry beyond the store's own attempts.
        "resets on listings": [Rule("reset", method="GET", path=f"list-type=2.*{tid}", times=2)],
        "timeouts on downloads": [Rule("timeout", method="GET", path=layers, delay_s=2.5, times=2)],
        "truncated downloads": [Rule("truncate", method="GET", path=layers, times=3)],
        "slow responses": [Rule("slow", path=tid, delay_s=0.08, trickle_s=0.002)],
        "manifest write answer lost": [Rule("lost_response", method="PUT", path=f"/{tid}/manifests/", times=2)],
        "503 on manifest reads": [Rule("error", method="GET", path=f"/{tid}/manifest", status=503, times=2)],
        "flaky everything": [
            Rule("error", path=tid, status=503, code="SlowDown", probability=0.12, times=25),
            Rule("reset", path=tid, probability=0.04, times=8),
        ],
    }


@pytest.mark.parametrize("scenario", list(_rules("0" * 32)))
def test_transient_s3_faults_are_absorbed(fs: FaultStack, scenario: str) -> None:
    fs.ready()
    tid, tl = new_timeline(fs, bands=4, seed=hash(scenario) % 1000)
    rules = [fs.proxy.add(rule) for rule in _rules(tid)[scenario]]
    try:
        job_id = submit(fs, tid, parts=3)
        meta = wait_ended(fs, job_id)
    finally:
        for rule in rules:
            rule.times = rule.injected  # spent: no further faults for this timeline
    injected = sum(rule.injected for rule in rules)
    assert injected, f"no fault was injected in {scenario!r}"
    jobs = [job_id]
    if scenario == "flaky everything" and meta.state != JobState.SUCCEEDED:
        # Random faults may outlast every retry and attempt: then the job must say why, and the
        # same request must succeed on a healthy store.
        assert meta.state == JobState.FAILED and meta.error, meta
        jobs.append(submit(fs, tid, parts=3))
    checked = check_invariants(fs, {tid: tl}, tid, jobs, kind=f"s3 {scenario}", expect=None)
    assert wait_ended(fs, jobs[-1]).state == JobState.SUCCEEDED
    assert checked.reads > 0


@pytest.mark.parametrize(
    ("what", "rule"),
    [
        ("downloads", lambda tid: Rule("error", method="GET", path=f"/{tid}/layers/", status=503, code="SlowDown")),
        ("uploads", lambda tid: Rule("error", method="PUT", path=f"/{tid}/layers/", status=500, code="InternalError")),
    ],
)
def test_persistent_s3_failure_fails_clearly_commits_nothing_and_rerun_succeeds(
    fs: FaultStack, what: str, rule: object
) -> None:
    fs.ready()
    tid, tl = new_timeline(fs, bands=3, seed=11)
    before = fs.direct.manifest(TENANT, tid)
    added = fs.proxy.add(rule(tid))  # type: ignore[operator]
    try:
        job_id = submit(fs, tid, sub_compaction=False)
        meta = wait_ended(fs, job_id, timeout_s=120)
    finally:
        added.times = added.injected
    assert meta.state == JobState.FAILED, meta
    assert meta.error and "\n" not in meta.error and "s3 " in meta.error, meta.error
    sub = fs.records.get_sub(meta.sub_jobs[0])
    assert sub is not None and sub.attempt == int(fs.settings.max_attempts), "every attempt was tried"
    print(f"\n[s3 persistent {what}] {meta.error}")
    after = fs.direct.manifest(TENANT, tid)
    assert after.layers == before.layers, "a failed job changed the layer map"
    rerun = submit(fs, tid, sub_compaction=False)
    check_invariants(fs, {tid: tl}, tid, [job_id, rerun], kind=f"s3 persistent {what}", expect=None)
    assert wait_ended(fs, rerun).state == JobState.SUCCEEDED


@pytest.mark.parametrize("how", ["answer lost, retries fail", "boundary check fails"])
def test_manifest_written_but_the_writer_cannot_tell(fs: FaultStack, how: str) -> None:
    """The new manifest lands, but the writer sees an error: the answer to its PUT is lost and
    every retry fails, or the boundary read right after the PUT fails. The outcome is unknown
    to the worker; it must not delete the layers the manifest may now reference."""
    fs.ready()
    tid, tl = new_timeline(fs, bands=3, seed=12)
    job_id = os.urandom(16).hex()
    set_fault(fs, "pause_before_commit", job_id, seconds=0.5, once=True)
    submit(fs, tid, job_id=job_id, sub_compaction=False)
    wait_hit(fs, "pause_before_commit", job_id)
    if how == "answer lost, retries fail":
        rules = [
            fs.proxy.add(Rule("lost_response", method="PUT", path=f"/{tid}/manifests/", times=1)),
            fs.proxy.add(Rule("error", method="PUT", path=f"/{tid}/manifests/", status=503, times=2)),
        ]
    else:
        rules = [fs.proxy.add(Rule("error", method="GET", path=f"/{tid}/manifest-boundary", status=503, times=3))]
    try:
        wait_ended(fs, job_id)
    finally:
        for rule in rules:
            rule.times = rule.injected
    assert all(rule.injected for rule in rules), [(r.action, r.injected) for r in rules]
    check_invariants(fs, {tid: tl}, tid, [job_id], kind=f"s3 manifest outcome unknown ({how})")
    commits = commits_by(fs, tid)
    assert len(commits[f"meta job {job_id}"]) == 1, commits
