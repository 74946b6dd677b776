"""Questions about a layer map's shape that L0 compaction and image creation ask: which image layer
a key range falls back on (the seed's ``LayerMap::image_coverage``), how deep delta layers are
stacked above it, and how layer bytes spread along the keys. Pure: layer names and sizes in."""

from collections.abc import Iterable, Sequence
from fractions import Fraction
from itertools import pairwise

from compactor.storage.keys import KeyRange, key_from_int, key_to_int
from compactor.storage.layer_name import LayerName


def image_coverage(images: Iterable[LayerName], key_range: KeyRange, lsn: int) -> list[tuple[KeyRange, int | None]]:
    """``key_range`` cut where the newest image layer at or below ``lsn`` changes: each piece
    with the LSN of that image, or None where no image layer covers it. Adjacent pieces under
    the same image layer are one piece."""
    below = [
        name for name in images if not name.is_delta and name.image_lsn <= lsn and name.key_range.overlaps(key_range)
    ]
    points = sorted(
        {key_range.start, key_range.end}
        | {b for name in below for b in name.key_range if key_range.start < b < key_range.end}
    )
    pieces: list[tuple[KeyRange, int | None]] = []
    owner: LayerName | None = None
    for lo, hi in pairwise(points):
        covering = [name for name in below if name.key_range.start <= lo and hi <= name.key_range.end]
        newest = max(covering, key=lambda name: (name.image_lsn, name.key_range), default=None)
        if pieces and newest == owner:
            pieces[-1] = (KeyRange(pieces[-1][0].start, hi), pieces[-1][1])
        else:
            pieces.append((KeyRange(lo, hi), None if newest is None else newest.image_lsn))
        owner = newest
    return pieces


def deepest_delta_stack(layers: Sequence[LayerName], key_range: KeyRange, lsn: int) -> int:
    """The most delta layers any one key of ``key_range`` has above its newest image at or below
    ``lsn``, counting deltas that start at or below ``lsn``."""
    deltas = [name for name in layers if name.is_delta and name.lsn_start <= lsn and name.key_range.overlaps(key_range)]
    deepest = 0
    for piece, image_lsn in image_coverage(layers, key_range, lsn):
        # A delta holds something above the image when it ends past the image's LSN + 1.
        floor = 0 if image_lsn is None else image_lsn + 1
        above = [name for name in deltas if name.lsn_end > floor and name.key_range.overlaps(piece)]
        points = sorted(
            {piece.start, piece.end} | {b for n in above for b in n.key_range if piece.start < b < piece.end}
        )
        for lo, hi in pairwise(points):
            depth = sum(1 for n in above if n.key_range.start <= lo and hi <= n.key_range.end)
            deepest = max(deepest, depth)
    return deepest


def spread_bytes(sized: Iterable[tuple[KeyRange, int]], within: KeyRange) -> list[tuple[int, int, float]]:
    """``(start, end, bytes)`` along the keys as integers, ``[start, end)`` clipped to ``within``:
    each range's bytes spread evenly over its keys."""
    lo, hi = key_to_int(within.start), key_to_int(within.end)
    spans = []
    for key_range, size in sized:
        start, end = key_to_int(key_range.start), key_to_int(key_range.end)
        clipped = (max(start, lo), min(end, hi))
        if clipped[0] < clipped[1]:
            spans.append((*clipped, size * (clipped[1] - clipped[0]) / (end - start)))
    return spans


def cumulative(points: list[int], spans: list[tuple[int, int, float]]) -> list[float]:
    """Bytes of ``spans`` below each of the sorted ``points`` (every span bound is a point): a
    sweep, since the sum is linear between two points. Slopes are exact fractions: a float slope
    left over from adding and removing slopes of very different size, times a gap of 2^100 keys,
    would make up bytes out of nothing."""
    slope_changes: dict[int, Fraction] = {}
    for start, end, size in spans:
        slope = Fraction(size) / (end - start)
        slope_changes[start] = slope_changes.get(start, Fraction(0)) + slope
        slope_changes[end] = slope_changes.get(end, Fraction(0)) - slope
    out: list[float] = []
    total, slope, previous = 0.0, Fraction(0), points[0]
    for point in points:
        total += float(slope * (point - previous))
        out.append(total)
        slope += slope_changes.get(point, Fraction(0))
        previous = point
    return out


def interpolate(points: list[int], below: list[float], target: float) -> int:
    """The key (as an integer) at which ``target`` bytes lie below, between the two points around it."""
    for j in range(1, len(points)):
        if below[j] >= target:
            width = below[j] - below[j - 1]
            fraction = (target - below[j - 1]) / width if width > 0 else 0.0
            return points[j - 1] + int(fraction * (points[j] - points[j - 1]))
    return points[-1]


def key_range_of(start: int, end: int) -> KeyRange:
    return KeyRange(key_from_int(start), key_from_int(end))
