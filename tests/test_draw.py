"""Layer-map pictures: well-formed SVG with one rectangle per layer and every marker."""

import xml.etree.ElementTree as ET

from compactor.coordinator.cli.draw import IMAGE_HEIGHT, Axes, layer_map_svg
from tests.engine_memory import MemoryIO
from tests.test_engine_jobs import history_timeline
from tests.timelines import PARENT, Layer, Value

NS = "{http://www.w3.org/2000/svg}"


def test_svg_has_a_rectangle_per_layer_and_the_gc_markers() -> None:
    io = MemoryIO()
    io.load({PARENT: history_timeline(cutoff=60, retain_lsns=[30], leases=[45])})
    manifest = io.manifests[PARENT]
    root = ET.fromstring(layer_map_svg(manifest, "before"))
    titles = {t.text for t in root.iter(f"{NS}title")}
    assert titles == set(manifest.layers), "every layer is drawn, with its name as tooltip"
    texts = {t.text for t in root.iter(f"{NS}text")}
    assert {"before", "horizon 0x3c", "retain 0x1e", "lease 0x2d"} <= texts
    dashed = [line for line in root.iter(f"{NS}line") if line.get("stroke-dasharray")]
    assert len(dashed) == 3


def _rects(svg: str) -> dict[str, tuple[float, float, float, float]]:
    root = ET.fromstring(svg)
    out = {}
    for rect in root.iter(f"{NS}rect"):
        title = rect.find(f"{NS}title")
        if title is not None and title.text:
            out[title.text] = tuple(float(rect.get(a, "0")) for a in ("x", "y", "width", "height"))
    return out


def test_pictures_on_shared_axes_draw_a_layer_at_the_same_place() -> None:
    io = MemoryIO()
    io.load({PARENT: history_timeline(cutoff=60, retain_lsns=[30])})
    before = io.manifests[PARENT]
    # "after": only the newer delta is left, over a narrower LSN range than before
    after = before.successor(layers={n: e for n, e in before.layers.items() if e.layer.lsn_start >= 50})
    axes = Axes.spanning(before, after)
    drawn_before, drawn_after = _rects(layer_map_svg(before, "", axes)), _rects(layer_map_svg(after, "", axes))
    assert set(drawn_after) < set(drawn_before)
    assert all(drawn_after[name] == drawn_before[name] for name in drawn_after)
    alone = _rects(layer_map_svg(after))
    assert any(alone[name] != drawn_before[name] for name in alone), "each on its own axes differs"


def test_image_layers_are_drawn_tall_enough_to_see_and_over_the_deltas() -> None:
    io = MemoryIO()
    tl = history_timeline(cutoff=60)
    tl.layers.append(Layer("image", (0, 8), (95, 96), {k: [Value(95, image=b"x")] for k in range(8)}))
    io.load({PARENT: tl})
    manifest = io.manifests[PARENT]
    svg = layer_map_svg(manifest)
    image = next(n for n in manifest.layer_names() if not n.is_delta)
    assert _rects(svg)[str(image)][3] >= IMAGE_HEIGHT
    order = [t.text for t in ET.fromstring(svg).iter(f"{NS}title")]
    assert order[-1] == str(image), "drawn last, on top"
