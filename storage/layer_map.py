"""The layer map of a timeline: selection by key/LSN overlap, L0 detection, and the seed's
``check_valid_layermap`` rule."""

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence

from compactor.storage.keys import KeyRange, overlaps
from compactor.storage.layer_name import LayerName


def check_valid_layermap(names: Iterable[LayerName]) -> str | None:
    """Return why a set of layers is not a valid layer map, or None if it is.

    The seed's rule: normally every delta layer's LSN range can be cut only at the LSN bounds of
    other deltas (all deltas come in bands). Single-key deltas are exempt from that fast check,
    because a single hot key may be split across LSNs. If some multi-key delta has another
    band's bound strictly inside its LSN range (as happens mid partial compaction), fall back to
    the slow rule: no two delta layers, single-key ones included, overlap in both key and LSN.
    """
    deltas = [name for name in names if name.is_delta]
    banded = [name for name in deltas if not name.is_single_key]
    bounds = sorted({lsn for name in banded for lsn in name.lsn_range})
    for name in banded:
        if _bounds_inside(bounds, name.lsn_start, name.lsn_end):
            return _first_overlap(deltas)
    return None


def _bounds_inside(sorted_bounds: Sequence[int], start: int, end: int) -> bool:
    """Whether any bound lies strictly inside ``(start, end)``."""
    i = bisect_right(sorted_bounds, start)
    return i < len(sorted_bounds) and sorted_bounds[i] < end


def _first_overlap(deltas: Sequence[LayerName]) -> str | None:
    # A sweep over key starts instead of the seed's all-pairs loop: same verdict, and it stays
    # fast on maps with thousands of layers.
    ordered = sorted(deltas, key=lambda n: (n.key_range.start, n.lsn_start))
    active: list[LayerName] = []
    for name in ordered:
        active = [a for a in active if a.key_range.end > name.key_range.start]
        for other in active:
            if overlaps(other.lsn_range, name.lsn_range):
                return f"layer violates the layer map LSN split assumption: layer {name} intersects with layer {other}"
        active.append(name)
    return None


class LayerMap:
    """An immutable view over a timeline's layer names."""

    def __init__(self, names: Iterable[LayerName]) -> None:
        self.layers: tuple[LayerName, ...] = tuple(sorted(names, key=lambda n: (n.lsn_start, n.key_range)))

    def __iter__(self) -> Iterator[LayerName]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def l0_deltas(self) -> list[LayerName]:
        return [name for name in self.layers if name.is_l0]

    def overlapping(self, key_range: KeyRange, lsn_max_inclusive: int | None = None) -> list[LayerName]:
        """Layers holding keys in ``key_range`` with some LSN at or below ``lsn_max_inclusive``."""
        return [
            name
            for name in self.layers
            if overlaps(name.key_range, key_range)
            and (lsn_max_inclusive is None or name.lsn_start <= lsn_max_inclusive)
        ]

    def check(self) -> str | None:
        return check_valid_layermap(self.layers)
