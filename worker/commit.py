"""The optimistic commit of a compaction (DESIGN.md, data flow step 3).

A proposal is valid against the newest manifest only if the world it was planned in still holds
where it matters: every selected layer is present, no layer the planner did not know about holds
keys of the range at or below ``max_layer_lsn``, and the LSNs whose reads must survive are the
same. The next manifest is then written create-only; a lost race re-reads and re-validates. Safety
never depends on any lock.
"""

import logging

from storage.errors import ManifestConflict
from storage.manifest import Manifest
from storage.manifest_store import ManifestStore
from worker.jobs import CommitProposal
from worker.plan import conflicting_layers

log = logging.getLogger(__name__)


def validate(proposal: CommitProposal, newest: Manifest) -> None:
    """Raise ``ManifestConflict`` with the reason if ``proposal`` cannot apply to ``newest``."""
    rs = proposal.read_set
    missing = [name for name in rs.selected if name not in newest.layers]
    if missing:
        raise ManifestConflict(f"selected layer {missing[0]} is gone (removed by another commit)")
    known = set(rs.selected) | set(rs.others)
    key_range = proposal.job.key_range
    for name in conflicting_layers(newest, key_range, rs.max_layer_lsn):
        if name not in known:
            raise ManifestConflict(f"layer {name} appeared in the key range at or below LSN {rs.max_layer_lsn}")
    if newest.gc.cutoff < rs.horizon:
        raise ManifestConflict(f"gc cutoff moved back to {newest.gc.cutoff}, below the job's horizon {rs.horizon}")
    retained = sorted(set(newest.gc.retained_below(rs.horizon)))
    if retained != rs.retain_lsns:
        raise ManifestConflict(f"retain LSNs/leases below the horizon changed: {rs.retain_lsns} -> {retained}")
    # An added layer may replace a removed one of the same name (see the engine's discard rule).
    clash = [e.name for e in proposal.added if e.name in newest.layers and e.name not in proposal.removed]
    if clash:
        raise ManifestConflict(f"output layer {clash[0]} already exists")


def apply(proposal: CommitProposal, newest: Manifest, written_by: str) -> Manifest:
    """The successor of ``newest`` with the proposal applied (validate first)."""
    layers = {name: entry for name, entry in newest.layers.items() if name not in set(proposal.removed)}
    layers.update({entry.name: entry for entry in proposal.added})
    return newest.successor(layers=layers, written_by=written_by)


def commit(store: ManifestStore, proposal: CommitProposal, written_by: str) -> Manifest | None:
    """Commit ``proposal``; returns the new manifest, or None when it changes nothing.

    Raises ``ManifestConflict`` when the proposal no longer applies; the caller then deletes its
    uploads and may plan the job again.
    """
    if proposal.changes_nothing or proposal.job.dry_run:
        return None
    job = proposal.job

    def update(newest: Manifest) -> Manifest:
        validate(proposal, newest)
        return apply(proposal, newest, written_by)

    committed = store.commit(job.tenant_id, job.timeline_id, update)
    if committed is not None:
        log.info(
            "gc-compaction committed tenant=%s timeline=%s manifest=%d removed=%d added=%d by=%s",
            job.tenant_id, job.timeline_id, committed.number, len(proposal.removed), len(proposal.added), written_by,
        )  # fmt: skip
    return committed
