"""Numbered, create-only manifests: the commit point of every change to a timeline.

Manifest ``N+1`` is written with ``If-None-Match: *``, so of several writers that read ``N``
exactly one wins; the others re-read and retry (:meth:`ManifestStore.commit`). The newest
manifest is the highest number. Two small side objects keep this cheap and safe:

- the *latest hint* (a number, written best-effort after each commit) lets :meth:`latest` list
  only the few manifests after it instead of the whole history; it may be stale or missing;
- the *boundary* (the lowest valid number) is advanced by :meth:`prune` before it deletes old
  manifests, and checked after every create: a stalled writer that recreates a deleted number
  (the ABA hazard) sees ``boundary > number``, removes its object and loses the race.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Iterator

from pydantic import ValidationError

from compactor.storage import layout
from compactor.storage.errors import CompactorError, InvalidInput, ManifestConflict, NotFound, validation_summary
from compactor.storage.manifest import Manifest
from compactor.storage.object_store import AlreadyExists, ObjectStore, PreconditionFailed

logger = logging.getLogger(__name__)

# A listed manifest can be pruned before we load it only if many commits land in between;
# start over a few times before giving up.
_LATEST_TRIES = 5
_BOUNDARY_CAS_TRIES = 20


class CorruptManifest(CompactorError):
    """A manifest (or the boundary object) could not be parsed or does not match its key."""


class ManifestRaceLost(CompactorError):
    """Another writer created this manifest number first (or it lies below the boundary)."""


class CommitObserver:
    """What :meth:`ManifestStore.commit` reports; every method does nothing here, so an
    observer overrides only what it needs (the worker counts them in its metrics). Methods
    must be quick and must not raise."""

    def race_lost(self, tenant: str, timeline: str, number: int) -> None:
        """Another writer created manifest ``number`` first (or it fell below the boundary);
        the commit re-reads and tries again."""

    def conflict(self, tenant: str, timeline: str, reason: str) -> None:
        """The update function refused the newest manifest (it raised ManifestConflict): the
        commit is abandoned."""


class ManifestStore:
    def __init__(
        self,
        store: ObjectStore,
        *,
        race_backoff_s: float = 0.02,
        race_backoff_max_s: float = 1.0,
        observer: CommitObserver | None = None,
    ) -> None:
        self.observer = observer or CommitObserver()
        """Told of lost races and conflicts in :meth:`commit`; may be replaced at any time."""
        self._store = store
        self._race_backoff_s = race_backoff_s
        self._race_backoff_max_s = race_backoff_max_s
        self.races_lost = 0
        """Lost create races seen by :meth:`commit` over this object's life (for statistics)."""

    @property
    def store(self) -> ObjectStore:
        return self._store

    def using(self, store: ObjectStore) -> ManifestStore:
        """This manifest store (its kind and observer too) over another view of the object store."""
        view = copy.copy(self)
        view._store = store
        return view

    # ------------------------------------------------------------------ reading

    def _parse(self, key: str, data: bytes, tenant: str, timeline: str, number: int) -> Manifest:
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as err:
            raise CorruptManifest(f"manifest {key} is corrupt: {validation_summary(err, 'manifest')}") from None
        if (manifest.tenant_id, manifest.timeline_id, manifest.number) != (tenant, timeline, number):
            raise CorruptManifest(
                f"manifest {key} holds number {manifest.number} of "
                f"{manifest.tenant_id}/{manifest.timeline_id}, not {number} of {tenant}/{timeline}"
            )
        # Object keys of layers are the one key a manifest carries verbatim instead of building
        # it from validated ids (found by the security tests): a forged or damaged manifest could
        # point reads, downloads and deletes of uploads at another timeline's objects, or at
        # "../" paths. Every legitimate key is ``layout.new_layer_key`` of this timeline.
        prefix = layout.layers_prefix(tenant, timeline)
        for entry in manifest.layers.values():
            if not layout.is_layer_key(tenant, timeline, entry.object_key):
                raise CorruptManifest(
                    f"manifest {key} is corrupt: layer {entry.name} has object key {entry.object_key[:200]!r} "
                    f"outside {prefix}"
                )
        return manifest

    def load(self, tenant: str, timeline: str, number: int) -> Manifest:
        """Manifest ``number``; NotFound if it does not exist (never written or pruned)."""
        key = layout.manifest_key(tenant, timeline, number)
        try:
            data = self._store.get_bytes(key)
        except NotFound:
            raise NotFound(f"manifest {number} of timeline {tenant}/{timeline} not found ({key})") from None
        return self._parse(key, data, tenant, timeline, number)

    def _read_hint(self, tenant: str, timeline: str) -> int | None:
        key = layout.latest_hint_key(tenant, timeline)
        try:
            text = self._store.get_bytes(key).decode("ascii", "replace").strip()
        except NotFound:
            return None
        if text.isdigit() and len(text) <= layout.MANIFEST_DIGITS:
            return int(text)
        logger.warning("manifest hint unreadable key=%s value=%r; ignoring it", key, text[:40])
        return None

    def _read_boundary_with_etag(self, tenant: str, timeline: str) -> tuple[int, str | None]:
        key = layout.boundary_key(tenant, timeline)
        try:
            data, info = self._store.get_with_info(key)
        except NotFound:
            return 0, None
        try:
            value = json.loads(data)["boundary"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(value)
        except (ValueError, KeyError, TypeError):
            # Treating a damaged boundary as 0 would silently disable the ABA check.
            raise CorruptManifest(f"manifest boundary {key} is corrupt: {data[:60]!r}") from None
        return value, info.etag

    def boundary(self, tenant: str, timeline: str) -> int:
        """The lowest manifest number still valid (0 until the first prune)."""
        return self._read_boundary_with_etag(tenant, timeline)[0]

    def _highest_after(self, tenant: str, timeline: str, after: int | None) -> int | None:
        prefix = layout.manifests_prefix(tenant, timeline)
        start_after = layout.manifest_key(tenant, timeline, after) if after is not None else None
        highest: int | None = None
        for info in self._store.list_keys(prefix, start_after=start_after):
            number = layout.manifest_number(info.key)
            if number is not None and (highest is None or number > highest):
                highest = number
        return highest

    def latest(self, tenant: str, timeline: str) -> Manifest | None:
        """The newest manifest, or None for a timeline without manifests.

        Costs the hint read, a listing of the manifests after the hint (normally empty) and the
        load; without a usable hint, the listing starts at the boundary instead.
        """
        for attempt in range(_LATEST_TRIES):
            hint = self._read_hint(tenant, timeline) if attempt == 0 else None
            if hint is not None:
                number = self._highest_after(tenant, timeline, hint)
                if number is None:
                    number = hint
            else:
                boundary = self.boundary(tenant, timeline)
                number = self._highest_after(tenant, timeline, boundary - 1 if boundary > 0 else None)
                if number is None:
                    return None
            try:
                return self.load(tenant, timeline, number)
            except NotFound:
                # A hint ahead of the manifests, or pruned between listing and loading: list
                # again from the boundary.
                logger.info("manifest %d of %s/%s vanished; listing again", number, tenant, timeline)
        raise ManifestConflict(
            f"could not read the newest manifest of {tenant}/{timeline}: pruned under us {_LATEST_TRIES} times"
        )

    # ------------------------------------------------------------------ writing

    def create(self, manifest: Manifest) -> None:
        """Write ``manifest`` at its own number, create-only.

        Raises ManifestRaceLost if that number exists already, or if it lies below the boundary
        (a deleted number recreated by a stalled writer; the object is removed again).
        """
        tenant, timeline, number = manifest.tenant_id, manifest.timeline_id, manifest.number
        key = layout.manifest_key(tenant, timeline, number)
        data = manifest.model_dump_json().encode()
        try:
            self._store.put_bytes(key, data, create_only=True)
        except AlreadyExists:
            raise ManifestRaceLost(f"manifest {number} of {tenant}/{timeline} already exists ({key})") from None

        # The boundary is advanced before deletions, so if our create succeeded on a deleted
        # number, this read sees the advanced boundary.
        boundary = self.boundary(tenant, timeline)
        if boundary > number:
            self._store.delete(key)
            logger.warning(
                "manifest create below boundary, removed tenant=%s timeline=%s number=%d boundary=%d",
                tenant,
                timeline,
                number,
                boundary,
            )
            raise ManifestRaceLost(
                f"manifest {number} of {tenant}/{timeline} is below the prune boundary {boundary}; removed it"
            )
        logger.info("manifest created tenant=%s timeline=%s number=%d", tenant, timeline, number)
        self._write_hint(tenant, timeline, number)

    def _write_hint(self, tenant: str, timeline: str, number: int) -> None:
        key = layout.latest_hint_key(tenant, timeline)
        try:
            self._store.put_bytes(key, str(number).encode())
        except CompactorError as err:
            logger.warning("manifest hint not updated key=%s number=%d error=%s", key, number, err)

    def initialize(self, manifest: Manifest) -> None:
        """Write manifest 0 of a new timeline; InvalidInput if the timeline already exists."""
        if manifest.number != 0:
            raise InvalidInput(f"a new timeline starts at manifest 0, not {manifest.number}")
        try:
            self.create(manifest)
        except ManifestRaceLost:
            raise InvalidInput(f"timeline {manifest.tenant_id}/{manifest.timeline_id} already exists") from None

    def commit(
        self,
        tenant: str,
        timeline: str,
        update: Callable[[Manifest], Manifest | None],
        *,
        attempts: int = 20,
    ) -> Manifest | None:
        """Optimistic commit: read the newest manifest, let ``update`` build its successor
        (``Manifest.successor(...)``) or return None to give up, and create it. On a lost race,
        re-read and call ``update`` again. ManifestConflict raised by ``update`` propagates.

        Returns the committed manifest, or None if ``update`` gave up. Raises ManifestConflict
        after ``attempts`` lost races. A StoreError here leaves the outcome unknown: the caller
        must re-read before assuming either way.
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        lost = 0
        while True:
            current = self.latest(tenant, timeline)
            if current is None:
                raise NotFound(f"timeline {tenant}/{timeline} has no manifest")
            try:
                successor = update(current)
            except ManifestConflict as err:
                self.observer.conflict(tenant, timeline, str(err))
                raise
            if successor is None:
                return None
            expected = (tenant, timeline, current.number + 1)
            got = (successor.tenant_id, successor.timeline_id, successor.number)
            if got != expected:
                raise InvalidInput(
                    f"commit update returned manifest {got[2]} of {got[0]}/{got[1]}, "
                    f"expected {expected[2]} of {tenant}/{timeline} (use Manifest.successor)"
                )
            try:
                self.create(successor)
                return successor
            except ManifestRaceLost as err:
                lost += 1
                self.races_lost += 1
                self.observer.race_lost(tenant, timeline, successor.number)
                logger.info("manifest race lost tenant=%s timeline=%s lost=%d: %s", tenant, timeline, lost, err)
                if lost >= attempts:
                    raise ManifestConflict(f"commit to {tenant}/{timeline} gave up after {lost} lost races") from None
                cap = min(self._race_backoff_max_s, self._race_backoff_s * 2 ** min(lost - 1, 16))
                time.sleep(random.uniform(0, cap))

    # ------------------------------------------------------------------ pruning

    def _advance_boundary(self, tenant: str, timeline: str, target: int) -> int:
        """Raise the boundary to ``target`` unless it is higher already; never lowers it, even
        against concurrent prunes (compare-and-swap on the boundary's ETag)."""
        key = layout.boundary_key(tenant, timeline)
        body = json.dumps({"boundary": target}).encode()
        for _ in range(_BOUNDARY_CAS_TRIES):
            current, etag = self._read_boundary_with_etag(tenant, timeline)
            if current >= target:
                return current
            try:
                if etag is None:
                    self._store.put_bytes(key, body, create_only=True)
                else:
                    self._store.put_bytes(key, body, if_match=etag)
            except PreconditionFailed:  # AlreadyExists included: someone else moved it
                time.sleep(random.uniform(0, self._race_backoff_s))
                continue
            logger.info(
                "manifest boundary advanced tenant=%s timeline=%s from=%d to=%d", tenant, timeline, current, target
            )
            return target
        raise ManifestConflict(f"could not advance manifest boundary {key}: {_BOUNDARY_CAS_TRIES} lost races")

    def prune(self, tenant: str, timeline: str, keep: int = 10) -> list[int]:
        """Delete every manifest older than the newest ``keep``: first advance the boundary,
        then delete (also leftovers below an older boundary). Returns the numbers deleted."""
        if keep < 1:
            raise InvalidInput(f"prune must keep at least one manifest, not {keep}")
        prefix = layout.manifests_prefix(tenant, timeline)
        # Earlier prunes deleted what lies below their boundary, so this listing stays short.
        found = sorted(
            n for n in (layout.manifest_number(info.key) for info in self._store.list_keys(prefix)) if n is not None
        )
        boundary = self.boundary(tenant, timeline)
        valid = [n for n in found if n >= boundary]
        target = max(boundary, valid[-keep]) if len(valid) > keep else boundary
        if target > boundary:
            target = self._advance_boundary(tenant, timeline, target)
        doomed = [n for n in found if n < target]
        if not doomed:
            return []
        failures = self._store.delete_many(layout.manifest_key(tenant, timeline, n) for n in doomed)
        deleted = [n for n in doomed if layout.manifest_key(tenant, timeline, n) not in failures]
        logger.info(
            "manifest prune tenant=%s timeline=%s boundary=%d deleted=%d failed=%d",
            tenant,
            timeline,
            target,
            len(deleted),
            len(failures),
        )
        return deleted

    # ------------------------------------------------------------------ discovery

    def list_timelines(self) -> Iterator[tuple[str, str]]:
        """``(tenant, timeline)`` of every timeline with any object in the bucket (one whose
        import never finished has no manifest: :meth:`latest` returns None for it)."""
        for tenant_prefix in self._store.list_prefixes("tenants/"):
            for timeline_prefix in self._store.list_prefixes(tenant_prefix + "timelines/"):
                parsed = layout.parse_timeline_prefix(timeline_prefix)
                if parsed is not None:
                    yield parsed
