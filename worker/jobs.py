"""The payloads that cross process boundaries: a gc-compaction job and its commit proposal."""

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.ids import HexId
from storage.keys import KEY_MAX, KEY_MIN, KeyRange, format_key
from storage.lsn import LSN_MAX
from storage.manifest import KeyHex, LayerEntry, LayerNameStr, Lsn


class CompactionJob(BaseModel):
    """One gc-compaction over a key range and LSN range of a timeline (the seed's GcCompactJob).

    ``lsn_end`` of ``LSN_MAX`` means "up to the gc cutoff"; ``lsn_start`` of 0 means "all history".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: HexId
    timeline_id: HexId
    key_start: KeyHex = format_key(KEY_MIN)
    key_end: KeyHex = format_key(KEY_MAX)
    lsn_start: Lsn = 0
    lsn_end: Lsn = LSN_MAX
    dry_run: bool = False

    @model_validator(mode="after")
    def _ranges(self) -> "CompactionJob":
        if self.key_start >= self.key_end:
            raise ValueError(f"empty or inverted key range {self.key_start}-{self.key_end}")
        if self.lsn_start >= self.lsn_end:
            raise ValueError(f"empty or inverted LSN range [{self.lsn_start}, {self.lsn_end})")
        return self

    @property
    def key_range(self) -> KeyRange:
        return KeyRange(bytes.fromhex(self.key_start), bytes.fromhex(self.key_end))


class ReadSet(BaseModel):
    """What a job was planned on; the commit is valid only while this still holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest_number: int
    selected: list[LayerNameStr]
    key_start: KeyHex
    key_end: KeyHex
    max_layer_lsn: Lsn
    horizon: Lsn
    retain_lsns: list[Lsn]
    others: list[LayerNameStr] = Field(
        default_factory=list,
        description="unselected layers that intersect the key range below max_layer_lsn at planning time",
    )


class CommitProposal(BaseModel):
    """The outcome of a compaction, before it is committed: layers out, layers in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: CompactionJob
    read_set: ReadSet
    removed: list[LayerNameStr] = Field(default_factory=list)
    added: list[LayerEntry] = Field(default_factory=list)
    kept: list[LayerNameStr] = Field(default_factory=list, description="outputs identical to existing layers")

    @property
    def changes_nothing(self) -> bool:
        return not self.removed and not self.added
