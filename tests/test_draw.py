"""Layer-map pictures: well-formed SVG with one rectangle per layer and every marker."""

import xml.etree.ElementTree as ET

from coordinator.draw import layer_map_svg
from tests.engine_memory import MemoryIO
from tests.test_engine_jobs import history_timeline
from tests.timelines import PARENT

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
