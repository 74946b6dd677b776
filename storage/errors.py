"""Error types shared by every layer of the system.

Every error carries a one-line message fit for an operator: what failed and which object,
key or LSN it concerns. Callers at the edge (CLI, Celery tasks) print ``str(err)`` as is.
"""


class CompactorError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidInput(CompactorError):
    """Malformed or inconsistent input: ids, JSON, ranges, records."""


class CorruptLayer(CompactorError):
    """A layer object is missing, truncated, or does not match its checksum or format."""


class RedoError(CompactorError):
    """A history could not be replayed (failed `only_if`, missing base image, bad record)."""


class StoreError(CompactorError):
    """The object store failed or is unreachable after retries."""


class ManifestConflict(CompactorError):
    """Another writer committed a manifest that invalidates ours."""


class NotFound(CompactorError):
    """A timeline, manifest or job that was asked for does not exist."""
