"""The payloads that cross process boundaries: a compaction job of one of three kinds, the
sub-jobs it is cut into, and the commit proposal they produce together."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compactor.storage.ids import HexId
from compactor.storage.keys import KEY_MAX, KEY_MIN, KeyRange, format_key
from compactor.storage.lsn import LSN_MAX
from compactor.storage.manifest import KeyHex, LayerEntry, LayerNameStr, Lsn

JobKind = Literal["gc", "l0", "image"]
"""``gc``: gc-compaction; ``l0``: L0 compaction; ``image``: image-layer creation (CONTRACTS §5)."""


def check_kind(kind: JobKind, *, force: bool, dry_run: bool, full_range: bool) -> None:
    """Raise ``ValueError`` for options the kind does not take."""
    if kind != "gc" and not full_range:
        # An L0 covers every key: compacting part of it would leave pieces that are neither L0
        # nor L1; image creation partitions the whole live keyspace, as Neon does.
        raise ValueError(f"a {kind} job covers every key and all history: no key or LSN range")
    if kind != "gc" and dry_run:
        raise ValueError(f"dry run is for gc-compaction only, not {kind}")
    if kind == "gc" and force:
        raise ValueError("force applies to l0 and image jobs only")


class CompactionJob(BaseModel):
    """One compaction over a key range and LSN range of a timeline (for ``gc``, the seed's
    GcCompactJob; ``l0`` and ``image`` work on every key and all history).

    ``lsn_end`` of ``LSN_MAX`` means "up to the gc cutoff"; ``lsn_start`` of 0 means "all history".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: HexId
    timeline_id: HexId
    key_start: KeyHex = format_key(KEY_MIN)  # inclusive
    key_end: KeyHex = format_key(KEY_MAX)  # exclusive
    lsn_start: Lsn = 0  # history above this LSN only (exclusive); 0: all of it
    lsn_end: Lsn = LSN_MAX  # below this LSN (exclusive), capped by the gc cutoff
    dry_run: bool = False
    kind: JobKind = "gc"
    force: bool = False  # ignore the L0 and image thresholds

    @model_validator(mode="after")
    def _ranges(self) -> "CompactionJob":
        if self.key_start >= self.key_end:
            raise ValueError(f"empty or inverted key range {self.key_start}-{self.key_end}")
        if self.lsn_start >= self.lsn_end:
            raise ValueError(f"empty or inverted LSN range [{self.lsn_start}, {self.lsn_end})")
        check_kind(self.kind, force=self.force, dry_run=self.dry_run, full_range=self.full_range)
        return self

    @property
    def key_range(self) -> KeyRange:
        return KeyRange(bytes.fromhex(self.key_start), bytes.fromhex(self.key_end))

    @property
    def full_range(self) -> bool:
        """Whether the job covers every key and all history (as the seed's auto jobs)."""
        return (
            self.key_start == format_key(KEY_MIN)
            and self.key_end == format_key(KEY_MAX)
            and self.lsn_start == 0
            and self.lsn_end == LSN_MAX
        )


class SubJobSpec(BaseModel):
    """One sub-job: the meta job ``job`` as planned on manifest ``manifest_number``, restricted
    to the keys ``[key_start, key_end)``, a slice of the meta job's key range.

    Every sub-job of a meta job carries the same job and manifest number, so each one derives the
    same plan (``compactor.worker.engine.plan.plan_job``) and only the slices differ."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: CompactionJob
    manifest_number: int = Field(ge=0)
    key_start: KeyHex = Field(description="first key of the slice, inclusive")
    key_end: KeyHex = Field(description="end of the slice, exclusive")

    @model_validator(mode="after")
    def _inside(self) -> "SubJobSpec":
        if not self.job.key_start <= self.key_start < self.key_end <= self.job.key_end:
            raise ValueError(
                f"slice {self.key_start}-{self.key_end} is empty or outside the job's keys "
                f"{self.job.key_start}-{self.job.key_end}"
            )
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

    @classmethod
    def combine(cls, parts: "list[CommitProposal]") -> "CommitProposal":
        """The one proposal of a meta job from those of its sub-jobs (same job and read set).

        A layer spanning a cut is removed by both neighbours; a layer one sub-job keeps (an output
        identical to it) lies inside that sub-job's slice, so no other sub-job removes it."""
        first = parts[0]
        if any(part.job != first.job or part.read_set != first.read_set for part in parts):
            raise ValueError("sub-job proposals of different jobs cannot be combined")
        kept = sorted({name for part in parts for name in part.kept})
        removed = sorted({name for part in parts for name in part.removed} - set(kept))
        added = [entry for part in parts for entry in part.added]
        return cls(job=first.job, read_set=first.read_set, removed=removed, added=added, kept=kept)
