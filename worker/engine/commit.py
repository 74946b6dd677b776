"""The one commit of a meta job (docs/design/commit.md).

A meta job's sub-jobs upload their outputs and record their parts of the proposal; once every one
has succeeded, their parts are combined (``CommitProposal.combine``) and committed here, once. The
proposal is valid against the newest manifest only if the world the meta job was planned in still
holds where it matters: every selected layer is present, no layer the planner did not know about
holds keys of the meta job's range at or below ``max_layer_lsn``, and the LSNs whose reads must
survive are the same. The layer map of the result is checked (the seed's ``check_valid_layermap``)
and the next manifest is written create-only, advancing ``gc_compaction.last_completed_lsn`` in the
same manifest where asked; a lost race re-reads and re-validates. Safety never depends on any lock.
"""

import logging

from compactor.storage.errors import CompactorError, ManifestConflict
from compactor.storage.layer_map import check_valid_layermap
from compactor.storage.manifest import GcCompactionState, Manifest
from compactor.storage.manifest_store import ManifestStore
from compactor.worker.engine.jobs import CommitProposal
from compactor.worker.engine.plan import conflicting_layers

log = logging.getLogger(__name__)


class CommitRefused(CompactorError):
    """The combined result would not be a valid layer map: nothing is committed."""


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


def apply(proposal: CommitProposal, newest: Manifest, written_by: str, l2_lsn: int | None = None) -> Manifest | None:
    """The successor of ``newest`` with the proposal applied and ``last_completed_lsn`` raised to
    ``l2_lsn`` (never lowered), or None when that changes nothing. Validate first."""
    changes: dict[str, object] = {}
    if not proposal.changes_nothing:
        removed = set(proposal.removed)
        layers = {name: entry for name, entry in newest.layers.items() if name not in removed}
        layers.update({entry.name: entry for entry in proposal.added})
        problem = check_valid_layermap(entry.layer for entry in layers.values())
        if problem:
            raise CommitRefused(f"layer map check failed after compaction ({problem}); result not applied")
        changes["layers"] = layers
    if l2_lsn is not None:
        have = newest.gc_compaction.last_completed_lsn
        if have < l2_lsn:
            changes["gc_compaction"] = GcCompactionState(last_completed_lsn=l2_lsn)
        elif have > l2_lsn:
            log.warning("l2 lsn not lowered current=%d proposed=%d by=%s", have, l2_lsn, written_by)
    return newest.successor(written_by=written_by, **changes) if changes else None


def commit(
    store: ManifestStore, proposal: CommitProposal, written_by: str, *, l2_lsn: int | None = None
) -> Manifest | None:
    """Commit ``proposal`` (and the L2 LSN); returns the new manifest, or None when it changes
    nothing.

    Raises ``ManifestConflict`` when the proposal no longer applies; the caller then deletes its
    uploads and may plan the meta job again.
    """
    if proposal.job.dry_run:
        return None
    job = proposal.job

    def update(newest: Manifest) -> Manifest | None:
        if not proposal.changes_nothing:
            validate(proposal, newest)
        return apply(proposal, newest, written_by, l2_lsn)

    committed = store.commit(job.tenant_id, job.timeline_id, update)
    if committed is not None:
        log.info(
            "meta job committed tenant=%s timeline=%s manifest=%d removed=%d added=%d l2_lsn=%s by=%s",
            job.tenant_id, job.timeline_id, committed.number, len(proposal.removed), len(proposal.added),
            committed.gc_compaction.last_completed_lsn, written_by,
        )  # fmt: skip
    return committed
