"""Error types shared by every layer of the system.

Every error carries a one-line message fit for an operator: what failed and which object,
key or LSN it concerns. Callers at the edge (CLI, Celery tasks) print ``str(err)`` as is, and
``one_line`` turns any other exception into such a line.
"""

from pydantic import ValidationError


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


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with ``...`` where it was cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_summary(err: ValidationError, where: str = "payload") -> str:
    """A pydantic validation error as one line: the first problem's location (``where`` when it
    has none) and message, and how many more there are."""
    first = err.errors()[0]
    # Field names come from the input too: an unknown field named with a megabyte of text made a
    # megabyte "one-line" error in a job record and the logs (found by the bad-input tests).
    loc = ".".join(clip(str(part), 64) for part in first.get("loc", ())) or where
    msg = clip(str(first.get("msg", "invalid")).removeprefix("Value error, "), 300)
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return " ".join(f"{loc}: {msg}{more}".split())


def one_line(err: BaseException) -> str:
    """An exception as one line for an operator: our own errors by their message, others as
    ``Type: message``; only the first line of a message, clipped."""
    if isinstance(err, ValidationError):
        return "invalid payload: " + validation_summary(err)
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, CompactorError) and text:
        return clip(text, 1000)
    return clip(f"{type(err).__name__}: {text}" if text else type(err).__name__, 1000)
