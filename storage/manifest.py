"""The index manifest of a timeline: which layers make it up, and its gc state.

Manifests are immutable and numbered; see ``compactor.storage.manifest_store`` for how the next one is
written. Every field crossing the wire is validated here.
"""

from datetime import UTC, datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from compactor.storage.checksum import Checksum
from compactor.storage.errors import InvalidInput
from compactor.storage.ids import HexId
from compactor.storage.keys import KeyRange, parse_key
from compactor.storage.layer_name import LayerName
from compactor.storage.lsn import LSN_MAX

FORMAT_VERSION = 2
"""Written by this version. Format 2 brought XXH3-128 layer checksums; a format 1 manifest (every
layer with a SHA-256) is read as it is, and its successor is written as format 2."""
READABLE_VERSIONS = (1, 2)

Lsn = Annotated[int, Field(ge=0, le=LSN_MAX)]


def _valid_layer_name(value: str) -> str:
    try:
        LayerName.parse(value)
    except InvalidInput as err:
        raise ValueError(str(err)) from None
    return value


def _valid_key_hex(value: str) -> str:
    try:
        return parse_key(value).hex().upper()
    except InvalidInput as err:
        raise ValueError(str(err)) from None


LayerNameStr = Annotated[str, AfterValidator(_valid_layer_name)]
KeyHex = Annotated[str, AfterValidator(_valid_key_hex)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerEntry(Strict):
    """A layer of the timeline and its object; exactly one checksum (``compactor.storage.checksum``):
    ``xxh3_128`` for layers written since manifest format 2, ``sha256`` for those before."""

    name: LayerNameStr
    object_key: str
    size: int = Field(ge=0)
    xxh3_128: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_checksum(self) -> "LayerEntry":
        if (self.xxh3_128 is None) == (self.sha256 is None):
            raise ValueError(f"layer entry {self.name} needs exactly one checksum (xxh3_128 or sha256)")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_checksum(self, handler: SerializerFunctionWrapHandler) -> object:
        # Only the checksum the entry has: an entry read from a format 1 manifest is written back
        # as it was, and a null never reads as a checksum.
        data = handler(self)
        for field in ("xxh3_128", "sha256"):
            if data.get(field) is None:
                del data[field]
        return data

    @property
    def layer(self) -> LayerName:
        return LayerName.parse(self.name)

    @property
    def checksum(self) -> Checksum:
        if self.xxh3_128 is not None:
            return Checksum("xxh3_128", self.xxh3_128)
        assert self.sha256 is not None  # _one_checksum
        return Checksum("sha256", self.sha256)


class GcInfo(Strict):
    cutoff: Lsn = 0
    retain_lsns: list[Lsn] = Field(default_factory=list)
    leases: list[Lsn] = Field(default_factory=list)

    def retained_below(self, horizon: int) -> list[int]:
        """Branch points and leases below ``horizon``, sorted: the LSNs whose reads must survive."""
        return sorted(lsn for lsn in (*self.retain_lsns, *self.leases) if lsn < horizon)


class Ancestor(Strict):
    timeline_id: HexId
    lsn: Lsn


class TimelineSettings(Strict):
    """Per-timeline compaction settings; defaults are the seed's and Neon's
    ``libs/pageserver_api/src/config.rs``."""

    gc_compaction_enabled: bool = True
    gc_compaction_initial_threshold_kb: int = Field(default=5 * 1024 * 1024, ge=0)
    gc_compaction_ratio_percent: int = Field(default=100, ge=0)
    gc_compaction_verification: bool = True
    # L0 compaction and image-layer creation (CONTRACTS §5)
    compaction_threshold: int = Field(default=10, ge=1, description="L0 deltas that make L0 compaction due")
    compaction_upper_limit: int = Field(default=10, ge=1, description="L0 deltas of about checkpoint_distance per job")
    checkpoint_distance: int = Field(default=256 * 1024**2, ge=1, description="bytes; target size of L1 deltas")
    compaction_target_size: int = Field(default=128 * 1024**2, ge=1, description="bytes; image partition size")
    image_creation_threshold: int = Field(default=3, ge=1, description="deltas above an image that make one due")


class GcCompactionState(Strict):
    last_completed_lsn: Lsn = 0


class Manifest(Strict):
    format_version: int = FORMAT_VERSION
    tenant_id: HexId
    timeline_id: HexId
    number: int = Field(ge=0, description="sequence number; the newest manifest has the highest")
    ancestor: Ancestor | None = None
    gc: GcInfo = Field(default_factory=GcInfo)
    keyspace: list[tuple[KeyHex, KeyHex]] | None = None
    settings: TimelineSettings = Field(default_factory=TimelineSettings)
    gc_compaction: GcCompactionState = Field(default_factory=GcCompactionState)
    layers: dict[LayerNameStr, LayerEntry] = Field(default_factory=dict)
    written_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    written_by: str = ""

    @model_validator(mode="after")
    def _check(self) -> "Manifest":
        if self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported manifest format version {self.format_version}")
        for name, entry in self.layers.items():
            if entry.name != name:
                raise ValueError(f"layer entry {entry.name} filed under {name}")
        for start, end in self.keyspace or []:
            if start >= end:
                raise ValueError(f"empty keyspace range {start}-{end}")
        return self

    @property
    def top_lsn(self) -> int:
        """Highest LSN covered by any layer (exclusive end): the disk-consistent LSN."""
        return max((entry.layer.lsn_end for entry in self.layers.values()), default=0)

    def layer_names(self) -> list[LayerName]:
        return [entry.layer for entry in self.layers.values()]

    def live_ranges(self) -> list[KeyRange] | None:
        if self.keyspace is None:
            return None
        return [KeyRange(parse_key(s), parse_key(e)) for s, e in self.keyspace]

    def successor(self, **changes: object) -> "Manifest":
        """The next manifest in the chain with ``changes`` applied, validated again."""
        data = self.model_dump()
        data.update(changes)
        data["number"] = self.number + 1
        data["format_version"] = FORMAT_VERSION
        data["written_at"] = datetime.now(UTC)
        return Manifest.model_validate(data)
