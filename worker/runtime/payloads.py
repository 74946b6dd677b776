"""The task payloads, the stable API other services send (docs/task-api.md embeds their JSON
Schema, written by ``python -m compactor.coordinator.cli.schema_docs``), and the ids they carry."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compactor.storage.ids import HexId
from compactor.storage.keys import KEY_MAX, KEY_MIN, format_key
from compactor.storage.lsn import LSN_MAX
from compactor.storage.manifest import KeyHex, Lsn
from compactor.worker.engine.jobs import CompactionJob, JobKind, check_kind


def new_job_id() -> str:
    return uuid.uuid4().hex


def sub_job_id(meta_id: str, index: int) -> str:
    return f"{meta_id}.{index}"


_HEX_ID: dict[str, Any] = {"pattern": "^[0-9a-f]{32}$"}
_KEY_HEX: dict[str, Any] = {"pattern": "^[0-9A-Fa-f]{36}$"}


class CompactRequest(BaseModel):
    """Payload of ``compactor.compact_timeline``: one gc-compaction meta job.

    Keys are 36 hex characters, LSNs JSON integers; ``lsn_end`` of 2^64-1 means "up to the gc
    cutoff". ``job_id`` lets a client choose the meta job id (32 lowercase hex characters) so
    that resending the same request is harmless: a second request with the same id and the same
    fields returns the existing job; with different fields it is rejected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: HexId = Field(json_schema_extra=_HEX_ID)
    timeline_id: HexId = Field(json_schema_extra=_HEX_ID)
    key_start: KeyHex = Field(
        default=format_key(KEY_MIN), description="first key, inclusive", json_schema_extra=_KEY_HEX
    )
    key_end: KeyHex = Field(default=format_key(KEY_MAX), description="end key, exclusive", json_schema_extra=_KEY_HEX)
    lsn_start: Lsn = Field(default=0, description="compact history above this LSN only; 0 = all history")
    lsn_end: Lsn = Field(default=LSN_MAX, description="compact below this LSN, capped by the gc cutoff")
    max_job_bytes: int | None = Field(
        default=None, ge=1, description="split into sub-jobs of about this many bytes of layers; null = server default"
    )
    sub_compaction: bool = Field(default=True, description="false: one job over the whole range")
    dry_run: bool = Field(default=False, description="compute statistics, commit nothing")
    job_id: HexId | None = Field(
        default=None, description="client-chosen meta job id; null = a new one", json_schema_extra=_HEX_ID
    )
    kind: JobKind = Field(
        default="gc",
        description="gc: gc-compaction; l0: L0 compaction; image: image-layer creation (l0 and image: every key, "
        "all history, no dry run)",
    )
    force: bool = Field(default=False, description="l0 and image only: ignore the L0 and image thresholds")

    @model_validator(mode="after")
    def _ranges(self) -> CompactRequest:
        if self.key_start >= self.key_end:
            raise ValueError(f"empty or inverted key range {self.key_start}-{self.key_end}")
        if self.lsn_start >= self.lsn_end:
            raise ValueError(f"empty or inverted LSN range [{self.lsn_start}, {self.lsn_end})")
        full_range = (self.key_start, self.key_end, self.lsn_start, self.lsn_end) == (
            format_key(KEY_MIN),
            format_key(KEY_MAX),
            0,
            LSN_MAX,
        )
        check_kind(self.kind, force=self.force, dry_run=self.dry_run, full_range=full_range)
        return self

    def to_job(self) -> CompactionJob:
        return CompactionJob(
            tenant_id=self.tenant_id,
            timeline_id=self.timeline_id,
            key_start=self.key_start,
            key_end=self.key_end,
            lsn_start=self.lsn_start,
            lsn_end=self.lsn_end,
            dry_run=self.dry_run,
            kind=self.kind,
            force=self.force,
        )

    def same_job(self, other: CompactRequest) -> bool:
        return self.model_dump(exclude={"job_id"}) == other.model_dump(exclude={"job_id"})


class MetaJobRef(BaseModel):
    """Payload of ``compactor.plan_meta_job`` and ``compactor.finalize_meta_job``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: HexId = Field(json_schema_extra=_HEX_ID)


class SubJobRef(BaseModel):
    """Payload of ``compactor.run_sub_job``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sub_job_id: str = Field(pattern=r"^[0-9a-f]{32}\.\d{1,6}$", description="<meta job id>.<index>")


# ----------------------------------------------------------------------------- task API schemas

PAYLOADS: dict[str, type[BaseModel]] = {
    "CompactRequest": CompactRequest,
    "MetaJobRef": MetaJobRef,
    "SubJobRef": SubJobRef,
}
