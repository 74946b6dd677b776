"""Tenant and timeline ids: 32 lowercase hex characters, validated before any I/O."""

import re
from typing import Annotated

from pydantic import AfterValidator

from compactor.storage.errors import InvalidInput

_ID_RE = re.compile(r"[0-9a-f]{32}")


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid id, else raise with a message naming what was wrong."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else f"{str(value)[:80]}..."
        raise InvalidInput(f"invalid {what} {shown!r}: expected 32 lowercase hex characters")
    return value


def _pydantic_id(value: str) -> str:
    try:
        return validate_id(value)
    except InvalidInput as err:
        # pydantic turns ValueError into a validation error with our message
        raise ValueError(str(err)) from None


HexId = Annotated[str, AfterValidator(_pydantic_id)]
"""A validated tenant or timeline id inside pydantic models."""
