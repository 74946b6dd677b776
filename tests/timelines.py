"""Random valid timelines for property tests, and an independent reference reader.

Timelines are built as plain Python data (records as the JSON dicts of CONTRACTS §2) so the
reference below interprets them without touching the code under test.
"""

import base64
import itertools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from compactor.storage.keys import KEY_MAX, format_key, key_from_int, key_to_int

KEY_MAX_INT = key_to_int(KEY_MAX)

TENANT = "3aa8fcc61f6d357410b7de754b1d9001"
PARENT = "11223344556677889900aabbccddeeff"
CHILD = "ffeeddccbbaa00998877665544332211"


class ReferenceError_(Exception):
    """The reference could not read a key (missing base, failed only_if)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Value:
    lsn: int
    image: bytes | None = None
    record: dict[str, Any] | None = None  # the JSON form of a test record

    @property
    def starts_history(self) -> bool:
        return self.image is not None or bool(self.record and self.record["will_init"])


@dataclass
class Layer:
    kind: str  # "image" | "delta"
    keys: tuple[int, int]
    lsns: tuple[int, int]  # image: (lsn, lsn + 1)
    values: dict[int, list[Value]] = field(default_factory=dict)  # key -> values

    def to_json(self) -> dict[str, Any]:
        key_range = [format_key(key_from_int(self.keys[0])), format_key(key_from_int(self.keys[1]))]
        if self.kind == "image":
            return {
                "kind": "image",
                "key_range": key_range,
                "lsn": self.lsns[0],
                "values": [
                    {"key": format_key(key_from_int(k)), "image": b64(v.image or b"")}
                    for k, vs in sorted(self.values.items())
                    for v in vs
                ],
            }
        values = []
        for k, vs in sorted(self.values.items()):
            for v in sorted(vs, key=lambda v: v.lsn):
                item: dict[str, Any] = {"key": format_key(key_from_int(k)), "lsn": v.lsn}
                if v.image is not None:
                    item["image"] = b64(v.image)
                else:
                    item["wal"] = v.record
                values.append(item)
        return {"kind": "delta", "key_range": key_range, "lsn_range": list(self.lsns), "values": values}


@dataclass
class Timeline:
    timeline_id: str
    layers: list[Layer]
    ancestor: tuple[str, int] | None = None
    cutoff: int = 0
    retain_lsns: list[int] = field(default_factory=list)
    leases: list[int] = field(default_factory=list)
    keyspace: list[tuple[int, int]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "compactor.timeline/v1",
            "tenant_id": TENANT,
            "timeline_id": self.timeline_id,
            "ancestor": None if self.ancestor is None else {"timeline_id": self.ancestor[0], "lsn": self.ancestor[1]},
            "gc": {"cutoff": self.cutoff, "retain_lsns": self.retain_lsns, "leases": self.leases},
            "keyspace": None
            if self.keyspace is None
            else [[format_key(key_from_int(a)), format_key(key_from_int(b))] for a, b in self.keyspace],
            "layers": [layer.to_json() for layer in self.layers],
        }

    @property
    def top_lsn(self) -> int:
        return max((layer.lsns[1] for layer in self.layers), default=1)


def reference_read(timelines: dict[str, Timeline], timeline_id: str, lsn: int) -> dict[int, bytes | Exception]:
    """Value of every key at ``lsn``, computed by plain replay, or the exception a read gives."""
    tl = timelines[timeline_id]
    history = _history(timelines, timeline_id, lsn)
    out: dict[int, bytes | Exception] = {}
    for key, values in sorted(history.items()):
        if tl.keyspace is not None and not any(a <= key < b for a, b in tl.keyspace):
            continue
        try:
            out[key] = _replay(values)
        except ReferenceError_ as err:
            out[key] = err
    return out


def _history(timelines: dict[str, Timeline], timeline_id: str, lsn: int) -> dict[int, list[Value]]:
    tl = timelines[timeline_id]
    merged: dict[int, dict[int, Value]] = {}
    if tl.ancestor is not None:
        parent, branch = tl.ancestor
        parent_keyspace = timelines[parent].keyspace
        for key, values in _history(timelines, parent, min(lsn, branch)).items():
            if parent_keyspace is not None and not any(a <= key < b for a, b in parent_keyspace):
                continue  # dead in the parent, so not inherited
            merged.setdefault(key, {}).update({v.lsn: v for v in values})
    for layer in tl.layers:
        for key, values in layer.values.items():
            for v in values:
                if v.lsn > lsn:
                    continue
                slot = merged.setdefault(key, {})
                # an image wins over a record at the same LSN
                if v.lsn not in slot or (v.image is not None and slot[v.lsn].image is None):
                    slot[v.lsn] = v
    return {k: [vs[lsn_] for lsn_ in sorted(vs)] for k, vs in merged.items()}


def _replay(values: list[Value]) -> bytes:
    start = max((i for i, v in enumerate(values) if v.starts_history), default=None)
    if start is None:
        raise ReferenceError_("no base")
    page = b""
    for v in values[start:]:
        if v.image is not None:
            page = v.image
            continue
        rec = v.record
        assert rec is not None
        if rec["clear"]:
            page = b""
        if rec["only_if"] is not None and page != base64.b64decode(rec["only_if"]):
            raise ReferenceError_("only_if")
        page = page + base64.b64decode(rec["append"])
    return page


def record(
    append: bytes, *, clear: bool = False, will_init: bool = False, only_if: bytes | None = None
) -> dict[str, Any]:
    return {
        "op": "test",
        "append": b64(append),
        "clear": clear,
        "will_init": will_init,
        "only_if": None if only_if is None else b64(only_if),
    }


@st.composite
def values_for_key(draw: st.DrawFn, key: int, lsns: list[int], allow_incomplete: bool) -> list[Value]:
    out = []
    for i, lsn in enumerate(lsns):
        choice = draw(st.integers(0, 9))
        tag = f"k{key}@{lsn};".encode()
        if choice == 0 or (i == 0 and not allow_incomplete and choice < 6):
            out.append(Value(lsn, image=b"I" + tag))
        elif choice == 1:
            out.append(Value(lsn, record=record(b"N" + tag, clear=True, will_init=True)))
        elif choice == 2 and draw(st.booleans()):
            out.append(Value(lsn, record=record(b"C" + tag, clear=True)))
        else:
            out.append(Value(lsn, record=record(tag)))
    if not allow_incomplete and out and not out[0].starts_history:
        out[0] = Value(out[0].lsn, image=b"I" + f"k{key}@{out[0].lsn};".encode())
    return out


@st.composite
def timeline_layers(
    draw: st.DrawFn, *, n_keys: int, lsn_floor: int, allow_incomplete: bool, allow_images: bool = True, l0: bool = False
) -> list[Layer]:
    """Bands of delta layers (keys split at random points inside a band), some single-key
    deltas, and image layers at LSNs between bands: always a valid layer map. With ``l0``, a
    band of one layer is sometimes an L0 (every key, ``[MIN, MAX)``), as a pageserver flushes."""
    layers: list[Layer] = []
    lsn = lsn_floor
    seen_keys: set[int] = set()
    for _ in range(draw(st.integers(1, 4))):
        width = draw(st.integers(2, 30))
        band = (lsn, lsn + width)
        cuts = sorted(set(draw(st.lists(st.integers(1, n_keys - 1), max_size=3))))
        bounds = [0, *cuts, n_keys]
        for k0, k1 in itertools.pairwise(bounds):
            layer = Layer("delta", (k0, k1), band)
            for key in range(k0, k1):
                if not draw(st.booleans()):
                    continue
                lsns = sorted(
                    set(
                        draw(
                            st.lists(
                                st.integers(band[0] + (1 if lsn_floor else 0), band[1] - 1), min_size=1, max_size=6
                            )
                        )
                    )
                )
                if not lsns:
                    continue
                layer.values[key] = draw(values_for_key(key, lsns, allow_incomplete or key in seen_keys))
                seen_keys.add(key)
            if layer.values:
                keys = sorted(layer.values)
                if l0 and bounds == [0, n_keys] and draw(st.booleans()):
                    layer.keys = (0, KEY_MAX_INT)
                elif draw(st.booleans()):
                    # shrink to the keys actually present sometimes, as split writers do
                    layer.keys = (keys[0], keys[-1] + 1)
                layers.append(layer)
        lsn = band[1]
        if allow_images and draw(st.integers(0, 3)) == 0:
            # at the band's last LSN, an image meets the band's records at the same LSN
            img_lsn = lsn - draw(st.integers(0, 1))
            img = Layer("image", (0, n_keys), (img_lsn, img_lsn + 1))
            for key in range(n_keys):
                if draw(st.booleans()):
                    img.values[key] = [Value(img_lsn, image=b"S" + f"k{key}@{img_lsn};".encode())]
                    seen_keys.add(key)
            if img.values:
                layers.append(img)
            lsn = max(lsn, img_lsn + 1)
    return layers


@st.composite
def timelines(
    draw: st.DrawFn, *, branch: bool | None = None, allow_incomplete: bool = False, l0: bool = False
) -> dict[str, Timeline]:
    """A parent timeline and, sometimes, a child branched from it."""
    n_keys = draw(st.integers(2, 8))
    parent = Timeline(
        PARENT, draw(timeline_layers(n_keys=n_keys, lsn_floor=0, allow_incomplete=allow_incomplete, l0=l0))
    )
    if draw(st.booleans()):
        a = draw(st.integers(0, n_keys - 1))
        parent.keyspace = [(a, draw(st.integers(a + 1, n_keys)))]
    out = {PARENT: parent}
    make_branch = draw(st.booleans()) if branch is None else branch
    if make_branch:
        point = draw(st.integers(1, parent.top_lsn))
        parent.retain_lsns = [point]
        child = Timeline(
            CHILD,
            draw(timeline_layers(n_keys=n_keys, lsn_floor=point, allow_incomplete=True, allow_images=False)),
            ancestor=(PARENT, point),
        )
        out[CHILD] = child
    return out
