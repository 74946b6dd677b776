"""SVG pictures of a timeline's layer map: keys across, LSNs up, one rectangle per layer.

Keys are spread by rank (every distinct layer key boundary gets an equal share of the width), so
narrow layers stay visible next to wide ones; LSNs are linear. Images are drawn as bars at their
LSN, tall enough to see, over the deltas. The gc horizon, retain LSNs and leases are marked
across the whole picture. Pictures meant to be compared (before and after a compaction) share
their axes (``Axes.spanning``), so that a layer is drawn at the same place in both.
"""

from collections.abc import Callable
from dataclasses import dataclass
from html import escape

from compactor.storage.keys import format_key
from compactor.storage.layer_name import LayerName
from compactor.storage.manifest import Manifest

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 90, 170, 40, 50
COLORS = {"delta": "#4C78A8", "l0": "#E45756", "image": "#F58518"}
MIN_DELTA_HEIGHT, IMAGE_HEIGHT = 3.0, 8.0


@dataclass(frozen=True)
class Axes:
    key_bounds: list[bytes]  # sorted; each gets an equal share of the width
    lsn_lo: int
    lsn_hi: int

    @classmethod
    def spanning(cls, *manifests: Manifest) -> "Axes":
        """Axes on which every layer and gc marker of all ``manifests`` fits."""
        names = [n for m in manifests for n in m.layer_names()]
        lsn_lo = min((n.lsn_start for n in names), default=0)
        marks = [lsn for m in manifests for lsn in (m.gc.cutoff, *m.gc.retain_lsns, *m.gc.leases) if lsn]
        lsn_hi = max([n.lsn_end for n in names] + [lsn + 1 for lsn in marks] + [lsn_lo + 1])
        return cls(sorted({k for n in names for k in n.key_range}), lsn_lo, lsn_hi)


def layer_map_svg(manifest: Manifest, title: str = "", axes: Axes | None = None) -> str:
    """The layer map as SVG, on ``axes`` (default: those of this manifest alone)."""
    axes = axes or Axes.spanning(manifest)
    # Deltas first: images are drawn over them, or the deltas above an image would hide it.
    names = sorted(manifest.layer_names(), key=lambda n: (not n.is_delta, n.lsn_start, n.key_range))
    bounds, lsn_lo, lsn_hi = axes.key_bounds, axes.lsn_lo, axes.lsn_hi
    rank = {k: i for i, k in enumerate(bounds)}
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(key: bytes) -> float:
        return LEFT + plot_w * rank[key] / max(len(bounds) - 1, 1)

    def y(lsn: int) -> float:
        return TOP + plot_h * (1 - (lsn - lsn_lo) / max(lsn_hi - lsn_lo, 1))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{escape(title or _default_title(manifest))}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>',
    ]
    for name in names:
        out.append(_rect(name, x, y))
    for lsn, label, color in _markers(manifest):
        if lsn_lo <= lsn <= lsn_hi:
            yy = y(lsn)
            out.append(
                f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{color}" '
                f'stroke-width="1.5" stroke-dasharray="6 3"/>'
            )
            out.append(f'<text x="{LEFT + plot_w + 6}" y="{yy + 4:.1f}" fill="{color}">{escape(label)}</text>')
    for lsn in (lsn_lo, lsn_hi):
        out.append(f'<text x="{LEFT - 6}" y="{y(lsn) + 4:.1f}" text-anchor="end">{lsn:#x}</text>')
    out.append(f'<text x="14" y="{TOP + plot_h / 2:.0f}" transform="rotate(-90 14 {TOP + plot_h / 2:.0f})">LSN</text>')
    if bounds:
        out.append(f'<text x="{LEFT}" y="{HEIGHT - 30}">{format_key(bounds[0])[-8:]}</text>')
        out.append(
            f'<text x="{LEFT + plot_w}" y="{HEIGHT - 30}" text-anchor="end">{format_key(bounds[-1])[-8:]}</text>'
        )
    out.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 12}" text-anchor="middle">key (by rank)</text>')
    out += _legend(LEFT + plot_w + 6, TOP + plot_h - 170)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _default_title(manifest: Manifest) -> str:
    deltas = sum(1 for n in manifest.layer_names() if n.is_delta)
    images = len(manifest.layers) - deltas
    size = sum(e.size for e in manifest.layers.values())
    return (
        f"timeline {manifest.timeline_id[:8]}… manifest {manifest.number}: "
        f"{deltas} deltas, {images} images, {size / 1e6:.1f} MB"
    )


def _rect(name: LayerName, x: Callable[[bytes], float], y: Callable[[int], float]) -> str:
    x0, x1 = x(name.key_range.start), x(name.key_range.end)
    top, bottom = y(name.lsn_end), y(name.lsn_start)
    kind = "image" if not name.is_delta else ("l0" if name.is_l0 else "delta")
    h = max(bottom - top, MIN_DELTA_HEIGHT)
    if kind == "image":
        top, h = bottom - IMAGE_HEIGHT, IMAGE_HEIGHT
    return (
        f'<rect x="{x0:.1f}" y="{top:.1f}" width="{max(x1 - x0, 1.0):.1f}" height="{h:.1f}" fill="{COLORS[kind]}" '
        f'fill-opacity="0.55" stroke="{COLORS[kind]}" stroke-width="0.8"><title>{escape(str(name))}</title></rect>'
    )


def _markers(manifest: Manifest) -> list[tuple[int, str, str]]:
    marks = [(manifest.gc.cutoff, f"horizon {manifest.gc.cutoff:#x}", "#D62728")] if manifest.gc.cutoff else []
    marks += [(lsn, f"retain {lsn:#x}", "#2CA02C") for lsn in manifest.gc.retain_lsns]
    marks += [(lsn, f"lease {lsn:#x}", "#9467BD") for lsn in manifest.gc.leases]
    return marks


def _legend(x: float, y: float) -> list[str]:
    rows = [("delta layer", COLORS["delta"]), ("L0 delta", COLORS["l0"]), ("image layer", COLORS["image"])]
    out = []
    for i, (label, color) in enumerate(rows):
        yy = y + 120 + i * 18
        out.append(f'<rect x="{x}" y="{yy - 9}" width="12" height="10" fill="{color}" fill-opacity="0.55"/>')
        out.append(f'<text x="{x + 17}" y="{yy}">{label}</text>')
    return out
